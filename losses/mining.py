"""Mining in query/key form: for each anchor, which keys are its positive and negative.

An anchor is one row of the local batch; the keys are the batch it is mined against (on
one device the batch itself, across replicas the gathered global batch). Each anchor
knows its own position among the keys so that it is never its own positive.

Every function here returns *key indices* and runs on gradient-stopped distances:
mining is a discrete choice. The losses then gather the chosen distances with their
gradient, so the backward pass touches only the chosen entries of the distance matrix
and nothing of the mining intermediates is kept for it.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

_INF = float("inf")

# Above this many positives per anchor the semi-hard search sorts each row once
# instead of making one pass over the row per positive (P×K batches have K - 1).
# Measured crossover on CPU: about 48 positives at B = 1024, above 32 at B = 4096.
MAX_POSITIVE_PASSES = 40
# Largest (anchors, positives, keys) comparison made at once by the one-pass search.
PASS_CHUNK_ELEMENTS = 1 << 22


class LabelMasks(NamedTuple):
    """Boolean (anchors, keys) masks; `positive` excludes the anchor itself."""

    positive: tf.Tensor
    negative: tf.Tensor


class PositiveSlots(NamedTuple):
    """Every positive of every anchor, padded to the largest count.

    `index[a, j]` is the key index of anchor a's j-th positive (in key order) where
    `valid[a, j]`; padding entries hold key index 0.
    """

    index: tf.Tensor  # (anchors, max_positives) int32
    valid: tf.Tensor  # (anchors, max_positives) bool


def check_labels(labels, name: str = "labels") -> tf.Tensor:
    """Returns labels as a 1-D int tensor; (B, 1) is accepted (Addons did) and squeezed."""
    labels = tf.convert_to_tensor(labels)
    if not labels.dtype.is_integer:
        raise TypeError(f"`{name}` must be integer class ids, got dtype {labels.dtype.name}.")
    rank = labels.shape.rank
    if rank == 2 and labels.shape[1] == 1:
        labels = tf.squeeze(labels, axis=1)
    elif rank is not None and rank != 1:
        raise ValueError(f"`{name}` must be 1-D (batch,), got shape {labels.shape}.")
    return labels


def class_ids(labels, name: str = "labels") -> tf.Tensor:
    """Labels as integer class ids. Keras hands a loss float labels (its symbolic build
    under a distribution strategy does), so a float holding a whole number is taken as
    that id; any other float is an error naming the first offending values."""
    labels = tf.convert_to_tensor(labels)
    if labels.dtype.is_integer:
        return labels
    if not labels.dtype.is_floating:
        raise TypeError(f"`{name}` must be integer class ids, got dtype {labels.dtype.name}.")
    whole = tf.logical_and(tf.math.is_finite(labels), tf.equal(labels, tf.round(labels)))
    not_whole = tf.boolean_mask(labels, tf.logical_not(whole))
    message = f"`{name}` must be integer class ids; these are not whole numbers:"
    if tf.executing_eagerly():
        if tf.size(not_whole) > 0:
            raise ValueError(f"{message} {not_whole[:5].numpy().tolist()}")
        return tf.cast(labels, tf.int32)
    check = tf.debugging.Assert(
        tf.reduce_all(whole),
        [message, not_whole[:5]],
        summarize=5,
    )
    with tf.control_dependencies([check]):
        return tf.cast(labels, tf.int32)


def label_masks(anchor_labels, anchor_positions, key_labels) -> LabelMasks:
    """Positive (same label, not itself) and negative (other label) masks."""
    same = tf.equal(anchor_labels[:, tf.newaxis], key_labels[tf.newaxis, :])
    num_anchors = tf.shape(anchor_labels)[0]
    self_entries = tf.stack([tf.range(num_anchors), tf.cast(anchor_positions, tf.int32)], axis=1)
    positive = tf.tensor_scatter_nd_update(same, self_entries, tf.zeros([num_anchors], tf.bool))
    return LabelMasks(positive=positive, negative=tf.logical_not(same))


def gather_rows(matrix: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """matrix[a, index[a, ...]] for every row a (keeps the gradient to `matrix`)."""
    return tf.gather(matrix, index, batch_dims=1)


def positive_slots(positive) -> PositiveSlots:
    """All positives of each anchor, as (anchors, max_positives) key indices.

    Each positive's slot is its rank among its row's positives (a cumulative sum), so
    this is one pass over the mask whatever the number of positives, with no sort.
    """
    as_int = tf.cast(positive, tf.int32)
    num_positives = tf.reduce_sum(as_int, axis=1)
    max_positives = tf.reduce_max(tf.concat([num_positives, [0]], 0))
    entries = tf.cast(tf.where(positive), tf.int32)  # (pairs, 2): anchor, key
    slot = tf.gather_nd(tf.cumsum(as_int, axis=1), entries) - 1
    index = tf.scatter_nd(
        tf.stack([entries[:, 0], slot], axis=1),
        entries[:, 1],
        tf.stack([tf.shape(positive)[0], max_positives]),
    )
    valid = tf.range(max_positives)[tf.newaxis, :] < num_positives[:, tf.newaxis]
    return PositiveSlots(index=index, valid=valid)


def hardest_positive(distances, positive):
    """Key index of each anchor's farthest positive, and whether it has one."""
    distances = tf.stop_gradient(distances)
    index = tf.argmax(tf.where(positive, distances, -_INF), axis=1, output_type=tf.int32)
    return index, tf.reduce_any(positive, axis=1)


