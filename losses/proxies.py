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

Each loss is also written for a *block* of the centres (`proxy_loss_block`): the rows of
classes [first_class, first_class + n) against the whole batch, with the sums over the
other blocks supplied by `reduce_sum` / `reduce_max` callables. The trainer holds one
block per replica and passes all-reduces; on one device they are identities and the
block is the whole matrix, which is how the functions here compute. The block form
gives the loss's value and a surrogate whose gradient (to the embeddings and to the
block's centres) is the block's exact share of the loss's gradient, so no collective is
differentiated. Only per-example vectors (and a scalar) cross blocks, never logits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import tensorflow as tf

from losses.pairs import masked_logsumexp


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _inputs(embeddings, labels, centres, rows_per_class: int = 1):
    """float32 unit embeddings (B, D) and centres (C·k, D), int32 labels (B,), checked
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


SOFTMAX_LOSSES = ("proxy_nca", "arcface", "cosface", "subcenter_arcface")
PROXY_LOSSES = ("proxy_anchor", *SOFTMAX_LOSSES)


class ProxyBlock(NamedTuple):
    """A block's part of a proxy loss: `value` is the whole loss (the same in every
    block); the gradient of `surrogate` is this block's share of the loss's gradient
    (summed over blocks it is the gradient of `value`)."""

    value: tf.Tensor
    surrogate: tf.Tensor


def _identity(value):
    return value


def checked_options(loss_name: str, **options) -> dict:
    """The options of `loss_name` with PML's defaults, each checked (ValueError naming it)."""
    _check(loss_name in PROXY_LOSSES, f"unknown proxy loss {loss_name!r}; one of {PROXY_LOSSES}")
    defaults = {
        "proxy_nca": {"softmax_scale": 1.0},
        "proxy_anchor": {"margin": 0.1, "alpha": 32.0},
        "arcface": {"margin": 28.6, "scale": 64.0},
        "cosface": {"margin": 0.35, "scale": 64.0},
        "subcenter_arcface": {"sub_centers": 3, "margin": 28.6, "scale": 64.0},
    }[loss_name]
    unknown = sorted(set(options) - set(defaults))
    _check(not unknown, f"{loss_name} takes no option {', '.join(unknown)}")
    options = {**defaults, **options}
    for name, value in options.items():
        if name == "sub_centers":
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"sub_centers must be a whole number >= 1, got {value!r}",
            )
        elif name == "margin":
            options[name] = _non_negative(value, name)
        else:
            options[name] = _positive(value, name)
    return options


def rows_per_class(loss_name: str, options: dict) -> int:
    """Rows of the centre matrix per class: `sub_centers` for SubCenterArcFace, else 1."""
    return options.get("sub_centers", 1) if loss_name == "subcenter_arcface" else 1


def proxy_loss_block(
    loss_name: str,
    embeddings,
    labels,
    centres,
    first_class,
    num_classes,
    options: dict,
    reduce_sum=_identity,
    reduce_max=_identity,
    kept=None,
) -> ProxyBlock:
    """`loss_name`'s loss of the batch (embeddings (B, D), labels (B,) in [0, C)) for the
    block of centres of classes [first_class, first_class + n) (rows c·k … c·k+k−1 each).

    `reduce_sum` / `reduce_max` combine a tensor over all blocks (elementwise; identity:
    this block is all of them). `kept` (n,) bool: the block's classes that take part in
    the softmax (Partial FC sampling; see `sampled_classes`); a class with a positive in
    the batch must be kept. `options` come from `checked_options`.
    """
    k = rows_per_class(loss_name, options)
    e, labels, c, block_classes = _inputs(embeddings, labels, centres, k)
    checks = [
        tf.debugging.assert_non_negative(labels, message="class labels must be >= 0"),
        tf.debugging.assert_less(
            labels, num_classes, message="a label >= the number of classes (of centres)"
        ),
    ]
    with tf.control_dependencies(checks):
        local = tf.cast(labels, tf.int32) - tf.cast(first_class, tf.int32)
    if loss_name == "proxy_anchor":
        _check(kept is None, "proxy_anchor takes every proxy (no sampling)")
        return _proxy_anchor_block(e, labels, local, c, block_classes, num_classes, options,
                                   reduce_sum)  # fmt: skip
    in_block = (local >= 0) & (local < block_classes)
    if kept is not None:
        # Only the kept classes' centres are multiplied: the saving of Partial FC.
        kept_index = tf.cast(tf.where(kept)[:, 0], tf.int32)
        column = tf.cumsum(tf.cast(kept, tf.int32)) - 1  # block class -> kept column
        local = tf.where(
            in_block, tf.gather(column, tf.clip_by_value(local, 0, block_classes - 1)), -1
        )
        c = tf.gather(tf.reshape(c, [block_classes, k, -1]), kept_index)
        c = tf.reshape(c, [-1, tf.shape(e)[1]])
        block_classes = tf.size(kept_index)
    local = tf.where(in_block, local, -1)
    logits = _block_logits(loss_name, e, local, c, block_classes, options)
    return _softmax_block(loss_name, logits, local, reduce_sum, reduce_max)


