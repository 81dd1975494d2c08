"""Cross-batch memory of the training job (`train.cross_batch_memory`, XBM).

The last M examples of past global batches, newest first, mined as extra keys (without
gradient) after the global batch's own. Every replica gathers the same global batch, so
every replica holds the same memory: the job stays replica-count invariant. The memory
is a `tf.Module`, so it goes into the checkpoint and the elastic state with the model.
"""

from __future__ import annotations

import tensorflow as tf


class KeyMemory(tf.Module):
    """A queue of `size` embeddings and labels. Build it inside the replicas' scope: under
    MirroredStrategy its variables are mirrored and written from the first replica (all
    replicas push the same gathered batch)."""

    def __init__(self, size: int, dim: int):
        super().__init__(name="cross_batch_memory")
        self.size = int(size)
        options = dict(
            trainable=False,
            synchronization=tf.VariableSynchronization.ON_WRITE,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        self.embeddings = tf.Variable(tf.zeros([size, dim]), name="embeddings", **options)
        self.labels = tf.Variable(tf.zeros([size], tf.int32), name="labels", **options)
        self.filled = tf.Variable(0, dtype=tf.int32, name="filled", **options)

    @property
    def state(self) -> list:
        """The variables to checkpoint, broadcast and keep in an elastic commit."""
        return [self.embeddings, self.labels, self.filled]

    def keys(self):
        """(embeddings, labels) of the filled slots, newest first."""
        filled = tf.convert_to_tensor(self.filled)
        return (
            tf.convert_to_tensor(self.embeddings)[:filled],
            tf.convert_to_tensor(self.labels)[:filled],
        )

    def push(self, embeddings, labels):
        """Puts a global batch at the front, dropping the oldest examples. A batch with a
        non-finite embedding is left out: one bad step must not poison every later one."""
        embeddings = tf.stop_gradient(tf.cast(embeddings, tf.float32))
        finite = tf.reduce_all(tf.math.is_finite(embeddings))
        rows = tf.shape(embeddings)[0]
        new_embeddings = tf.concat([embeddings, self.embeddings], axis=0)[: self.size]
        new_labels = tf.concat([tf.cast(labels, tf.int32), self.labels], axis=0)[: self.size]
        return tf.group(
            self.embeddings.assign(tf.where(finite, new_embeddings, self.embeddings)),
            self.labels.assign(tf.where(finite, new_labels, self.labels)),
            self.filled.assign(
                tf.where(finite, tf.minimum(self.filled + rows, self.size), self.filled)
            ),
        )
