"""Precise BatchNorm (trainer/step/batchnorm.py): population statistics recomputed over
training batches, exactly as the definition says and the same for any replica count;
the mean pairwise cosine; the BatchNorm modes of backbone_embedding."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from data.errors import InputError
from tests.cross_replica_case import mirrored
from tests.jobs import run_horovod_2
from trainer.backends.replicas import Replicas
from trainer.evaluation import mean_cosine
from trainer.model import backbone_embedding, batchnorm_layers
from trainer.step.batchnorm import BatchNormStatistics


def bn_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(6, 3, padding="same"),
            keras.layers.BatchNormalization(momentum=0.999),
            keras.layers.Activation("relu"),
            keras.layers.Conv2D(5, 3),
            keras.layers.BatchNormalization(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4),
            keras.layers.UnitNormalization(),
        ]
    )


def batches(count=3, size=16):
    rng = np.random.default_rng(1)
    for _ in range(count):
        images = rng.normal(100, 40, (size, 8, 8, 3)).astype(np.float32)
        yield images, np.arange(size) % 4, np.ones(size, bool)


def reference(weights):
    """Each BatchNorm layer's input over the batches, from the definition: the layers
    applied one by one in training mode (BatchNorm normalizing by the batch's own
    moments); population mean and E[x²] - mean² over every row of every batch."""
    model = bn_model()
    model.set_weights(weights)
    seen = {i: [] for i, layer in enumerate(model.layers) if "batch_normalization" in layer.name}
    for images, _, _ in batches():
        x = tf.constant(images)
        for i, layer in enumerate(model.layers):
            if i in seen:
                seen[i].append(x.numpy().reshape(-1, x.shape[-1]).astype(np.float64))
            x = layer(x, training=True)
    result = []
    for rows in seen.values():
        rows = np.concatenate(rows)
        result.append((rows.mean(0), rows.var(0)))
    return result


def run(replicas, size=16):
    with replicas.scope():
        model = bn_model()
    statistics = BatchNormStatistics(model, replicas)
    # One process holds every row of the global batch here (logical CPUs).
    return model, statistics(batches(size=size), global_size=size, assign=True)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_population_statistics_are_exact_and_the_same_for_any_replica_count(count):
    replicas = Replicas() if count == 1 else mirrored(count)
    model, done = run(replicas)
    assert done["batches"] == 3 and done["layers"] == 2
    expected = reference(bn_model().get_weights())
    for layer, (mean, variance) in zip(batchnorm_layers(model), expected, strict=True):
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-4)
    assert -1 <= done["train_mean_cosine"] <= 1


def test_measuring_only_leaves_the_statistics_alone():
    model = bn_model()
    before = [v.numpy().copy() for v in model.non_trainable_variables]
    done = BatchNormStatistics(model, Replicas())(batches(), 16, assign=False)
    assert done["batches"] == 3
    for value, old in zip(model.non_trainable_variables, before, strict=True):
        np.testing.assert_array_equal(value.numpy(), old)


def test_mean_cosine_equals_the_mean_over_all_pairs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5)) + 0.5
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    pairs = [unit[i] @ unit[j] for i, j in itertools.permutations(range(30), 2)]
    assert mean_cosine(unit.sum(0), 30) == pytest.approx(np.mean(pairs), rel=1e-9)
    same = np.tile(unit[:1], (10, 1))
    assert mean_cosine(same.sum(0), 10) == pytest.approx(1.0)


def test_backbone_batchnorm_modes():
    def bn_of(**settings):
        model = backbone_embedding("MobileNetV3Small", embedding_dim=8, image_size=32, **settings)
        layers = [
            layer
            for layer in model.layers[1]._flatten_layers()
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
        return model, layers

    scratch, layers = bn_of(weights=None)  # default from scratch: 'batch'
    assert layers and all(layer.trainable for layer in layers)
    assert not scratch.synchronized_batchnorm
    frozen, layers = bn_of(weights=None, batchnorm="frozen")
    assert all(not layer.trainable for layer in layers)
    assert batchnorm_layers(frozen) == []  # nothing to re-estimate
    synchronized, _ = bn_of(weights=None, batchnorm="synchronized")
    assert synchronized.synchronized_batchnorm
    with pytest.raises(InputError, match="Unknown backbone_embedding.batchnorm 'sync'"):
        bn_of(weights=None, batchnorm="sync")


def test_two_horovod_workers_reestimate_what_one_device_does(tmp_path):
    out = tmp_path / "statistics.npz"
    run_horovod_2("tests.horovod_batchnorm_worker", str(out))
    got = np.load(out)
    model, expected = run(Replicas())
    assert int(got["batches"]) == 3
    assert float(got["cosine"]) == pytest.approx(expected["train_mean_cosine"], abs=1e-6)
    for i, layer in enumerate(batchnorm_layers(model)):
        np.testing.assert_allclose(got[f"mean{i}"], layer.moving_mean.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[f"variance{i}"], layer.moving_variance.numpy(), rtol=1e-5)
