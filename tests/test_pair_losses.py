"""Contrastive, multi-similarity, SupCon and NT-Xent against numpy loops written from
their definitions (pytorch-metric-learning 2.9 semantics), finite differences, the
query/key split, numerical edge cases, the Keras classes and bad options."""

import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import losses
from tests import reference
from tests.test_losses import KINDS, make_batch

FUNCTIONS = {
    "contrastive": (losses.contrastive_loss, reference.contrastive, losses.contrastive_terms),
    "multi_similarity": (
        losses.multi_similarity_loss,
        reference.multi_similarity,
        losses.multi_similarity_terms,
    ),
    "supcon": (losses.supcon_loss, reference.supcon, losses.supcon_terms),
    "ntxent": (losses.ntxent_loss, reference.ntxent, losses.ntxent_terms),
}

VARIANTS = [
    ("contrastive", {}),
    ("contrastive", {"pos_margin": 0.25, "neg_margin": 2.0, "distance": "squared_euclidean"}),
    ("contrastive", {"pos_margin": 0.05, "neg_margin": 0.6, "distance": "cosine"}),
    ("multi_similarity", {}),
    ("multi_similarity", {"alpha": 1.0, "beta": 20.0, "base": 0.2}),
    ("multi_similarity", {"epsilon": 0.1}),
    ("supcon", {}),
    ("supcon", {"temperature": 0.5}),
    ("ntxent", {}),
    ("ntxent", {"temperature": 0.5}),
]
IDS = [
    f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'defaults'}" for name, kw in VARIANTS
]


def value_and_gradient(fn, labels, x, **kw):
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        value = fn(labels, xt, **kw)
    return value, tape.gradient(value, xt)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_matches_numpy_reference(name, kw, kind):
    fn, ref, _ = FUNCTIONS[name]
    labels, x = make_batch(kind, seed=zlib.crc32(f"{name}{kw}{kind}".encode()) % 1000)
    if kind == "duplicates" and name == "contrastive" and kw.get("pos_margin", 0.0) == 0.0:
        # In float32 a duplicate's distance is ~1e-4, not 0, so it counts as a non-zero
        # positive term where float64 has none: compare with a margin that hides it.
        kw = {**kw, "pos_margin": 0.01}
    got = float(fn(labels, x, **kw))
    want = ref(labels, x, **kw)
    tol = 2e-3 if kind == "duplicates" else 1e-4
    assert got == pytest.approx(want, rel=tol, abs=tol)
    if kind == "pk":
        assert want > 0  # the comparison is not vacuous


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_gradient_matches_finite_differences_of_reference(name, kw):
    fn, ref, _ = FUNCTIONS[name]
    labels, x = make_batch("pk", seed=3, dim=4)
    _, grad = value_and_gradient(fn, labels, x, **kw)
    numeric = reference.numeric_gradient(lambda z: ref(labels, z, **kw), x, eps=1e-5)
    scale = np.abs(numeric).max()
    np.testing.assert_allclose(grad.numpy(), numeric, rtol=2e-3, atol=2e-3 * max(scale, 1.0))
    assert scale > 1e-3  # the loss is active, so the check is not vacuous


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_query_key_terms_add_up_to_the_whole_batch(name, kw):
    """Disjoint anchor sets mined against all keys, their sums and counts added (per
    part for the contrastive loss), equal the batch loss: what global mining relies on."""
    fn, _, terms_fn = FUNCTIONS[name]
    labels, x = make_batch("singletons", seed=5)
    parts = [
        terms_fn(x[r], labels[r], r, x, labels, **kw) for r in (np.arange(5), np.arange(5, 12))
    ]
    if parts[0].part_sums is not None:
        sums = sum(p.part_sums for p in parts)
        counts = sum(p.part_counts for p in parts)
        total = float(tf.reduce_sum(tf.math.divide_no_nan(sums, counts)))
    else:
        total = float(sum(p.loss_sum for p in parts) / sum(p.count for p in parts))
    assert total == pytest.approx(float(fn(labels, x, **kw)), rel=1e-6)
    assert total > 0


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_no_nan_with_duplicates_zero_vectors_and_one_class(name, kw):
    fn = FUNCTIONS[name][0]
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    x = np.zeros((8, 3), np.float32)
    x[3] = x[4] = x[0] = [1.0, 2.0, 3.0]  # duplicates across and within classes
    x[6] = [0.5, 0.0, 0.0]
    for batch_labels in (labels, np.zeros(8, np.int64), np.arange(8)):
        value, grad = value_and_gradient(fn, batch_labels, x, **kw)
        assert np.isfinite(value.numpy()), batch_labels
        assert np.all(np.isfinite(grad.numpy())), batch_labels


