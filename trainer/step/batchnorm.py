"""Precise BatchNorm and the collapse check, run before each evaluation and the export.

A BatchNorm layer's moving statistics are an exponential average of the batches it saw
during training: with keras.applications' momentum (0.999 in MobileNetV3) a few hundred
steps leave them a third of the way from their initial values, and inference then runs
on statistics no training batch had. Typically every image then maps to nearly the same
vector, and the loss, computed in training mode, says nothing. As pycls and Detectron2
do, the population statistics are recomputed over `train.precise_batchnorm_batches`
training batches, in training mode, after which inference uses what training did.

The moments of each layer are summed over the replicas (the synchronized moments of
trainer/model.py), and the forward passes normalize with them, so the result is the
same for any replica count, and exact: the mean over the batches of the global batch
mean, and E[x²] - mean² over all their rows (every batch has the same row count).
The batches are the global batches of the last steps before the evaluation (fixed by
the seed and the step, like their augmentation). The same passes give the training
embeddings' mean pairwise cosine, for the collapse check.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import tensorflow as tf

from trainer.evaluation import mean_cosine
from trainer.model import _global_moments, batchnorm_layers
from trainer.step.train_step import as_float

COLLAPSED = 0.9  # mean pairwise cosine above which embeddings are called collapsed


class BatchNormStatistics:
    """Re-estimates the population statistics of `model`'s training BatchNorm layers
    over training batches, on every replica alike; also measures the training-mode
    embeddings' mean pairwise cosine over those batches."""

    def __init__(self, model, replicas):
        self.model, self.replicas = model, replicas
        self.layers = batchnorm_layers(model)
        self._local = threading.local()
        self.retrace()

    def retrace(self) -> None:
        """A trace holds the replica count (an elastic job changes it)."""
        self._compiled = tf.function(self._replica_pass, autograph=False)

    def _replica_pass(self, images):
        """One replica's forward pass in training mode, each BatchNorm layer on the
        global moments (`_moments_over_replicas`), which it records: [(mean, mean of
        squares)...] in layer order, with the sum of the unit embeddings over the global
        batch and its row count. MirroredStrategy traces each replica in a thread of its
        own, hence the thread's own record."""
        self._local.recorded = {}
        embeddings = tf.cast(self.model(as_float(images), training=True), tf.float32)
        recorded = self._local.recorded
        unit = tf.math.l2_normalize(embeddings, axis=1)
        rows = tf.cast(tf.shape(unit)[0], tf.float32)
        totals = self.replicas.all_reduce_sum(tf.concat([tf.reduce_sum(unit, 0), [rows]], 0))
        return [recorded[i] for i in range(len(self.layers))], totals

    @contextlib.contextmanager
    def _moments_over_replicas(self):
        """Every layer on the moments over all replicas, recorded, while inside."""

        def recorder(index):
            return lambda mean, squares: self._local.recorded.__setitem__(index, (mean, squares))

        originals = [layer._moments for layer in self.layers]
        for index, layer in enumerate(self.layers):
            layer._moments = _global_moments(layer, self.replicas, recorder(index))
        try:
            yield
        finally:
            for layer, moments in zip(self.layers, originals, strict=True):
                layer._moments = moments

    def __call__(self, batches, global_size: int, assign: bool) -> dict:
        """Runs over `batches` (this process's (images, labels, ok) of global batches of
        `global_size` rows). `assign`: the layers' moving mean and variance become the
        population statistics. Returns {'batches', 'layers', 'train_mean_cosine'}."""
        kept = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in self.layers]
        with self._moments_over_replicas():
            sums, totals, count = self._passes(batches, global_size)
        if not (count and assign):  # measured only: the statistics stay as they were
            for layer, (mean, variance) in zip(self.layers, kept, strict=True):
                layer.moving_mean.assign(mean)
                layer.moving_variance.assign(variance)
        else:
            for layer, (mean_sum, square_sum) in zip(self.layers, sums, strict=True):
                mean = mean_sum / count
                variance = np.maximum(square_sum / count - mean**2, 0.0)
                layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
                layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
        cosine = mean_cosine(totals[:-1], int(totals[-1])) if count else float("nan")
        return {"batches": count, "layers": len(self.layers), "train_mean_cosine": cosine}

    def _passes(self, batches, global_size: int):
        """Sums over the batches of each layer's (mean, mean of squares), of the unit
        embeddings and their count; and the number of batches."""
        sums, totals, count = None, None, 0
        for images, _, _ in batches:
            inputs = self.replicas.distribute(images, global_size=global_size)
            moments, gathered = self.replicas.run(self._compiled, inputs)
            first = lambda v: self.replicas.local_results(v)[0]  # noqa: E731
            values = [(first(m).numpy(), first(s).numpy()) for m, s in moments]
            values = [(m.astype(np.float64), s.astype(np.float64)) for m, s in values]
            if sums is None:
                sums = values
            else:
                sums = [(a + m, b + s) for (a, b), (m, s) in zip(sums, values, strict=True)]
            step_totals = first(gathered).numpy().astype(np.float64)
            totals = step_totals if totals is None else totals + step_totals
            count += 1
        return sums, totals, count
