"""The losses against slow numpy references, Addons' formulation, and finite differences."""

import zlib

import numpy as np
import pytest
import tensorflow as tf

import losses
from losses import mining
from tests import reference
from tests.addons_reference import addons_hard, addons_semihard

DISTANCES = ["euclidean", "squared_euclidean", "cosine"]


def make_batch(kind, seed=0, dim=5):
    """Labels and float32 embeddings of the batch shapes that exercise the edge cases."""
    rng = np.random.default_rng(seed)
    if kind == "pk":  # P x K sampling, K = 4
        labels = np.repeat(np.arange(4), 4)
    elif kind == "singletons":  # classes of one element: anchors without a positive
        labels = np.array([0, 0, 0, 1, 1, 2, 3, 4, 5, 5, 6, 7])
    elif kind == "one_class":  # no negatives at all
        labels = np.zeros(8, np.int64)
    elif kind == "many_positives":  # 19 positives per anchor (sorting path: see below)
        labels = np.repeat(np.arange(2), 20)
    elif kind == "duplicates":  # augmented copies of the same example within a class
        labels = np.repeat(np.arange(4), 4)
    else:
        raise ValueError(kind)
    labels = rng.permutation(labels)
    x = rng.normal(size=(len(labels), dim)).astype(np.float32)
    if kind == "duplicates":
        for i in range(len(labels)):
            same = np.flatnonzero(labels == labels[i])
            if i == same[0]:
                x[same[1]] = x[i]
    return labels.astype(np.int64), x


KINDS = ["pk", "singletons", "one_class", "many_positives", "duplicates"]


def tf_loss(loss, labels, x, distance, **kw):
    fn = {
        "semihard": losses.triplet_semihard_loss,
        "hard": losses.triplet_hard_loss,
        "batch_all": losses.triplet_batch_all_loss,
    }[loss]
    return fn(labels, x, distance=distance, **kw)


def ref_loss(loss, labels, x, distance, **kw):
    fn = {"semihard": reference.semihard, "hard": reference.hard, "batch_all": reference.batch_all}[
        loss
    ]
    return fn(labels, x, name=distance, **kw)


VARIANTS = [
    ("semihard", {}),
    ("semihard", {"margin": 0.2}),
    ("hard", {}),
    ("hard", {"soft": True}),
    ("batch_all", {"reduction": "nonzero"}),
    ("batch_all", {"reduction": "all"}),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("loss,kw", VARIANTS)
def test_matches_numpy_reference(loss, kw, distance, kind, monkeypatch):
    if kind == "many_positives":  # exercise the sorting path of the semi-hard search
        monkeypatch.setattr(mining, "MAX_POSITIVE_PASSES", 8)
    labels, x = make_batch(kind, seed=zlib.crc32(f"{loss}{distance}{kind}".encode()) % 1000)
    got = float(tf_loss(loss, labels, x, distance, **kw))
    want = ref_loss(loss, labels, x, distance, **kw)
    # Duplicates have distance 0 exactly in float64 but ~1e-4 in float32 (x·x expansion).
    tol = 2e-3 if kind == "duplicates" else 1e-4
    assert got == pytest.approx(want, rel=tol, abs=tol)


@pytest.mark.parametrize("kind", ["pk", "singletons", "many_positives"])
@pytest.mark.parametrize("distance", DISTANCES)
def test_semihard_matches_addons_formulation(distance, kind, monkeypatch):
    monkeypatch.setattr(mining, "MAX_POSITIVE_PASSES", 8)  # many_positives: sorting path
    labels, x = make_batch(kind, seed=7)
    got = losses.triplet_semihard_loss(labels, x, distance=distance)
    want = addons_semihard(labels, x, distance=distance)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("kind", ["pk", "singletons", "one_class"])
@pytest.mark.parametrize("distance", DISTANCES)
def test_hard_matches_addons_formulation(distance, kind, soft):
    labels, x = make_batch(kind, seed=8)
    got = losses.triplet_hard_loss(labels, x, soft=soft, distance=distance)
    want = addons_hard(labels, x, soft=soft, distance=distance)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_addons_aliases_are_the_same_distances():
    labels, x = make_batch("pk")
    for alias, name in losses.ALIASES.items():
        assert float(losses.triplet_semihard_loss(labels, x, distance=alias)) == float(
            losses.triplet_semihard_loss(labels, x, distance=name)
        )


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("loss,kw", VARIANTS)
def test_gradient_matches_finite_differences_of_reference(loss, kw, distance):
    labels, x = make_batch("pk", seed=3, dim=4)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        value = tf_loss(loss, labels, xt, distance, **kw)
    grad = tape.gradient(value, xt).numpy()
    numeric = reference.numeric_gradient(lambda z: ref_loss(loss, labels, z, distance, **kw), x)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-3)
    assert np.abs(grad).sum() > 0  # the loss is active, so the check is not vacuous


