"""Proxy and margin-softmax losses (losses/proxies.py) against numpy loops written from
the definitions (pytorch-metric-learning 2.9's formulation: arccos for the angular
margins), their gradients against numeric differentiation of those loops, and their
behaviour where arccos breaks down (cosine exactly ±1) at scale 64."""

import math

import numpy as np
import pytest
import tensorflow as tf

import losses


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def log_softmax_at(logits, index):
    top = max(logits)
    return logits[index] - top - math.log(sum(math.exp(v - top) for v in logits))


def ref_proxy_nca(e, y, p, softmax_scale=1.0):
    e, p = unit(e), unit(p)
    total, kept = 0.0, 0
    for i in range(len(e)):
        logits = [-softmax_scale * float(np.sum((e[i] - p[c]) ** 2)) for c in range(len(p))]
        probability = math.exp(log_softmax_at(logits, y[i]))
        if probability > 0:
            total, kept = total - math.log(probability), kept + 1
    return total / kept


def ref_proxy_anchor(e, y, p, margin=0.1, alpha=32.0):
    e, p = unit(e), unit(p)
    positive_sum, with_positives, negative_sum = 0.0, 0, 0.0
    for c in range(len(p)):
        positives = [i for i in range(len(e)) if y[i] == c]
        negatives = [i for i in range(len(e)) if y[i] != c]
        if positives:
            with_positives += 1
            positive_sum += math.log(
                1 + sum(math.exp(-alpha * (e[i] @ p[c] - margin)) for i in positives)
            )
        negative_sum += math.log(
            1 + sum(math.exp(alpha * (e[i] @ p[c] + margin)) for i in negatives)
        )
    return positive_sum / with_positives + negative_sum / len(p)


def arc(margin_degrees):
    m = math.radians(margin_degrees)

    def modify(t):
        angle = math.acos(min(max(t, -1.0), 1.0))
        return math.cos(angle + m) if angle <= math.pi - m else t - m * math.sin(m)

    return modify


def ref_margin_softmax(e, y, centres, scale, modify, k=1):
    e, centres = unit(e), unit(centres)
    classes = len(centres) // k
    total = 0.0
    for i in range(len(e)):
        cos = [max(e[i] @ centres[c * k + j] for j in range(k)) for c in range(classes)]
        logits = list(cos)
        logits[y[i]] = modify(cos[y[i]])
        total -= log_softmax_at([scale * v for v in logits], y[i])
    return total / len(e)


def ref_arcface(e, y, c, margin=28.6, scale=64.0):
    return ref_margin_softmax(e, y, c, scale, arc(margin))


def ref_cosface(e, y, c, margin=0.35, scale=64.0):
    return ref_margin_softmax(e, y, c, scale, lambda t: t - margin)


def ref_subcenter(e, y, c, sub_centers=3, margin=28.6, scale=64.0):
    return ref_margin_softmax(e, y, c, scale, arc(margin), sub_centers)


CASES = {
    # name: (function, reference, rows of centres per class, settings)
    "proxy_nca": (losses.proxy_nca_loss, ref_proxy_nca, 1, {}),
    "proxy_nca_scale_9": (losses.proxy_nca_loss, ref_proxy_nca, 1, {"softmax_scale": 9.0}),
    "proxy_anchor": (losses.proxy_anchor_loss, ref_proxy_anchor, 1, {}),
    "proxy_anchor_wide": (
        losses.proxy_anchor_loss, ref_proxy_anchor, 1, {"margin": 0.3, "alpha": 8.0}
    ),
    "arcface": (losses.arcface_loss, ref_arcface, 1, {}),
    "arcface_small": (losses.arcface_loss, ref_arcface, 1, {"margin": 10.0, "scale": 16.0}),
    "cosface": (losses.cosface_loss, ref_cosface, 1, {}),
    "subcenter_arcface": (losses.subcenter_arcface_loss, ref_subcenter, 3, {}),
    "subcenter_arcface_2": (losses.subcenter_arcface_loss, ref_subcenter, 2, {"sub_centers": 2}),
}  # fmt: skip