@pytest.mark.parametrize("name", ["supcon", "ntxent"])
def test_no_positive_or_no_negative_pair_gives_zero(name):
    fn = FUNCTIONS[name][0]
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    assert float(fn(np.arange(6), x)) == 0.0
    assert float(fn(np.zeros(6, np.int64), x)) == 0.0


def test_large_beta_and_small_temperature_stay_finite_and_exact():
    labels, x = make_batch("pk", seed=9)
    x[1] = x[0] * 3.0  # a duplicate direction: s = 1 exactly
    cases = [
        (losses.multi_similarity_loss, reference.multi_similarity, {"beta": 1000.0, "alpha": 50.0}),
        (losses.supcon_loss, reference.supcon, {"temperature": 0.005}),
        (losses.ntxent_loss, reference.ntxent, {"temperature": 0.005}),
    ]
    for fn, ref, kw in cases:
        value, grad = value_and_gradient(fn, labels, x, **kw)
        assert np.isfinite(value.numpy()) and np.all(np.isfinite(grad.numpy())), fn.__name__
        assert float(value) == pytest.approx(ref(labels, x, **kw), rel=1e-3), fn.__name__


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_low_precision_embeddings_give_a_float32_loss(name, dtype):
    fn = FUNCTIONS[name][0]
    labels, x = make_batch("pk", seed=4)
    value = fn(labels, tf.cast(x, dtype))
    assert value.dtype == tf.float32
    want = fn(labels, tf.cast(tf.cast(x, dtype), tf.float32))
    assert float(value) == float(want)


CLASSES = [
    (
        losses.ContrastiveLoss,
        {"pos_margin": 0.1, "neg_margin": 0.8, "distance": "L2"},
        "contrastive",
    ),
    (losses.MultiSimilarityLoss, {"alpha": 1.5, "beta": 30.0, "epsilon": 0.2}, "multi_similarity"),
    (losses.SupConLoss, {"temperature": 0.2}, "supcon"),
    (losses.NTXentLoss, {"temperature": 0.1}, "ntxent"),
]


@pytest.mark.parametrize("cls,kw,name", CLASSES)
def test_class_equals_function_and_round_trips(cls, kw, name):
    labels, x = make_batch("pk", seed=2)
    loss = cls(**kw)
    fn_kw = {k: ("euclidean" if v == "L2" else v) for k, v in kw.items()}
    assert float(loss(labels, x)) == float(FUNCTIONS[name][0](labels, x, **fn_kw))
    # Keras hands over float labels under a strategy: they are the same ids.
    assert float(loss(labels.astype(np.float32), x)) == float(loss(labels, x))
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is cls and restored.get_config() == loss.get_config()
    assert float(restored(labels, x)) == float(loss(labels, x))


@pytest.mark.parametrize("cls,kw,name", CLASSES)
def test_compile_and_fit_lowers_the_loss(cls, kw, name):
    labels, x = make_batch("pk", seed=6, dim=8)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=cls(**kw))
    before = float(cls(**kw)(labels, model(x)))
    model.fit(x, labels, batch_size=len(labels), epochs=15, shuffle=False, verbose=0)
    after = float(cls(**kw)(labels, model(x)))
    assert after < before


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda: losses.SupConLoss(temperature=0.0), "temperature must be a number > 0, got 0.0"),
        (lambda: losses.NTXentLoss(temperature="hot"), "temperature must be a number > 0"),
        (lambda: losses.MultiSimilarityLoss(beta=-1), "beta must be a number > 0, got -1"),
        (lambda: losses.MultiSimilarityLoss(epsilon=-0.1), "epsilon must be None or a number"),
        (lambda: losses.ContrastiveLoss(distance="manhattan"), "Unknown distance 'manhattan'"),
        (lambda: losses.supcon_loss([0, 0], np.ones((2, 2)), temperature=-1), "temperature"),
        (
            lambda: losses.ntxent_loss([0, 0, 1], np.ones((2, 2))),
            "3 entries but `embeddings` has 2",
        ),
        (lambda: losses.multi_similarity_loss([0.5, 1], np.ones((2, 2))), "integer class ids"),
    ],
)
def test_bad_options_and_inputs_name_the_problem(make, words):
    with pytest.raises((ValueError, TypeError), match=words):
        make()