@pytest.mark.parametrize(
    "loss_fn",
    [
        losses.triplet_semihard_loss,
        lambda *a, **k: losses.triplet_batch_all_loss(*a, margin=1.0, **k),
        lambda *a, **k: losses.triplet_batch_all_loss(*a, margin=1.0, reduction="all", **k),
    ],
)
def test_sorting_path_equals_one_pass_per_positive(monkeypatch, loss_fn):
    labels, x = make_batch("many_positives", seed=11)
    for distance in DISTANCES:
        results = []
        for limit in (8, 10_000):  # sorting, then one pass per positive
            monkeypatch.setattr(mining, "MAX_POSITIVE_PASSES", limit)
            xt = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(xt)
                value = loss_fn(labels, xt, distance=distance)
            results.append((float(value), tape.gradient(value, xt).numpy()))
        (sorted_value, sorted_grad), (passes_value, passes_grad) = results
        assert sorted_value == pytest.approx(passes_value, rel=1e-6)
        np.testing.assert_allclose(sorted_grad, passes_grad, rtol=1e-5, atol=1e-6)
        assert np.abs(passes_grad).sum() > 0


def test_semihard_search_in_chunks_of_positives_equals_one_broadcast(monkeypatch):
    """Large batches loop over chunks of positives (memory O(B²)); small ones compare all
    positives at once. Both must choose the same negatives."""
    labels, x = make_batch("many_positives", seed=12)
    rows = len(labels)
    for distance in DISTANCES:
        results = []
        # chunks of 1 and of 3 positives (19 per anchor: a short last chunk), then all at once
        for elements in (rows * rows, 3 * rows * rows, mining.PASS_CHUNK_ELEMENTS):
            monkeypatch.setattr(mining, "PASS_CHUNK_ELEMENTS", elements)
            xt = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(xt)
                value = tf.function(losses.triplet_semihard_loss)(labels, xt, distance=distance)
            results.append((float(value), tape.gradient(value, xt).numpy()))
        *chunked, (once_value, once_grad) = results
        for value, grad in chunked:
            assert value == pytest.approx(once_value, rel=1e-6)
            np.testing.assert_allclose(grad, once_grad, rtol=1e-5, atol=1e-6)
        assert np.abs(once_grad).sum() > 0


@pytest.mark.parametrize("loss,kw", VARIANTS)
def test_query_key_terms_add_up_to_the_whole_batch(loss, kw):
    """Mining disjoint anchor sets against all keys and summing = the single-batch loss."""
    labels, x = make_batch("singletons", seed=5)
    terms_fn = {
        "semihard": losses.semihard_terms,
        "hard": losses.hard_terms,
        "batch_all": losses.batch_all_terms,
    }[loss]
    parts = []
    for rows in (np.arange(0, 5), np.arange(5, 12)):
        parts.append(terms_fn(x[rows], labels[rows], rows, x, labels, **kw))
    total = {f: sum(getattr(p, f) for p in parts) for f in losses.triplet.SCALAR_FIELDS}
    want = tf_loss(loss, labels, x, "euclidean", **kw)
    assert float(total["loss_sum"] / total["count"]) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("loss,kw", VARIANTS)
def test_no_nan_with_duplicates_and_zero_vectors(loss, kw, distance):
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    x = np.zeros((8, 3), np.float32)
    x[3] = x[4] = x[0] = [1.0, 2.0, 3.0]  # duplicates across and within classes
    x[6] = [0.5, 0.0, 0.0]
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        value = tf_loss(loss, labels, xt, distance, **kw)
    grad = tape.gradient(value, xt)
    assert np.isfinite(value.numpy())
    assert np.all(np.isfinite(grad.numpy()))


def test_no_positive_pair_gives_zero_not_nan():
    labels = np.arange(6)
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    assert float(losses.triplet_semihard_loss(labels, x)) == 0.0
    assert float(losses.triplet_batch_all_loss(labels, x)) == 0.0


