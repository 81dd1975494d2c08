"""Triplet losses: explicit triplets, semi-hard, batch-hard and batch-all mining.

Each mined loss has two forms:
- `*_terms(anchors, anchor_labels, anchor_positions, keys, key_labels, ...)`, the
  query/key form: mines the given anchors against a set of keys and returns a
  `TripletTerms` (loss sum and the count that normalizes it). Sums and counts add up
  across disjoint sets of anchors, which is what makes cross-replica mining exact:
  each replica mines its own anchors against the gathered keys, and the global loss
  is sum(loss_sum) / sum(count).
- `triplet_*_loss(labels, embeddings, ...)`, one batch mined against itself.

Semantics of `triplet_semihard_loss` and `triplet_hard_loss` follow TensorFlow Addons
0.23 (`tfa.losses`), including its fallbacks; see docs/losses.md, "Migrating from
TensorFlow Addons".
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from losses import mining
from losses.distances import (
    as_float32_embeddings,
    canonical_distance,
    paired_distances,
    pairwise_distances,
)


class TripletTerms(NamedTuple):
    """What one set of anchors contributes to a mined triplet loss.

    loss = loss_sum / count, summed over every set of anchors first.
    """

    loss_sum: tf.Tensor  # scalar float32: sum of the per-term losses
    count: tf.Tensor  # scalar float32: the normalizer (pairs, anchors or triplets)
    num_active: tf.Tensor  # scalar float32: terms whose loss is > 0
    num_terms: tf.Tensor  # scalar float32: all terms (positive pairs, anchors or triplets)
    # Key index of the negative each term chose (-1: the anchor had none). Empty for
    # batch-all, whose terms use every negative. Lets the trainer tell where they came from.
    negative_index: tf.Tensor  # (terms,) int32
    # Distances of the pairs the terms used (no gradient), for monitoring: anchor-positive
    # per term, and anchor-negative per chosen negative (every negative for batch-all).
    positive_distances: tf.Tensor  # (n,) float32
    negative_distances: tf.Tensor  # (m,) float32
    # A loss that is a sum of several means (contrastive: positive + negative pairs)
    # gives each mean's sum and normalizer here, (parts,) float32 each; the loss is then
    # sum(part_sums / part_counts) after summing both over every set of anchors, and
    # loss_sum / count are only their totals.
    part_sums: tf.Tensor | None = None
    part_counts: tf.Tensor | None = None


SCALAR_FIELDS = ("loss_sum", "count", "num_active", "num_terms")


def check_choice(name: str, value, choices) -> str:
    """Returns `value` if it is one of `choices`; else raises, naming option and valid values."""
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; valid values are {tuple(choices)}.")
    return value


def normalized(terms: TripletTerms) -> tf.Tensor:
    """loss_sum / count (summed over parts), 0 (not NaN) when there is nothing to
    normalize by."""
    if terms.part_sums is not None:
        return tf.reduce_sum(tf.math.divide_no_nan(terms.part_sums, terms.part_counts))
    return tf.math.divide_no_nan(terms.loss_sum, terms.count)


def _prepare(anchors, anchor_labels, anchor_positions, keys, key_labels, distance):
    """Validates inputs; returns (distances, masks) of the anchors against the keys."""
    anchors, keys, masks = validated_query_key(
        anchors, anchor_labels, anchor_positions, keys, key_labels
    )
    return pairwise_distances(anchors, keys, distance), masks


def validated_query_key(anchors, anchor_labels, anchor_positions, keys, key_labels):
    """Checked float32 anchors and keys, and the label masks of every (anchor, key)."""
    anchors = as_float32_embeddings(anchors, "embeddings")
    keys = as_float32_embeddings(keys, "keys")
    anchor_labels = mining.check_labels(anchor_labels, "labels")
    key_labels = mining.check_labels(key_labels, "key_labels")
    anchor_labels, anchors = _check_batch(anchor_labels, anchors, "labels", "embeddings")
    key_labels, keys = _check_batch(key_labels, keys, "key_labels", "keys")
    key_labels = tf.cast(key_labels, anchor_labels.dtype)
    return anchors, keys, mining.label_masks(anchor_labels, anchor_positions, key_labels)


def _check_batch(labels, embeddings, labels_name, embeddings_name):
    """(labels, embeddings), checked to hold the same number of rows.

    Inside a tf.function the returned tensors depend on the runtime check, so no op
    that uses them runs (and fails less clearly) before it.
    """
    static_l, static_e = labels.shape[0], embeddings.shape[0]
    if static_l is not None and static_e is not None and static_l != static_e:
        raise ValueError(
            f"`{labels_name}` has {static_l} entries but `{embeddings_name}` has "
            f"{static_e} rows; they must match."
        )
    check = tf.debugging.assert_equal(
        tf.shape(labels)[0],
        tf.shape(embeddings)[0],
        message=f"`{labels_name}` and `{embeddings_name}` have different batch sizes",
    )
    with tf.control_dependencies([check] if check is not None else []):  # None when eager
        return tf.identity(labels), tf.identity(embeddings)


def observed(distances, mask) -> tf.Tensor:
    """The masked distances as a flat vector, without gradient (for monitoring only)."""
    return tf.boolean_mask(tf.stop_gradient(distances), mask)


def count_true(mask) -> tf.Tensor:
    """How many entries of a boolean mask are True, as float32 (terms and normalizers)."""
    return tf.reduce_sum(tf.cast(mask, tf.float32))


def semihard_terms(
    anchors, anchor_labels, anchor_positions, keys, key_labels, margin=1.0, distance="euclidean"
) -> TripletTerms:
    """Semi-hard mining, normalized by the number of positive pairs.

    Per (anchor, positive): the closest negative strictly farther than the positive,
    else the farthest negative (else distance 0 when the anchor has no negative, as in
    Addons); loss max(margin + d(a, p) - d(a, n), 0).
    """
    distances, masks = _prepare(
        anchors, anchor_labels, anchor_positions, keys, key_labels, distance
    )
    slots = mining.positive_slots(masks.positive)
    positive_d = mining.gather_rows(distances, slots.index)
    semihard, found = mining.semihard_negatives(distances, masks.negative, positive_d)
    farthest, has_negative = mining.farthest_negative(distances, masks.negative)
    fallback_d = tf.where(has_negative, mining.gather_rows(distances, farthest[:, None])[:, 0], 0.0)
    negative_d = tf.where(found, mining.gather_rows(distances, semihard), fallback_d[:, None])
    losses = tf.where(slots.valid, tf.maximum(margin + positive_d - negative_d, 0.0), 0.0)
    num_pairs = count_true(slots.valid)
    fallback = tf.where(has_negative, farthest, -1)
    chosen = tf.boolean_mask(tf.where(found, semihard, fallback[:, None]), slots.valid)
    return TripletTerms(
        tf.reduce_sum(losses),
        num_pairs,
        count_true(losses > 0.0),
        num_pairs,
        chosen,
        observed(positive_d, slots.valid),
        observed(negative_d, slots.valid & (fallback[:, None] >= 0)),
    )


def hard_terms(
    anchors,
    anchor_labels,
    anchor_positions,
    keys,
    key_labels,
    margin=1.0,
    soft=False,
    distance="euclidean",
) -> TripletTerms:
    """Batch-hard mining, normalized by the number of anchors.

    Per anchor: farthest positive (distance 0 if none) against closest negative (the
    farthest key if none, as in Addons); hinge max(d_p - d_n + margin, 0), or with
    `soft` the softplus log(1 + exp(d_p - d_n)), computed stably (no margin, as Addons).
    """
    distances, masks = _prepare(
        anchors, anchor_labels, anchor_positions, keys, key_labels, distance
    )
    positive, has_positive = mining.hardest_positive(distances, masks.positive)
    negative, has_negative = mining.hardest_negative(distances, masks.negative)
    negative = tf.where(has_negative, negative, mining.farthest_key(distances))
    chosen_d = mining.gather_rows(distances, tf.stack([positive, negative], axis=1))
    positive_d = tf.where(has_positive, chosen_d[:, 0], 0.0)
    gap = positive_d - chosen_d[:, 1]
    losses = tf.math.softplus(gap) if soft else tf.maximum(gap + margin, 0.0)
    num_anchors = tf.cast(tf.shape(distances)[0], tf.float32)
    chosen = tf.where(has_negative, negative, -1)
    return TripletTerms(
        tf.reduce_sum(losses),
        num_anchors,
        count_true(losses > 0.0),
        num_anchors,
        chosen,
        observed(positive_d, has_positive),
        observed(chosen_d[:, 1], has_negative),
    )


BATCH_ALL_REDUCTIONS = ("nonzero", "all")


def batch_all_terms(
    anchors,
    anchor_labels,
    anchor_positions,
    keys,
    key_labels,
    margin=1.0,
    distance="euclidean",
    reduction="nonzero",
) -> TripletTerms:
    """Every valid (anchor, positive, negative): max(d(a,p) - d(a,n) + margin, 0).

    `reduction="nonzero"` normalizes by the triplets with a positive loss, `"all"` by
    every valid triplet. Works in O(anchors x keys) memory whatever the number of
    positives: each anchor's negatives are sorted once, and for each positive the
    negatives closer than d(a,p) + margin are summed with a prefix sum.
    """
    check_choice("reduction", reduction, BATCH_ALL_REDUCTIONS)
    distances, masks = _prepare(
        anchors, anchor_labels, anchor_positions, keys, key_labels, distance
    )
    slots = mining.positive_slots(masks.positive)
    thresholds = mining.gather_rows(distances, slots.index) + margin
    losses, active = tf.cond(
        tf.shape(thresholds)[1] <= mining.MAX_POSITIVE_PASSES,
        lambda: _hinge_sums_by_passes(thresholds, slots.valid, distances, masks.negative),
        lambda: _hinge_sums_by_sorting(thresholds, distances, masks.negative),
    )
    losses = tf.where(slots.valid, tf.maximum(losses, 0.0), 0.0)
    num_active = tf.reduce_sum(tf.where(slots.valid, active, 0.0))
    num_negatives = tf.reduce_sum(tf.cast(masks.negative, tf.float32), axis=1, keepdims=True)
    num_triplets = tf.reduce_sum(tf.where(slots.valid, num_negatives, 0.0))
    count = num_active if reduction == "nonzero" else num_triplets
    no_single_negative = tf.zeros([0], tf.int32)
    return TripletTerms(
        tf.reduce_sum(losses),
        count,
        num_active,
        num_triplets,
        no_single_negative,
        observed(thresholds - margin, slots.valid),
        observed(distances, masks.negative),
    )


def _hinge_sums_by_sorting(thresholds, distances, negative):
    """Per (anchor, positive slot) with threshold t = d(a, p) + margin: the sum over the
    anchor's negatives of max(t - d(a, n), 0), and how many are positive. Each row of
    negatives is sorted once; a prefix sum gives every slot's sum (many positives)."""
    negative_d = tf.where(negative, tf.stop_gradient(distances), float("inf"))
    order = tf.argsort(negative_d, axis=1, stable=True)
    sorted_negative_d = mining.gather_rows(negative_d, order)
    # Prefix sums of the sorted negative distances, with gradient, 0 past the negatives.
    is_negative = sorted_negative_d < float("inf")
    sorted_d = tf.where(is_negative, mining.gather_rows(distances, order), 0.0)
    prefix = tf.concat([tf.zeros_like(sorted_d[:, :1]), tf.cumsum(sorted_d, axis=1)], axis=1)
    closer = tf.searchsorted(sorted_negative_d, tf.stop_gradient(thresholds), side="left")
    sums = tf.cast(closer, tf.float32) * thresholds - mining.gather_rows(prefix, closer)
    return sums, tf.cast(closer, tf.float32)