def inputs(rows_per_class, batch=12, dim=8, classes=6, seed=0):
    """Labels leave class 5 without examples (Proxy-Anchor's proxies without positives);
    row 0 sits opposite its class's (first) centre: angle π, ArcFace's fallback."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes - 1, size=batch)
    centres = rng.normal(size=(classes * rows_per_class, dim))
    embeddings = rng.normal(size=(batch, dim))
    embeddings[0] = -centres[labels[0] * rows_per_class] * 2.5
    return embeddings, labels, centres


@pytest.mark.parametrize("name", CASES)
def test_the_loss_equals_its_definition(name):
    function, reference, rows, settings = CASES[name]
    e, y, c = inputs(rows)
    got = float(function(e.astype(np.float32), y, c.astype(np.float32), **settings))
    assert got == pytest.approx(reference(e, y, c, **settings), rel=2e-5, abs=1e-5)


def numeric_gradient(f, x, eps=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += eps
        down[index] -= eps
        grad[index] = (f(up) - f(down)) / (2 * eps)
    return grad


@pytest.mark.parametrize("name", CASES)
def test_gradients_to_embeddings_and_centres_equal_the_definitions(name):
    function, reference, rows, settings = CASES[name]
    e, y, c = inputs(rows, batch=8, dim=5, classes=4, seed=1)
    e[0] = -c[y[0] * rows] * 1.5 + 0.01  # near, not at, the fallback's switch
    embeddings, centres = tf.Variable(e.astype(np.float32)), tf.Variable(c.astype(np.float32))
    with tf.GradientTape() as tape:
        value = function(embeddings, y, centres, **settings)
    got_e, got_c = tape.gradient(value, [embeddings, centres])
    want_e = numeric_gradient(lambda x: reference(x, y, c, **settings), e)
    want_c = numeric_gradient(lambda x: reference(e, y, x, **settings), c)
    for got, want in ((got_e, want_e), (got_c, want_c)):
        scale = max(np.abs(want).max(), 1e-3)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-3, atol=2e-4 * scale)


@pytest.mark.parametrize("name", CASES)
def test_cosines_of_exactly_one_and_minus_one_stay_finite_at_scale_64(name):
    """Embeddings exactly on a centre (cos 1, where d arccos/dt is infinite), exactly
    opposite (cos -1) and a zero embedding: loss and gradients finite."""
    function, _, rows, settings = CASES[name]
    c = np.eye(4, 6, dtype=np.float32).repeat(rows, axis=0)  # sub-centres repeated
    e = np.stack([c[0], -c[rows], np.zeros(6, np.float32), c[3 * rows] * 3])
    y = np.array([0, 1, 2, 3])
    embeddings, centres = tf.Variable(e), tf.Variable(c)
    with tf.GradientTape() as tape:
        value = function(embeddings, y, centres, **settings)
    grads = tape.gradient(value, [embeddings, centres])
    assert np.isfinite(value.numpy())
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)


def test_bad_settings_and_inputs_are_named():
    e, y, c = inputs(1)
    e, c = e.astype(np.float32), c.astype(np.float32)
    with pytest.raises(ValueError, match="scale must be a number > 0, got 0"):
        losses.arcface_loss(e, y, c, scale=0)
    with pytest.raises(ValueError, match="margin must be a number >= 0, got -0.1"):
        losses.cosface_loss(e, y, c, margin=-0.1)
    with pytest.raises(ValueError, match="alpha must be a number > 0"):
        losses.proxy_anchor_loss(e, y, c, alpha=-1)
    with pytest.raises(ValueError, match="sub_centers must be a whole number >= 1, got 0"):
        losses.subcenter_arcface_loss(e, y, c, sub_centers=0)
    with pytest.raises(ValueError, match="centres have 6 rows, not a multiple of sub_centers=4"):
        losses.subcenter_arcface_loss(e, y, c, sub_centers=4)
    with pytest.raises(ValueError, match="embeddings of width 8 against centres of width 7"):
        losses.arcface_loss(e, y, c[:, :7])
    with pytest.raises(tf.errors.InvalidArgumentError, match="a label >= the number of classes"):
        losses.arcface_loss(e, np.full(len(e), 6), c)


def test_float16_embeddings_are_computed_in_float32():
    e, y, c = inputs(1)
    half = losses.arcface_loss(e.astype(np.float16), y, c.astype(np.float32))
    assert half.dtype == tf.float32
    assert float(half) == pytest.approx(ref_arcface(e.astype(np.float16), y, c), rel=1e-3)
