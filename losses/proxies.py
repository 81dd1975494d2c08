"""Proxy and margin-softmax losses: one learned centre (or k sub-centres) per class.

pytorch-metric-learning 2.9's semantics and defaults, as functions of
(embeddings, labels, centres) in PML's argument order. Centres are laid out (C, D), one
row per class; SubCenterArcFace's are (C·k, D), class c's sub-centres at rows
c·k … c·k+k−1. Embeddings and centres are L2-normalized first (PML's distances do the
same), everything is float32, and each function returns the mean loss with gradients to
both the embeddings and the centres.

Stable at the usual scale 64: cross-entropies and log-sum-exps subtract their maximum,
and ArcFace's cos(θ + m) is cos θ · cos m − sin θ · sin m with sin θ = sqrt(1 − cos² θ)
floored away from 0, so a cosine of exactly ±1 (an embedding on its centre) gives a
finite gradient where arccos would give an infinite one.
"""

from __future__ import annotations

import math

import tensorflow as tf

from losses.pairs import masked_logsumexp


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _inputs(embeddings, labels, centres, rows_per_class: int = 1):
    """float32 embeddings (B, D) and centres (C·k, D), int32 labels (B,), all checked
    against each other; returns (embeddings, labels, centres, number of classes)."""
    embeddings = tf.convert_to_tensor(embeddings)
    centres = tf.convert_to_tensor(centres)
    _check(embeddings.shape.rank == 2, f"embeddings must be (batch, dim), got {embeddings.shape}")
    _check(centres.shape.rank == 2, f"centres must be (classes, dim), got {centres.shape}")
    _check(
        embeddings.shape[1] is None or centres.shape[1] is None
        or embeddings.shape[1] == centres.shape[1],
        f"embeddings of width {embeddings.shape[1]} against centres of width {centres.shape[1]}",
    )  # fmt: skip
    rows = centres.shape[0]
    if rows is not None:
        _check(
            rows % rows_per_class == 0,
            f"centres have {rows} rows, not a multiple of sub_centers={rows_per_class}",
        )
    classes = tf.shape(centres)[0] // rows_per_class
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    checks = [
        tf.debugging.assert_non_negative(labels, message="class labels must be >= 0"),
        tf.debugging.assert_less(labels, classes, message="a label >= the classes of centres"),
    ]
    with tf.control_dependencies(checks):
        labels = tf.identity(labels)
    unit_embeddings = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=1)
    unit_centres = tf.math.l2_normalize(tf.cast(centres, tf.float32), axis=1)
    return unit_embeddings, labels, unit_centres, classes


def _positive(value, name: str) -> float:
    _check(
        isinstance(value, int | float) and value > 0, f"{name} must be a number > 0, got {value!r}"
    )
    return float(value)


def _non_negative(value, name: str) -> float:
    _check(
        isinstance(value, int | float) and value >= 0,
        f"{name} must be a number >= 0, got {value!r}",
    )
    return float(value)


def proxy_nca_loss(embeddings, labels, proxies, softmax_scale=1.0) -> tf.Tensor:
    """ProxyNCA: −log softmax over proxies of −softmax_scale · |e − p|² (unit vectors), at
    the anchor's own proxy; mean over anchors. As PML, an anchor whose probability
    underflows to 0 in float32 is left out of the mean."""
    scale = _positive(softmax_scale, "softmax_scale")
    e, labels, p, _ = _inputs(embeddings, labels, proxies)
    squared = tf.maximum(2.0 - 2.0 * tf.matmul(e, p, transpose_b=True), 0.0)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, -scale * squared)
    kept = tf.exp(-losses) > 0.0
    return tf.math.divide_no_nan(
        tf.reduce_sum(tf.where(kept, losses, 0.0)), tf.reduce_sum(tf.cast(kept, tf.float32))
    )


