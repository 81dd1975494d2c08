"""One distributed training step: embed, mine over the global batch, update, measure."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from trainer.backends.replicas import Replicas
from trainer.step.global_loss import MINING_BUDGET_BYTES, loss_and_gradients
from trainer.step.grad_cache import embedding_pass
from trainer.step.proxy_loss import proxy_loss_and_gradients

METRICS = (
    "loss",  # the global-batch loss
    "active_triplet_fraction",  # terms with a positive loss
    "positive_distance",  # mean anchor-positive distance of the terms
    "negative_distance",  # mean anchor-negative distance of the chosen negatives
    "embedding_norm",  # mean L2 norm of the embeddings
    "cross_replica_negative_fraction",  # chosen negatives owned by another replica
    "memory_negative_fraction",  # chosen negatives from the cross-batch memory
    "finite_gradients",  # 1 when every gradient entry is finite
)


def replica_step(
    model,
    optimizer,
    loss,
    replicas: Replicas,
    inputs,
    labels,
    cross_replica_mining: bool = True,
    replica_rows=None,
    memory=None,
    check_finite: bool = True,
    forward=None,
    centres=None,
    embedding_chunk_size=None,
    mining_budget_bytes=MINING_BUDGET_BYTES,
):
    """One replica's part of a training step, inside `Replicas.run` (or a Keras
    `train_step`): the loss mined over the global batch, the update, and the global
    metrics as one vector in the order of METRICS. Also returns this replica's terms.

    `forward` (default `model_forward(model)`) embeds the inputs in training mode.
    `centres` (trainer.step.class_centres.ShardedCentres): `loss` is a proxy loss whose
    centres are sharded over the replicas; each replica updates its own shard.
    `check_finite=False` leaves out the scan of every gradient for `finite_gradients`
    (reported as 1) when nobody reads it; a loss-scale optimizer always needs it. With
    the check, a step whose global loss or any replica's gradient is not finite changes
    no weight on any replica (`finite_gradients` 0). `embedding_chunk_size` rows at a
    time are embedded, twice, with the loss's cached gradient (trainer/step/grad_cache.py);
    None: the whole slice at once. The mining's arrays are computed in anchor tiles
    within `mining_budget_bytes` (losses/tiles.py).
    """
    variables = model.trainable_variables
    is_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    scale_loss = optimizer.scale_loss if is_scaled else None
    forward = forward or model_forward(model)
    passes = embedding_pass(model, embedding_chunk_size)
    centre_grad = None
    if centres is not None:
        result, centre_grad = proxy_loss_and_gradients(
            centres, replicas, forward, variables, inputs, labels, optimizer.iterations,
            scale_loss, replica_rows, passes,
        )  # fmt: skip
    else:
        result = loss_and_gradients(
            loss, replicas, forward, variables, inputs, labels, cross_replica_mining,
            scale_loss, replica_rows, memory, passes, mining_budget_bytes,
        )  # fmt: skip
    grads = result.grads
    if not (check_finite or is_scaled):
        replicas.apply_gradients(optimizer, grads, variables)
        if centres is not None:
            centres.apply(centre_grad)
        return metrics_vector(result.loss, result.stats, tf.constant(True)), result.terms
    # The verdict is global: a NaN in any replica's gradient (or the global loss) is a NaN
    # in the summed gradient, so every replica must see it before any weight changes.
    checked = [g for g in (*grads, centre_grad) if g is not None]
    local = tf.reduce_all(
        [tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(g))) for g in checked]
    )
    local = tf.logical_and(local, tf.math.is_finite(result.loss))
    finite = replicas.all_reduce_sum(1.0 - tf.cast(local, tf.float32)) == 0.0
    if is_scaled:
        # The loss-scale optimizer skips a step whose gradients are not finite: give
        # every replica non-finite gradients, so that all of them skip it.
        grads = [None if g is None else tf.where(finite, g, float("nan")) for g in grads]
        replicas.apply_gradients(optimizer, grads, variables)
    else:
        replicas.apply_gradients(optimizer, grads, variables, only_if=finite)
    if centres is not None:
        centres.apply(centre_grad, only_if=finite)
    return metrics_vector(result.loss, result.stats, finite), result.terms


def model_forward(model, jit_compile: bool = False):
    """The model in training mode on float inputs. `jit_compile`: its forward pass, and
    so its backward pass, compiled by XLA; the mining stays outside (its shapes depend on
    the labels, which XLA cannot compile)."""

    def forward(images):
        return model(as_float(images), training=True)

    return tf.function(forward, jit_compile=True) if jit_compile else forward


def as_float(images):
    """Integer pixels (the pipeline's uint8 batches) as float32, here on the device."""
    return tf.cast(images, tf.float32) if images.dtype.is_integer else images


def metrics_vector(loss_value, stats: dict, finite) -> tf.Tensor:
    """METRICS from the global loss and the summed statistics (trainer/step/global_loss.py)."""
    s = stats
    return tf.stack(
        [
            tf.cast(loss_value, tf.float32),
            tf.math.divide_no_nan(s["active"], s["terms"]),
            tf.math.divide_no_nan(s["positive_distance_sum"], s["positive_pairs"]),
            tf.math.divide_no_nan(s["negative_distance_sum"], s["negative_pairs"]),
            tf.math.divide_no_nan(s["norm_sum"], s["rows"]),
            tf.math.divide_no_nan(s["remote_negatives"], s["chosen_negatives"]),
            tf.math.divide_no_nan(s["memory_negatives"], s["chosen_negatives"]),
            tf.cast(finite, tf.float32),
        ]
    )


def metrics_of(vector) -> dict:
    """A METRICS vector (a tensor, or its numpy values) as {name: float}."""
    values = np.asarray(vector, np.float64).tolist()
    return dict(zip(METRICS, values, strict=True))


class TrainStep:
    """Compiled train step on any backend; gives the global metrics (METRICS).

    `cross_replica_negative_fraction` is what global mining buys: the share of the chosen
    negatives that another replica owns (0 with `cross_replica_mining=False`). The
    anchor-positive and anchor-negative distances of the first local replica's terms
    are kept in `last_distances` for histograms.
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        loss,
        replicas: Replicas,
        cross_replica_mining: bool = True,
        memory=None,
        jit_compile_model: bool = False,
        centres=None,
        skip_nonfinite: bool = False,
        embedding_chunk_size: int | None = None,
        mining_budget_bytes: int = MINING_BUDGET_BYTES,
    ):
        self.model, self.optimizer, self.loss = model, optimizer, loss
        self.centres = centres  # trainer.step.class_centres.ShardedCentres of a proxy loss
        self.forward = model_forward(model, jit_compile_model)
        self.replicas = replicas
        self.cross_replica_mining = cross_replica_mining
        self.memory = memory  # trainer.step.key_memory.KeyMemory, or None
        self.embedding_chunk_size = embedding_chunk_size  # rows embedded at a time
        self.mining_budget_bytes = mining_budget_bytes  # of one replica's mining arrays
        with replicas.scope():
            optimizer.build(model.trainable_variables)
        self.retrace()
        # Steps with a non-finite loss or gradient are left out (the global verdict gates
        # the update) and counted: train.nonfinite='skip', or a loss-scale optimizer's
        # overflows, which it answers by halving its scale.
        scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.skips_nonfinite = skip_nonfinite or scaled
        self.last_distances = {}

    def retrace(self) -> None:
        """Compiles the step afresh: a trace holds the replica's rank and the replica
        count as constants, which change when an elastic job changes size."""
        self._compiled = tf.function(self._replica_step)

    def _replica_step(self, images, labels, replica_rows=None):
        metrics, terms = replica_step(
            self.model,
            self.optimizer,
            self.loss,
            self.replicas,
            images,
            labels,
            self.cross_replica_mining,
            replica_rows,
            self.memory,
            forward=self.forward,
            centres=self.centres,
            embedding_chunk_size=self.embedding_chunk_size,
            mining_budget_bytes=self.mining_budget_bytes,
        )
        if terms is None:  # a proxy loss: no pairs to histogram
            return metrics, tf.zeros([0]), tf.zeros([0])
        return metrics, terms.positive_distances, terms.negative_distances

    def stage(self, images, labels, global_size: int):
        """This process's rows of a global batch of `global_size` rows (see
        `Replicas.process_rows`) put on its replicas' devices, for `dispatch_staged`.
        Staged while an earlier step runs, the copy overlaps that step."""
        return self.replicas.distribute(images, labels, global_size=global_size), global_size

    def dispatch_staged(self, staged) -> tf.Tensor:
        """One step on a `stage`d batch, without waiting for it: the METRICS vector stays
        on the device until read (`metrics_of`)."""
        inputs, global_size = staged
        metrics, positive, negative = self.replicas.run(
            self._compiled, inputs, {"replica_rows": self.replicas.replica_rows(global_size)}
        )
        first = lambda v: self.replicas.local_results(v)[0]  # noqa: E731
        self.last_distances = {"positive": first(positive), "negative": first(negative)}
        return first(metrics)

    def run_local(self, images, labels, global_size: int) -> dict:
        """One step on this process's rows, waited for: its metrics as Python floats."""
        return metrics_of(self.dispatch_staged(self.stage(images, labels, global_size)))

    def __call__(self, global_images, global_labels) -> dict:
        """One step on the global batch (each process reads its rows, each replica its slice)."""
        start, end = self.replicas.process_rows(len(global_labels))
        return self.run_local(
            np.asarray(global_images)[start:end],
            np.asarray(global_labels)[start:end],
            global_size=len(global_labels),
        )