def _block_logits(loss_name, e, local, c, block_classes, options):
    """(B, n) logits of the block's classes; the target class's (local label, -1 when
    it is in another block) with its margin."""
    cosines = tf.matmul(e, c, transpose_b=True)
    if loss_name == "proxy_nca":
        return -options["softmax_scale"] * tf.maximum(2.0 - 2.0 * cosines, 0.0)
    if loss_name == "subcenter_arcface":
        k = options["sub_centers"]
        cosines = tf.reduce_max(tf.reshape(cosines, [tf.shape(e)[0], block_classes, k]), axis=2)
    modify = (
        (lambda t: t - options["margin"])
        if loss_name == "cosface"
        else _arc_margin(options["margin"])
    )
    is_target = tf.one_hot(local, block_classes)  # a zero row: the target is elsewhere
    target = tf.reduce_sum(cosines * is_target, axis=1)  # (a block may have no column)
    logits = cosines + is_target * (modify(target) - target)[:, None]
    return options["scale"] * logits


def _softmax_block(loss_name, logits, local, reduce_sum, reduce_max) -> ProxyBlock:
    """Cross-entropy at the target over all blocks' logits, from per-example vectors:
    the maximum, the sum of exponentials and the target logit."""
    target = tf.one_hot(local, tf.shape(logits)[1])  # a zero row when not in this block
    # A -_LARGE column: a block with no kept class has that as its maximum.
    floor = tf.fill([tf.shape(logits)[0], 1], -_LARGE)
    local_peak = tf.reduce_max(tf.concat([logits, floor], axis=1), axis=1)
    peak = tf.stop_gradient(reduce_max(local_peak))  # any common shift is exact
    exps = tf.exp(logits - peak[:, None])
    total = reduce_sum(tf.reduce_sum(exps, axis=1))
    target_logit = reduce_sum(tf.reduce_sum(target * logits, axis=1))
    per_example = peak + tf.math.log(total) - target_logit
    if loss_name == "proxy_nca":
        # As PML: an anchor whose probability underflows to 0 is left out of the mean.
        counted = tf.cast(tf.exp(-per_example) > 0.0, tf.float32)
    else:
        counted = tf.ones_like(per_example)
    weights = tf.stop_gradient(tf.math.divide_no_nan(counted, tf.reduce_sum(counted)))
    value = tf.reduce_sum(weights * per_example)
    share = tf.stop_gradient((exps / total[:, None] - target) * weights[:, None])
    return ProxyBlock(tf.stop_gradient(value), tf.reduce_sum(share * logits))


def _proxy_anchor_block(e, labels, local, c, block_classes, num_classes, options, reduce_sum):
    alpha, delta = options["alpha"], options["margin"]
    cos = tf.matmul(c, e, transpose_b=True)  # (n, B): one row per proxy
    positive = tf.transpose(tf.one_hot(local, block_classes, on_value=True, off_value=False))
    positive_terms = tf.math.softplus(masked_logsumexp(-alpha * (cos - delta), positive))
    negative_terms = tf.math.softplus(masked_logsumexp(alpha * (cos + delta), ~positive))
    # The proxies with a positive, over all blocks: the batch's distinct labels.
    with_positives = tf.cast(tf.size(tf.unique(labels).y), tf.float32)
    share = tf.reduce_sum(positive_terms) / with_positives + tf.reduce_sum(
        negative_terms
    ) / tf.cast(num_classes, tf.float32)
    return ProxyBlock(tf.stop_gradient(reduce_sum(share)), share)


_LARGE = 1e30


def _whole(loss_name: str, embeddings, labels, centres, **options) -> tf.Tensor:
    """The loss over all the centres, with its gradient (one block on one device)."""
    options = checked_options(loss_name, **options)
    k = rows_per_class(loss_name, options)
    centres = tf.convert_to_tensor(centres)
    num_classes = tf.shape(centres)[0] // k
    return differentiable(
        proxy_loss_block(loss_name, embeddings, labels, centres, 0, num_classes, options)
    )