def test_soft_margin_is_stable_for_large_distances():
    labels = np.array([0, 0, 1, 1])
    x = np.array([[0.0], [500.0], [1.0], [1000.0]], np.float32)
    value = losses.triplet_hard_loss(labels, x, soft=True)
    # softplus(500 - 1) = 499 for anchor 0; Addons' log1p(exp(499)) is inf.
    assert np.isfinite(value.numpy())
    assert float(value) == pytest.approx(reference.hard(labels, x, soft=True), rel=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_embeddings_are_mined_in_float32(dtype):
    labels, x = make_batch("pk", seed=2)
    low = tf.cast(x, dtype)
    got = losses.triplet_semihard_loss(labels, low)
    assert got.dtype == tf.float32
    want = losses.triplet_semihard_loss(labels, tf.cast(low, tf.float32))
    assert float(got) == float(want)


@pytest.mark.parametrize("mining_mode", ["semihard", "hardest"])
@pytest.mark.parametrize("distance", DISTANCES)
def test_explicit_triplets_match_reference(distance, mining_mode):
    rng = np.random.default_rng(4)
    a, p = rng.normal(size=(2, 6, 3)).astype(np.float32)
    n = rng.normal(size=(6, 5, 3)).astype(np.float32)
    got = losses.triplet_loss(a, p, n, distance=distance, negative_mining=mining_mode)
    want = reference.explicit_triplets(a, p, n, name=distance, mining=mining_mode)
    assert float(got) == pytest.approx(want, rel=1e-5)
    single = losses.triplet_loss(a, p, n[:, 0], distance=distance)
    assert float(single) == pytest.approx(
        reference.explicit_triplets(a, p, n[:, :1], name=distance), rel=1e-5
    )


def test_explicit_triplet_sign_is_positive_minus_negative():
    a = np.zeros((1, 2), np.float32)
    p = np.array([[3.0, 0.0]], np.float32)  # far positive
    n = np.array([[1.0, 0.0]], np.float32)  # close negative: a violated triplet
    assert float(losses.triplet_loss(a, p, n, margin=0.5)) == pytest.approx(3.0 - 1.0 + 0.5)
    assert float(losses.triplet_loss(a, n, p, margin=0.5)) == 0.0


@pytest.mark.parametrize(
    "labels,embeddings,error,words",
    [
        (np.zeros(4, np.float32), np.zeros((4, 2), np.float32), TypeError, "labels"),
        (np.zeros((4, 2), np.int32), np.zeros((4, 2), np.float32), ValueError, "labels"),
        (np.zeros(3, np.int32), np.zeros((4, 2), np.float32), ValueError, "3 entries"),
        (np.zeros(4, np.int32), np.zeros((4, 2, 1), np.float32), ValueError, "2-D"),
        (np.zeros(4, np.int32), np.zeros((4, 2), np.int32), TypeError, "floating"),
    ],
)
def test_bad_input_names_the_problem(labels, embeddings, error, words):
    with pytest.raises(error, match=words):
        losses.triplet_semihard_loss(labels, embeddings)


def test_unknown_distance_lists_valid_names():
    with pytest.raises(ValueError, match="'euclidean'.*'cosine'.*'angular'"):
        losses.triplet_hard_loss(np.zeros(2, np.int32), np.zeros((2, 2), np.float32), distance="l1")


def test_batch_mismatch_inside_tf_function_fails_clearly():
    fn = tf.function(
        losses.triplet_semihard_loss,
        input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, 2], tf.float32)],
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="different batch sizes"):
        fn(np.zeros(3, np.int32), np.zeros((4, 2), np.float32))


@pytest.mark.parametrize(
    "make,words",
    [
        (
            lambda: losses.triplet_batch_all_loss([0, 0], np.zeros((2, 2)), reduction="mean"),
            "reduction 'mean'.*'nonzero', 'all'",
        ),
        (lambda: losses.TripletBatchAllLoss(reduction="mean"), "reduction 'mean'"),
        (
            lambda: losses.triplet_loss(
                np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)), negative_mining="easy"
            ),
            "negative_mining 'easy'.*'hardest'",
        ),
        (lambda: losses.TripletLoss(negative_mining="easy"), "negative_mining 'easy'"),
    ],
)
def test_unknown_options_name_the_option_and_the_valid_values(make, words):
    with pytest.raises(ValueError, match=words):
        make()
