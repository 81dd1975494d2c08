"""One distributed training step: embed, mine over the global batch, update, measure."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from trainer.global_loss import loss_and_gradients
from trainer.replicas import Replicas


class TrainStep:
    """Compiled train step on any backend; returns global metrics as Python floats.

    Metrics: `loss` (the global-batch loss), `active_triplet_fraction` (terms with a
    positive loss), `embedding_norm` (mean L2 norm), and
    `cross_replica_negative_fraction` (share of the chosen negatives that another
    replica owns: what global mining buys; 0 with `cross_replica_mining=False`).
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        loss,
        replicas: Replicas,
        cross_replica_mining: bool = True,
    ):
        self.model, self.optimizer, self.loss = model, optimizer, loss
        self.replicas = replicas
        self.cross_replica_mining = cross_replica_mining
        with replicas.scope():
            optimizer.build(model.trainable_variables)
        self._compiled = tf.function(self._replica_step)

    def _replica_step(self, images, labels):
        variables = self.model.trainable_variables
        result = loss_and_gradients(
            self.loss,
            self.replicas,
            lambda x: self.model(x, training=True),
            variables,
            images,
            labels,
            self.cross_replica_mining,
        )
        self.replicas.apply_gradients(self.optimizer, result.grads, variables)
        s = result.stats
        return tf.stack(
            [
                result.loss,
                tf.math.divide_no_nan(s["active"], s["terms"]),
                tf.math.divide_no_nan(s["norm_sum"], s["rows"]),
                tf.math.divide_no_nan(s["remote_negatives"], s["chosen_negatives"]),
            ]
        )

    def __call__(self, global_images, global_labels) -> dict:
        """Runs one step on the global batch (each replica takes its slice)."""
        out = self.replicas.run(self._compiled, self.replicas.split(global_images, global_labels))
        values = np.asarray(self.replicas.local_results(out)[0], np.float64)
        names = (
            "loss",
            "active_triplet_fraction",
            "embedding_norm",
            "cross_replica_negative_fraction",
        )
        return dict(zip(names, values.tolist(), strict=True))