def _hinge_sums_by_passes(thresholds, valid, distances, negative):
    """What `_hinge_sums_by_sorting` returns, in one pass over each anchor's row per
    positive slot: no sort, cheap when positives are few (P×K batches). The gradient is
    written out, a count per slot and minus a count per negative, so the backward pass
    keeps no (anchors, slots, keys) tensor: memory stays O(anchors × keys)."""
    negative_d = tf.where(negative, distances, float("inf"))
    num_slots = tf.shape(thresholds)[1]

    def over_slots(step, initial):
        return tf.while_loop(lambda j, _: j < num_slots, step, (tf.constant(0), initial))[1]

    def hinges(t, negative_d, j):
        h = t[:, j : j + 1] - negative_d
        return h, (h > 0) & valid[:, j : j + 1]

    @tf.custom_gradient
    def sums(t, negative_d):
        def step(j, acc):
            h, on = hinges(t, negative_d, j)
            column = tf.one_hot(j, num_slots)[tf.newaxis, :]
            loss = tf.reduce_sum(tf.where(on, h, 0.0), axis=1, keepdims=True)
            count = tf.reduce_sum(tf.cast(on, tf.float32), axis=1, keepdims=True)
            return j + 1, (acc[0] + loss * column, acc[1] + count * column)

        zeros = tf.zeros_like(t)
        loss, count = over_slots(step, (zeros, zeros))

        def grad(d_loss, d_count):
            def back(j, acc):
                _, on = hinges(t, negative_d, j)
                return j + 1, acc - tf.where(on, d_loss[:, j : j + 1], 0.0)

            return d_loss * count, over_slots(back, tf.zeros_like(negative_d))

        return (loss, count), grad

    return sums(thresholds, negative_d)


