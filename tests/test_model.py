"""Models: the digits and small-image nets, backbones and their weights, synchronized
BatchNorm, precision."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import losses
from data.errors import InputError
from tests.cross_replica_case import global_batch, mirrored
from trainer.backends.replicas import Replicas
from trainer.model import (
    backbone_embedding,
    digits_convnet,
    imagenet_weights,
    small_convnet,
    sync_batchnorm,
)
from trainer.step.global_loss import loss_and_gradients


def test_digits_convnet_gives_unit_embeddings():
    x = np.random.default_rng(0).random((5, 8, 8, 1)).astype(np.float32)
    for pool, dim, size in ((1, None, 8 * 8 * 8), (2, None, 4 * 4 * 8), (2, 16, 16)):
        out = digits_convnet(width=8, pool=pool, embedding_dim=dim)(x).numpy()
        assert out.shape == (5, size)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "size, widths, channels, dim, features",
    [
        (28, (8, 16), 1, None, 4 * 4 * 16),  # 28 -> 14 -> pooled by 3 to 4x4
        (32, (8, 16), 3, None, 4 * 4 * 16),  # 32 -> 16 -> pooled by 4
        (128, (4, 8, 8), 3, None, 4 * 4 * 8),  # 128 -> 64 -> 32 -> pooled by 8
        (64, (8,), 3, 12, 12),  # one layer and a head
    ],
)
def test_small_convnet_takes_small_rgb_or_grayscale_images(size, widths, channels, dim, features):
    x = np.random.default_rng(0).integers(0, 255, (3, size, size, channels)).astype(np.float32)
    model = small_convnet(image_size=size, widths=widths, embedding_dim=dim, channels=channels)
    out = model(x).numpy()
    assert out.shape == (3, features)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert model(x * 0 + 255).numpy().std(axis=0).max() < 1e-6  # same image, same vector


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(image_size=16), "small_convnet.image_size must be 28 to 128 (pixels), got 16"),
        (dict(image_size=256), "small_convnet.image_size must be 28 to 128"),
        (dict(widths=()), "small_convnet.widths must be whole numbers >= 1, got ()"),
        (dict(channels=2), "small_convnet.channels must be 1 or 3, got 2"),
        (dict(embedding_dim=0), "small_convnet.embedding_dim must be None or >= 1, got 0"),
    ],
)
def test_small_convnet_names_a_bad_setting(settings, message):
    with pytest.raises(InputError, match=re.escape(message)):
        small_convnet(**settings)


def test_backbone_embedding_builds_without_weights_and_explains_missing_ones(tmp_path, monkeypatch):
    model = backbone_embedding("MobileNetV3Small", embedding_dim=8, image_size=32, weights=None)
    out = model(np.zeros((2, 32, 32, 3), np.float32)).numpy()
    assert out.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(InputError, match="ImageNet weights for ResNet50 are not in"):
        imagenet_weights("ResNet50")
    with pytest.raises(InputError, match="backbone_embedding.backbone 'VGG1'"):
        backbone_embedding("VGG1")
    with pytest.raises(InputError, match="does not exist"):
        backbone_embedding("MobileNetV3Small", image_size=32, weights=str(tmp_path / "w.h5"))


def _bn_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(8),
        ]
    )


def _step(replicas, model, x, labels):
    loss = losses.TripletSemiHardLoss(margin=0.5)

    @tf.function
    def step(local_x, local_labels):
        result = loss_and_gradients(
            loss,
            replicas,
            lambda v: model(v, training=True),
            model.trainable_variables,
            local_x,
            local_labels,
        )
        return result.loss, replicas.sum_gradients(result.grads)

    value, grads = replicas.run(step, replicas.split(x, labels))
    first = lambda v: replicas.local_results(v)[0]  # noqa: E731
    return float(first(value)), [first(g).numpy() for g in grads]


@pytest.mark.parametrize("synchronized", [True, False])
def test_synchronized_batchnorm_makes_replicas_equal_one_device(synchronized):
    x, labels = global_batch(24)
    single = _bn_model()
    weights = single.get_weights()
    assert sync_batchnorm(single, Replicas()) == 1  # one replica: the plain moments
    expected_loss, expected_grads = _step(Replicas(), single, x, labels)
    replicas = mirrored(4)
    with replicas.scope():
        model = _bn_model()
    model.set_weights(weights)
    if synchronized:
        assert sync_batchnorm(model, replicas) == 1
    loss, grads = _step(replicas, model, x, labels)
    scale = max(np.linalg.norm(g) for g in expected_grads)
    differences = [
        np.max(np.abs(g - e)) / scale for g, e in zip(grads, expected_grads, strict=True)
    ]
    if synchronized:
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        assert max(differences) < 1e-5
    else:  # per-replica statistics: the loss depends on the split
        assert abs(loss - expected_loss) > 1e-4 or max(differences) > 1e-3


def test_mixed_bfloat16_trains_with_float32_loss_and_weights():
    from trainer.step.train_step import TrainStep

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = digits_convnet(width=8)
        assert model.layers[0].compute_dtype == "bfloat16"
        step = TrainStep(
            model, keras.optimizers.Adam(1e-3), losses.TripletSemiHardLoss(0.2), Replicas()
        )
        rng = np.random.default_rng(0)
        x = rng.random((32, 8, 8, 1)).astype(np.float32)
        labels = np.repeat(np.arange(4), 8)
        before = [v.numpy().copy() for v in model.trainable_variables]
        metrics = step(x, labels)
        assert np.isfinite(metrics["loss"]) and metrics["finite_gradients"] == 1.0
        assert all(v.dtype == "float32" for v in model.trainable_variables)
        assert any(
            not np.allclose(b, v.numpy())
            for b, v in zip(before, model.trainable_variables, strict=True)
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_imagenet_weights_are_loaded_from_the_keras_cache(tmp_path, monkeypatch):
    """The cache lookup and the load, with a stand-in file in the legacy .h5 format of
    Keras' published ImageNet weights (no download happens)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    source = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg"
    )
    rng = np.random.default_rng(0)
    for v in source.weights:
        v.assign(rng.normal(size=v.shape).astype("float32") * 0.01)
    path = tmp_path / "models" / "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)
    assert imagenet_weights("MobileNetV3Small") == str(path)
    model = backbone_embedding("MobileNetV3Small", embedding_dim=8, image_size=32)
    backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    for loaded, written in zip(backbone.weights, source.weights, strict=True):
        np.testing.assert_array_equal(loaded.numpy(), written.numpy())


def test_the_export_is_checked_against_the_evaluated_embeddings(tmp_path):
    import types

    from data.pipeline import eval_batches
    from data.sources import digits
    from trainer.outputs import export
    from trainer.outputs.job_outputs import ExportMismatch, check_export

    data = types.SimpleNamespace(eval_source=digits(classes=(6, 10)), eval_preprocessing=None)
    model = digits_convnet(width=8)
    images, _, _ = next(iter(eval_batches(data.eval_source, [(0, 100)])))
    evaluated = model(images, training=False).numpy()
    path = export.saved_model(model, str(tmp_path / "saved_model"))
    assert check_export(path, evaluated, data) <= 1e-5
    shifted = evaluated.copy()
    shifted[3, 0] += 1e-3  # one entry of one of the first 64 rows
    with pytest.raises(ExportMismatch, match=r"first 64 evaluation images 1\.00e-03 away"):
        check_export(path, shifted, data)