def differentiable(block: ProxyBlock) -> tf.Tensor:
    """A block that is the whole loss (one device) as a tensor: its value, with its
    surrogate's gradient."""
    return block.value + block.surrogate - tf.stop_gradient(block.surrogate)


def proxy_nca_loss(embeddings, labels, proxies, softmax_scale=1.0) -> tf.Tensor:
    """ProxyNCA: −log softmax over proxies of −softmax_scale · |e − p|² (unit vectors), at
    the anchor's own proxy; mean over anchors. As PML, an anchor whose probability
    underflows to 0 in float32 is left out of the mean."""
    return _whole("proxy_nca", embeddings, labels, proxies, softmax_scale=softmax_scale)


def proxy_anchor_loss(embeddings, labels, proxies, margin=0.1, alpha=32.0) -> tf.Tensor:
    """Proxy-Anchor (Kim et al., 2020): for each proxy p with positives P_p,
    log(1 + Σ_{x∈P_p} exp(−α (s(x, p) − δ))), averaged over the proxies that have
    positives; plus, for every proxy, log(1 + Σ_{x∉P_p} exp(α (s(x, p) + δ))), averaged
    over all C proxies. s is the cosine similarity."""
    return _whole("proxy_anchor", embeddings, labels, proxies, margin=margin, alpha=alpha)


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
    return _whole("arcface", embeddings, labels, centres, margin=margin, scale=scale)


def cosface_loss(embeddings, labels, centres, margin=0.35, scale=64.0) -> tf.Tensor:
    """CosFace (Wang et al., 2018): softmax cross-entropy of scale · cos, with `margin`
    taken off the target class's cosine."""
    return _whole("cosface", embeddings, labels, centres, margin=margin, scale=scale)


def subcenter_arcface_loss(
    embeddings, labels, centres, sub_centers=3, margin=28.6, scale=64.0
) -> tf.Tensor:
    """Sub-center ArcFace (Deng et al., 2020): ArcFace on each class's closest of its
    `sub_centers` centres (rows c·k … c·k+k−1 of `centres`)."""
    return _whole(
        "subcenter_arcface", embeddings, labels, centres,
        sub_centers=sub_centers, margin=margin, scale=scale,
    )  # fmt: skip


def sampled_classes(class_ids, labels, sample_rate: float, seed, step) -> tf.Tensor:
    """Partial FC's draw: which of `class_ids` take part in this step's softmax. Every
    class with an example among `labels` (the global batch), and each other class with
    probability `sample_rate`, by a hash of (seed, step, class id): the same draw
    whichever block (replica) holds the class."""
    class_ids = tf.cast(class_ids, tf.int32)
    positive = tf.reduce_any(
        tf.equal(class_ids[:, None], tf.cast(tf.reshape(labels, [1, -1]), tf.int32)), axis=1
    )
    return positive | (class_uniform(class_ids, seed, step) < sample_rate)


def class_uniform(class_ids, seed, step) -> tf.Tensor:
    """A uniform number in [0, 1) per class id, fixed by (seed, step, id): murmur3's
    32-bit finalizer over the mixed inputs (uint32 arithmetic wraps)."""
    mix = tf.cast(seed, tf.uint32) * tf.constant(0x9E3779B1, tf.uint32) + tf.cast(
        step, tf.uint32
    ) * tf.constant(0x85EBCA77, tf.uint32)
    h = tf.cast(class_ids, tf.uint32) * tf.constant(0xC2B2AE3D, tf.uint32) + mix
    for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, shift))
        h = h * tf.constant(factor, tf.uint32)
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))
    return tf.cast(tf.bitwise.right_shift(h, 8), tf.float32) / float(1 << 24)


def initial_centres(first_class: int, end_class: int, rows: int, dim: int, seed: int):
    """Rows of classes [first_class, end_class) of a (C·rows, dim) centre matrix drawn
    N(0, 1/dim) (unit length on average), the same whatever the block: drawn by chunks
    of classes, each chunk from its own (seed, chunk) stream."""
    chunk = 4096
    parts = []
    for index in range(first_class // chunk, (max(end_class, first_class + 1) - 1) // chunk + 1):
        drawn = tf.random.stateless_normal(
            [chunk * rows, dim], seed=[seed, index], stddev=dim**-0.5
        )
        lo = max(first_class, index * chunk) - index * chunk
        hi = min(end_class, (index + 1) * chunk) - index * chunk
        parts.append(drawn[lo * rows : hi * rows])
    if end_class <= first_class:
        return tf.zeros([0, dim])
    return tf.concat(parts, axis=0)
