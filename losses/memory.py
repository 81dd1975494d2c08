"""CrossBatchMemory (XBM, Wang et al. 2020): mine against the last M embeddings seen.

A Keras `Loss` wrapping any loss of this package that has a query/key form. Each call
first enqueues the batch into a ring buffer of M embeddings and labels (so the memory
includes the batch), then computes the wrapped loss with the batch as anchors against
the filled slots as keys. Keys carry no gradient, and an anchor is never paired with
its own slot: pytorch-metric-learning's `CrossBatchMemory`.

This class keeps one device's memory. A distributed job's memory must hold the
gathered global batches: that is the trainer's `train.cross_batch_memory`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from losses import mining
from losses.distances import as_float32_embeddings
from losses.keras_losses import PACKAGE, WholeBatchLoss
from losses.triplet import normalized


@keras.saving.register_keras_serializable(package=PACKAGE)
class CrossBatchMemory(WholeBatchLoss):
    """`loss` (a loss object with a `terms` method) mined against a memory of `memory_size`
    past embeddings. The memory is made at the first call, of that batch's width; it
    is not part of a Keras checkpoint, and `reset()` empties it."""

    def __init__(self, loss, memory_size, name=None, **kwargs):
        if isinstance(loss, dict):  # from get_config
            loss = keras.losses.deserialize(loss)
        if not callable(getattr(loss, "terms", None)):
            raise TypeError(
                f"CrossBatchMemory needs a loss with a query/key form (a `terms` method), "
                f"got {type(loss).__name__}."
            )
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 1:
            raise ValueError(f"memory_size must be an integer >= 1, got {memory_size!r}.")
        self.loss, self.memory_size = loss, memory_size
        self._embeddings = self._labels = self._next = self._filled = None
        super().__init__(name=name, **kwargs)

    def _build(self, dim: int) -> None:
        with tf.init_scope():  # the variables outlive the function being traced
            size = self.memory_size
            self._embeddings = tf.Variable(tf.zeros([size, dim]), trainable=False)
            self._labels = tf.Variable(tf.zeros([size], tf.int32), trainable=False)
            self._next = tf.Variable(0, trainable=False)  # slot of the next example
            self._filled = tf.Variable(0, trainable=False)

    def reset(self) -> None:
        """Empties the memory."""
        if self._filled is not None:
            self._next.assign(0)
            self._filled.assign(0)

    def call(self, y_true, y_pred):
        labels = tf.cast(mining.check_labels(mining.class_ids(y_true)), tf.int32)
        embeddings = as_float32_embeddings(y_pred, "embeddings")
        dim = embeddings.shape[-1]
        if dim is None:
            raise ValueError("CrossBatchMemory needs embeddings of a known width (last axis).")
        if self._embeddings is None:
            self._build(dim)
        elif self._embeddings.shape[1] != dim:
            raise ValueError(
                f"CrossBatchMemory holds embeddings of width {self._embeddings.shape[1]}, "
                f"got {dim}; use a new CrossBatchMemory for another model."
            )
        rows = tf.shape(embeddings)[0]
        check = tf.debugging.assert_less_equal(
            rows,
            self.memory_size,
            message=f"CrossBatchMemory: a batch is larger than memory_size={self.memory_size}",
        )
        with tf.control_dependencies([check] if check is not None else []):
            slots = (self._next + tf.range(rows)) % self.memory_size
        self._embeddings.scatter_nd_update(slots[:, None], tf.stop_gradient(embeddings))
        self._labels.scatter_nd_update(slots[:, None], labels)
        self._next.assign((self._next + rows) % self.memory_size)
        self._filled.assign(tf.minimum(self._filled + rows, self.memory_size))
        filled = tf.convert_to_tensor(self._filled)
        keys = tf.convert_to_tensor(self._embeddings)[:filled]
        key_labels = tf.convert_to_tensor(self._labels)[:filled]
        return normalized(self.loss.terms(embeddings, labels, slots, keys, key_labels))

    def get_config(self):
        return {
            **super().get_config(),
            "loss": keras.losses.serialize(self.loss),
            "memory_size": self.memory_size,
        }
