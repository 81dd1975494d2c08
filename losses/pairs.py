"""Pair-based losses that weigh every pair of the batch: contrastive, multi-similarity,
SupCon and NT-Xent, with the semantics of pytorch-metric-learning 2.9 and its default
reducers (see docs/losses.md, "Pair-based losses").

Like the triplet losses, each has a query/key form, `*_terms(anchors, anchor_labels,
anchor_positions, keys, key_labels, ...)` returning a `TripletTerms` whose sums and
counts add up over disjoint sets of anchors, so the trainer mines them over the global
batch exactly; and a batch form, `*_loss(labels, embeddings, ...)`.

s is the cosine similarity of the L2-normalized embeddings. Every log-sum-exp subtracts
its row's maximum (large β and small τ are common), in float32, and an empty set of
pairs gives 0 with a zero gradient, never NaN or inf.
"""

from __future__ import annotations

import tensorflow as tf

from losses import mining
from losses.distances import pairwise_distances
from losses.triplet import (
    TripletTerms,
    count_true,
    normalized,
    observed,
    validated_query_key,
    whole_batch,
)

_INF = float("inf")


def masked_logsumexp(values, mask) -> tf.Tensor:
    """log Σ_{j: mask} exp(values[i, j]) per row i; -inf for a row with an empty mask.

    The row's maximum is subtracted before exponentiating, and the gradient is finite
    (0 for an empty row).
    """
    has_any = tf.reduce_any(mask, axis=1)
    masked = tf.where(mask, values, -_INF)
    peak = tf.stop_gradient(tf.where(has_any, tf.reduce_max(masked, axis=1), 0.0))
    total = tf.reduce_sum(tf.where(mask, tf.exp(masked - peak[:, tf.newaxis]), 0.0), axis=1)
    return tf.where(has_any, peak + tf.math.log(tf.where(has_any, total, 1.0)), -_INF)


def _log1p_sum_exp(values, mask) -> tf.Tensor:
    """log(1 + Σ_{mask} exp(values)) per row, stably (0 for an empty row)."""
    return tf.math.softplus(masked_logsumexp(values, mask))


def _cosine_similarities(anchors, keys) -> tf.Tensor:
    return tf.matmul(
        tf.math.l2_normalize(anchors, axis=1), tf.math.l2_normalize(keys, axis=1), transpose_b=True
    )


def _closest_negatives(distances, negative):
    """Each anchor's closest negative (key index, -1 without one) and the distances of
    those that exist: what the trainer reports as the chosen negatives of these losses."""
    index, has_negative = mining.hardest_negative(distances, negative)
    chosen_d = mining.gather_rows(distances, index[:, tf.newaxis])[:, 0]
    return tf.where(has_negative, index, -1), observed(chosen_d, has_negative)


def _similarity_terms(similarities, masks, loss_sum, count, num_active, num_terms, positive):
    """TripletTerms of a similarity-based loss; monitoring uses 1 - s as the distance."""
    cosine_distances = 1.0 - tf.stop_gradient(similarities)
    chosen, negative_d = _closest_negatives(cosine_distances, masks.negative)
    return TripletTerms(
        loss_sum,
        count,
        num_active,
        num_terms,
        chosen,
        observed(cosine_distances, positive),
        negative_d,
    )


def check_positive(name: str, value) -> float:
    """`value` as a float if it is a number > 0; else raises, naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}.")
    return float(value)


def check_epsilon(epsilon) -> float | None:
    """Multi-similarity's `epsilon`: None (no pair mining) or a number >= 0."""
    if epsilon is None:
        return None
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0:
        raise ValueError(f"epsilon must be None or a number >= 0, got {epsilon!r}.")
    return float(epsilon)


def contrastive_terms(
    anchors,
    anchor_labels,
    anchor_positions,
    keys,
    key_labels,
    pos_margin=0.0,
    neg_margin=1.0,
    distance="euclidean",
) -> TripletTerms:
    """Positive pairs max(d - pos_margin, 0), negative pairs max(neg_margin - d, 0);
    the loss is the mean of the non-zero positive terms plus that of the non-zero
    negative terms: two parts, each with its own normalizer."""
    anchors, keys, masks = validated_query_key(
        anchors, anchor_labels, anchor_positions, keys, key_labels
    )
    distances = pairwise_distances(anchors, keys, distance)
    positive_losses = tf.where(masks.positive, tf.nn.relu(distances - pos_margin), 0.0)
    negative_losses = tf.where(masks.negative, tf.nn.relu(neg_margin - distances), 0.0)
    part_sums = tf.stack([tf.reduce_sum(positive_losses), tf.reduce_sum(negative_losses)])
    part_counts = tf.stack([count_true(positive_losses > 0.0), count_true(negative_losses > 0.0)])
    chosen, negative_d = _closest_negatives(distances, masks.negative)
    return TripletTerms(
        tf.reduce_sum(part_sums),
        tf.reduce_sum(part_counts),
        tf.reduce_sum(part_counts),
        count_true(masks.positive) + count_true(masks.negative),
        chosen,
        observed(distances, masks.positive),
        negative_d,
        part_sums,
        part_counts,
    )


