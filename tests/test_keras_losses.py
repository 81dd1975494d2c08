"""The Keras 3 Loss classes: same numbers as the functions, compile + fit, serialization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import losses
from tests.test_losses import make_batch

CLASSES = [
    (
        losses.TripletSemiHardLoss,
        {"margin": 0.5, "distance": "cosine"},
        losses.triplet_semihard_loss,
    ),
    (losses.TripletHardLoss, {"margin": 0.3, "soft": True}, losses.triplet_hard_loss),
    (
        losses.TripletBatchAllLoss,
        {"margin": 0.2, "reduction": "all"},
        losses.triplet_batch_all_loss,
    ),
]


@pytest.mark.parametrize("cls,kw,fn", CLASSES)
def test_class_equals_function(cls, kw, fn):
    labels, x = make_batch("pk")
    got = cls(**kw)(labels, x)
    want = fn(labels, x, **kw)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("cls,kw,fn", CLASSES)
def test_serialize_round_trip(cls, kw, fn):
    loss = cls(**kw, name="my_loss")
    config = keras.losses.serialize(loss)
    restored = keras.losses.deserialize(config)
    assert type(restored) is cls
    assert restored.get_config() == loss.get_config()
    labels, x = make_batch("pk", seed=1)
    assert float(restored(labels, x)) == float(loss(labels, x))


def test_explicit_triplet_loss_class_round_trip():
    loss = losses.TripletLoss(margin=0.4, negative_mining="hardest")
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    rng = np.random.default_rng(0)
    a, p = rng.normal(size=(2, 4, 3)).astype(np.float32)
    n = rng.normal(size=(4, 6, 3)).astype(np.float32)
    assert float(restored(None, (a, p, n))) == pytest.approx(
        float(losses.triplet_loss(a, p, n, margin=0.4, negative_mining="hardest"))
    )


def test_addons_keyword_distance_metric_is_accepted():
    loss = losses.TripletSemiHardLoss(distance_metric="squared-L2")
    assert loss.get_config()["distance"] == "squared_euclidean"


def test_sample_weight_is_refused_clearly():
    labels, x = make_batch("pk")
    with pytest.raises(ValueError, match="sample_weight"):
        losses.TripletHardLoss()(labels, x, sample_weight=np.ones(len(labels)))


@pytest.mark.parametrize(
    "loss",
    # Batch-all over non-zero triplets stays level while it works (fewer, still hard,
    # triplets remain), so its fit is judged over all triplets.
    [
        losses.TripletSemiHardLoss(0.5),
        losses.TripletHardLoss(0.5),
        losses.TripletBatchAllLoss(0.5, reduction="all"),
    ],
    ids=["semihard", "hard", "batch_all"],
)
def test_compile_and_fit_lowers_the_loss(loss):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 10)) * 2.0
    labels = np.repeat(np.arange(6), 32)
    x = (centers[labels] + rng.normal(size=(len(labels), 10))).astype(np.float32)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(8),
            keras.layers.UnitNormalization(),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
    before = model.evaluate(x, labels, batch_size=len(labels), verbose=0)
    model.fit(x, labels, batch_size=48, epochs=15, shuffle=True, verbose=0)
    after = model.evaluate(x, labels, batch_size=len(labels), verbose=0)
    assert np.isfinite(after)
    assert after < 0.7 * before


def test_works_under_mixed_precision_policy():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = keras.layers.Dense(4)
        labels, x = make_batch("pk")
        emb = layer(tf.constant(x))
        assert emb.dtype == tf.float16
        value = losses.TripletSemiHardLoss()(labels, emb)
        assert value.dtype == tf.float32 and np.isfinite(value.numpy())
    finally:
        keras.mixed_precision.set_global_policy("float32")