def whole_batch(labels, embeddings):
    """The single-device case: the batch is both the anchors and the keys."""
    labels = mining.check_labels(labels, "labels")
    embeddings = as_float32_embeddings(embeddings, "embeddings")
    labels, embeddings = _check_batch(labels, embeddings, "labels", "embeddings")
    positions = tf.range(tf.shape(labels)[0])
    return embeddings, labels, positions, embeddings, labels


def triplet_semihard_loss(labels, embeddings, margin=1.0, distance="euclidean"):
    """Semi-hard triplet loss of one batch (TensorFlow Addons' `triplet_semihard_loss`)."""
    return normalized(
        semihard_terms(*whole_batch(labels, embeddings), margin=margin, distance=distance)
    )


def triplet_hard_loss(labels, embeddings, margin=1.0, soft=False, distance="euclidean"):
    """Batch-hard triplet loss of one batch (TensorFlow Addons' `triplet_hard_loss`)."""
    return normalized(
        hard_terms(*whole_batch(labels, embeddings), margin=margin, soft=soft, distance=distance)
    )


def triplet_batch_all_loss(
    labels, embeddings, margin=1.0, distance="euclidean", reduction="nonzero"
):
    """Batch-all triplet loss of one batch: mean over non-zero (or all) valid triplets."""
    return normalized(
        batch_all_terms(
            *whole_batch(labels, embeddings), margin=margin, distance=distance, reduction=reduction
        )
    )