def multi_similarity_terms(
    anchors,
    anchor_labels,
    anchor_positions,
    keys,
    key_labels,
    alpha=2.0,
    beta=50.0,
    base=0.5,
    epsilon=None,
) -> TripletTerms:
    """Per anchor (1/α)·log(1 + Σ_P exp(-α(s - base))) + (1/β)·log(1 + Σ_N exp(β(s - base))),
    normalized by the number of anchors. With `epsilon`, P keeps the positives with
    s - ε < the anchor's largest negative s, and N the negatives with s + ε > its
    smallest positive s (the paper's pair mining)."""
    alpha, beta = check_positive("alpha", alpha), check_positive("beta", beta)
    epsilon = check_epsilon(epsilon)
    anchors, keys, masks = validated_query_key(
        anchors, anchor_labels, anchor_positions, keys, key_labels
    )
    s = _cosine_similarities(anchors, keys)
    positive, negative = masks.positive, masks.negative
    if epsilon is not None:
        fixed = tf.stop_gradient(s)
        hardest_negative = tf.reduce_max(tf.where(negative, fixed, -_INF), axis=1, keepdims=True)
        hardest_positive = tf.reduce_min(tf.where(positive, fixed, _INF), axis=1, keepdims=True)
        positive = positive & (fixed - epsilon < hardest_negative)
        negative = negative & (fixed + epsilon > hardest_positive)
    per_anchor = (
        _log1p_sum_exp(-alpha * (s - base), positive) / alpha
        + _log1p_sum_exp(beta * (s - base), negative) / beta
    )
    num_anchors = tf.cast(tf.shape(s)[0], tf.float32)
    return _similarity_terms(
        s,
        masks._replace(negative=negative),
        tf.reduce_sum(per_anchor),
        num_anchors,
        count_true(per_anchor > 0.0),
        num_anchors,
        positive,
    )


def supcon_terms(
    anchors, anchor_labels, anchor_positions, keys, key_labels, temperature=0.1
) -> TripletTerms:
    """Per anchor with a positive: -(1/|P|)·Σ_P [s/τ - log Σ_{k ≠ anchor} exp(s_k/τ)],
    normalized by the anchors whose term is > 0. An anchor without a negative (a
    one-class batch) adds nothing."""
    temperature = check_positive("temperature", temperature)
    anchors, keys, masks = validated_query_key(
        anchors, anchor_labels, anchor_positions, keys, key_labels
    )
    s = _cosine_similarities(anchors, keys)
    logits = s / temperature
    others = masks.positive | masks.negative  # every key but the anchor's own slot
    denominator = masked_logsumexp(logits, others)
    has_both = tf.reduce_any(masks.positive, axis=1) & tf.reduce_any(masks.negative, axis=1)
    denominator = tf.where(has_both, denominator, 0.0)
    log_prob = tf.where(masks.positive, logits - denominator[:, tf.newaxis], 0.0)
    num_positives = tf.reduce_sum(tf.cast(masks.positive, tf.float32), axis=1)
    per_anchor = -tf.reduce_sum(log_prob, axis=1) / tf.maximum(num_positives, 1.0)
    per_anchor = tf.where(has_both, per_anchor, 0.0)
    nonzero = per_anchor > 0.0
    return _similarity_terms(
        s,
        masks,
        tf.reduce_sum(tf.where(nonzero, per_anchor, 0.0)),
        count_true(nonzero),
        count_true(nonzero),
        count_true(has_both),
        masks.positive,
    )


def ntxent_terms(
    anchors, anchor_labels, anchor_positions, keys, key_labels, temperature=0.07
) -> TripletTerms:
    """Per positive pair (i, p): -log(exp(s_ip/τ) / (exp(s_ip/τ) + Σ_{N_i} exp(s_in/τ))),
    computed as softplus(logsumexp_N(s/τ) - s_ip/τ); normalized by the positive pairs.
    Without a negative the term is 0."""
    temperature = check_positive("temperature", temperature)
    anchors, keys, masks = validated_query_key(
        anchors, anchor_labels, anchor_positions, keys, key_labels
    )
    s = _cosine_similarities(anchors, keys)
    logits = s / temperature
    negatives = masked_logsumexp(logits, masks.negative)
    per_pair = tf.where(masks.positive, tf.math.softplus(negatives[:, tf.newaxis] - logits), 0.0)
    num_pairs = count_true(masks.positive)
    return _similarity_terms(
        s,
        masks,
        tf.reduce_sum(per_pair),
        num_pairs,
        count_true(per_pair > 0.0),
        num_pairs,
        masks.positive,
    )


def contrastive_loss(labels, embeddings, pos_margin=0.0, neg_margin=1.0, distance="euclidean"):
    """Contrastive loss of one batch (pytorch-metric-learning's `ContrastiveLoss`)."""
    return normalized(
        contrastive_terms(
            *whole_batch(labels, embeddings),
            pos_margin=pos_margin,
            neg_margin=neg_margin,
            distance=distance,
        )
    )


def multi_similarity_loss(labels, embeddings, alpha=2.0, beta=50.0, base=0.5, epsilon=None):
    """Multi-similarity loss of one batch (pytorch-metric-learning's
    `MultiSimilarityLoss`; with `epsilon`, after its `MultiSimilarityMiner`)."""
    return normalized(
        multi_similarity_terms(
            *whole_batch(labels, embeddings), alpha=alpha, beta=beta, base=base, epsilon=epsilon
        )
    )


def supcon_loss(labels, embeddings, temperature=0.1):
    """Supervised contrastive loss of one batch (pytorch-metric-learning's `SupConLoss`)."""
    return normalized(supcon_terms(*whole_batch(labels, embeddings), temperature=temperature))


def ntxent_loss(labels, embeddings, temperature=0.07):
    """NT-Xent / InfoNCE loss of one batch (pytorch-metric-learning's `NTXentLoss`)."""
    return normalized(ntxent_terms(*whole_batch(labels, embeddings), temperature=temperature))