def proxy_anchor_loss(embeddings, labels, proxies, margin=0.1, alpha=32.0) -> tf.Tensor:
    """Proxy-Anchor (Kim et al., 2020): for each proxy p with positives P_p,
    log(1 + Σ_{x∈P_p} exp(−α (s(x, p) − δ))), averaged over the proxies that have
    positives; plus, for every proxy, log(1 + Σ_{x∉P_p} exp(α (s(x, p) + δ))), averaged
    over all C proxies. s is the cosine similarity."""
    delta = _non_negative(margin, "margin")
    alpha = _positive(alpha, "alpha")
    e, labels, p, classes = _inputs(embeddings, labels, proxies)
    cos = tf.matmul(p, e, transpose_b=True)  # (C, B): one row per proxy
    positive = tf.transpose(tf.one_hot(labels, classes, on_value=True, off_value=False))
    positive_terms = tf.math.softplus(masked_logsumexp(-alpha * (cos - delta), positive))
    negative_terms = tf.math.softplus(masked_logsumexp(alpha * (cos + delta), ~positive))
    with_positives = tf.reduce_sum(tf.cast(tf.reduce_any(positive, axis=1), tf.float32))
    return tf.math.divide_no_nan(tf.reduce_sum(positive_terms), with_positives) + (
        tf.reduce_sum(negative_terms) / tf.cast(classes, tf.float32)
    )


def _margin_softmax(cosines, labels, scale: float, modify) -> tf.Tensor:
    """Mean cross-entropy of scale · cosines, the target class's cosine t replaced by
    modify(t)."""
    target = tf.gather(cosines, labels, batch_dims=1)
    shifted = modify(target) - target
    logits = cosines + tf.one_hot(labels, tf.shape(cosines)[1]) * shifted[:, None]
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, scale * logits))


def _arc_margin(margin_degrees: float):
    """t = cos θ -> cos(θ + m) while θ <= π − m, else cos θ − m · sin m (PML's fallback,
    which keeps the logit decreasing in θ)."""
    m = math.radians(margin_degrees)

    def modify(t):
        sine = tf.sqrt(tf.maximum(1.0 - tf.square(t), 1e-12))
        return tf.where(
            t >= -math.cos(m), t * math.cos(m) - sine * math.sin(m), t - m * math.sin(m)
        )

    return modify


def arcface_loss(embeddings, labels, centres, margin=28.6, scale=64.0) -> tf.Tensor:
    """ArcFace (Deng et al., 2019): softmax cross-entropy of scale · cos, with the target
    class's angle widened by `margin` degrees."""
    margin = _non_negative(margin, "margin")
    scale = _positive(scale, "scale")
    e, labels, c, _ = _inputs(embeddings, labels, centres)
    cosines = tf.matmul(e, c, transpose_b=True)
    return _margin_softmax(cosines, labels, scale, _arc_margin(margin))


def cosface_loss(embeddings, labels, centres, margin=0.35, scale=64.0) -> tf.Tensor:
    """CosFace (Wang et al., 2018): softmax cross-entropy of scale · cos, with `margin`
    taken off the target class's cosine."""
    margin = _non_negative(margin, "margin")
    scale = _positive(scale, "scale")
    e, labels, c, _ = _inputs(embeddings, labels, centres)
    cosines = tf.matmul(e, c, transpose_b=True)
    return _margin_softmax(cosines, labels, scale, lambda t: t - margin)


def subcenter_arcface_loss(
    embeddings, labels, centres, sub_centers=3, margin=28.6, scale=64.0
) -> tf.Tensor:
    """Sub-center ArcFace (Deng et al., 2020): ArcFace on each class's closest of its
    `sub_centers` centres (rows c·k … c·k+k−1 of `centres`)."""
    _check(
        isinstance(sub_centers, int) and not isinstance(sub_centers, bool) and sub_centers >= 1,
        f"sub_centers must be a whole number >= 1, got {sub_centers!r}",
    )
    margin = _non_negative(margin, "margin")
    scale = _positive(scale, "scale")
    e, labels, c, classes = _inputs(embeddings, labels, centres, sub_centers)
    cosines = tf.matmul(e, c, transpose_b=True)
    cosines = tf.reduce_max(tf.reshape(cosines, [tf.shape(e)[0], classes, sub_centers]), axis=2)
    return _margin_softmax(cosines, labels, scale, _arc_margin(margin))