NEGATIVE_MINING = ("semihard", "hardest")


def triplet_loss(
    anchor, positive, negative, margin=1.0, distance="euclidean", negative_mining="semihard"
):
    """Mean of max(d(a, p) - d(a, n) + margin, 0) over explicit triplets.

    `anchor` and `positive` are (B, D). `negative` is (B, D), or (B, M, D) with M
    candidate negatives per anchor, of which `negative_mining="semihard"` uses the closest one
    strictly farther than the positive (else the farthest), `"hardest"` the closest.
    """
    canonical_distance(distance)
    check_choice("negative_mining", negative_mining, NEGATIVE_MINING)
    anchor = as_float32_embeddings(anchor, "anchor")
    positive = as_float32_embeddings(positive, "positive")
    negative = tf.cast(tf.convert_to_tensor(negative), tf.float32)
    if negative.shape.rank not in (2, 3):
        raise ValueError(f"`negative` must be (B, D) or (B, M, D), got shape {negative.shape}.")
    if not (anchor.shape.is_compatible_with(positive.shape)):
        raise ValueError(f"`anchor` {anchor.shape} and `positive` {positive.shape} shapes differ.")
    positive_d = paired_distances(anchor, positive, distance)
    if negative.shape.rank == 2:
        negative_d = paired_distances(anchor, negative, distance)
    else:
        candidates = paired_distances(anchor[:, tf.newaxis, :], negative, distance)
        negative_d = _choose_negative(candidates, positive_d, negative_mining)
    return tf.reduce_mean(tf.maximum(positive_d - negative_d + margin, 0.0))


def _choose_negative(candidates, positive_d, mining_mode):
    """Of (B, M) candidate distances, the semi-hard or the hardest one per anchor."""
    fixed = tf.stop_gradient(candidates)
    if mining_mode == "hardest":
        index = tf.argmin(fixed, axis=1, output_type=tf.int32)
    else:
        farther = fixed > tf.stop_gradient(positive_d)[:, tf.newaxis]
        semihard = tf.argmin(tf.where(farther, fixed, float("inf")), axis=1, output_type=tf.int32)
        farthest = tf.argmax(fixed, axis=1, output_type=tf.int32)
        index = tf.where(tf.reduce_any(farther, axis=1), semihard, farthest)
    return mining.gather_rows(candidates, index[:, tf.newaxis])[:, 0]