def hardest_negative(distances, negative):
    """Key index of each anchor's closest negative, and whether it has one."""
    distances = tf.stop_gradient(distances)
    index = tf.argmin(tf.where(negative, distances, _INF), axis=1, output_type=tf.int32)
    return index, tf.reduce_any(negative, axis=1)


def farthest_negative(distances, negative):
    """Key index of each anchor's farthest negative, and whether it has one."""
    distances = tf.stop_gradient(distances)
    index = tf.argmax(tf.where(negative, distances, -_INF), axis=1, output_type=tf.int32)
    return index, tf.reduce_any(negative, axis=1)


def farthest_key(distances):
    """Key index of the farthest key of each anchor (Addons' fallback with no negative)."""
    return tf.argmax(tf.stop_gradient(distances), axis=1, output_type=tf.int32)


def semihard_negatives(distances, negative, positive_distances):
    """Per (anchor, positive): the closest negative strictly farther than the positive.

    Args:
      distances: (anchors, keys) distances.
      negative: (anchors, keys) bool mask of negatives.
      positive_distances: (anchors, P) distance of each anchor to P of its positives.

    Returns:
      (index, found): (anchors, P) key indices and whether such a negative exists.
      Ties go to the lowest key index, whichever search path runs.
    """
    negative_distances = tf.where(negative, tf.stop_gradient(distances), _INF)
    positive_distances = tf.stop_gradient(positive_distances)
    passes = tf.shape(positive_distances)[1]
    index = tf.cond(
        passes <= MAX_POSITIVE_PASSES,
        lambda: _semihard_by_passes(negative_distances, positive_distances),
        lambda: _semihard_by_sorting(negative_distances, positive_distances),
    )
    chosen = gather_rows(negative_distances, index)
    # A row with no such negative yields an arbitrary index: recheck the definition.
    found = (chosen > positive_distances) & (chosen < _INF)
    return index, found


def _semihard_by_passes(negative_distances, positive_distances):
    """One pass over each anchor's row per positive: cheap when positives are few.

    The positives are compared as one broadcast (anchors, positives, keys) comparison
    when it has at most PASS_CHUNK_ELEMENTS elements (a batch of up to about 500 rows of
    16 per class), where a loop's overhead would be most of the time. Larger ones loop
    over chunks of positives, keeping memory at O(B²). Passes with no positives
    take the first branch, so the loop always has something to write.
    """
    passes = tf.shape(positive_distances)[1]
    num_anchors, num_keys = tf.shape(negative_distances)[0], tf.shape(negative_distances)[1]
    chunk = tf.maximum(1, PASS_CHUNK_ELEMENTS // tf.maximum(num_anchors * num_keys, 1))
    # A column of inf after the keys leaves every argmin as it was (ties go to the first
    # index) and gives the comparison a non-empty axis when there are no keys.
    padded = tf.pad(negative_distances, [[0, 0], [0, 1]], constant_values=_INF)
    rows = padded[:, tf.newaxis, :]

    def closest_farther(thresholds):  # (anchors, <= chunk) keys
        candidates = tf.where(rows > thresholds[:, :, tf.newaxis], rows, _INF)
        return tf.argmin(candidates, axis=2, output_type=tf.int32)

    def by_chunks():
        def body(j, chosen):
            best = closest_farther(positive_distances[:, j : j + chunk])
            return j + chunk, chosen.write(j // chunk, tf.transpose(best))

        chosen = tf.TensorArray(
            tf.int32,
            size=0,
            dynamic_size=True,
            infer_shape=False,
            element_shape=tf.TensorShape([None, None]),
        )
        _, chosen = tf.while_loop(lambda j, _: j < passes, body, (tf.constant(0), chosen))
        return tf.transpose(chosen.concat())

    return tf.cond(passes <= chunk, lambda: closest_farther(positive_distances), by_chunks)


def _semihard_by_sorting(negative_distances, positive_distances):
    """Sort each row of negatives once, then binary-search every positive distance."""
    order = tf.argsort(negative_distances, axis=1, stable=True)
    ordered = gather_rows(negative_distances, order)
    first_farther = tf.searchsorted(ordered, positive_distances, side="right")
    last = tf.shape(negative_distances)[1] - 1
    return gather_rows(order, tf.minimum(first_farther, last))
