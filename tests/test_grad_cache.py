"""Cached-gradient chunking (train.embedding_chunk_size, trainer/step/grad_cache.py): a step that
embeds its slice chunk by chunk, twice, equals the step that embeds it whole."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import losses
from losses.tiles import ARRAYS_ALIVE
from tests import proxy_case
from tests.cross_replica_case import (
    LOSSES,
    build_model,
    global_batch,
    mirrored,
    replicated_step,
    single_device_step,
)
from tests.fit_case import fitted, mirrored_strategy, relative_difference
from tests.jobs import HOROVOD_2, SHORT_JOB, run_job, series
from tests.test_cross_replica import assert_same_step
from trainer.backends.replicas import make_replicas
from trainer.fit import GlobalMiningModel
from trainer.step.global_loss import loss_and_gradients
from trainer.step.grad_cache import ChunkedEmbeddingPass
from trainer.step.key_memory import KeyMemory
from trainer.step.train_step import TrainStep

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_a_chunked_step_equals_the_whole_step_for_every_mined_loss(loss_name):
    """26 rows: on one device in chunks of 5 (5+5+5+5+5+1), and on 4 replicas (7, 7, 6, 6
    rows) in chunks of 3, so no slice divides evenly; there the mining also runs in
    anchor tiles of 3 (a budget of 3 rows × 26 keys). Both against one device whole."""
    x, labels = global_batch(size=26)
    weights = build_model(x.shape[1]).get_weights()
    single = single_device_step(LOSSES[loss_name](), weights, x, labels)
    three_rows = 3 * 26 * 4 * ARRAYS_ALIVE
    for count, chunk, budget in ((1, 5, None), (4, 3, three_rows)):
        chunked = replicated_step(
            mirrored(count), LOSSES[loss_name](), weights, x, labels, True, True, chunk, budget
        )
        assert_same_step(single, chunked)


def test_horovod_workers_chunked_equal_one_device_unchunked(tmp_path):
    """Two Horovod workers, each embedding 12 rows 5 at a time, for a triplet loss, a
    pair loss of two means (its normalizers are summed before the backward pass) and a
    loss over every triplet."""
    names = ["semihard", "contrastive", "batch_all_all"]
    out = tmp_path / "result.npz"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    horovodrun = str(Path(sys.executable).parent / "horovodrun")
    command = [horovodrun, "-np", "2", "--gloo", "-H", "localhost:2", sys.executable]
    command += ["-m", "tests.horovod_worker", str(out), ",".join(names), "5"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = np.load(out)
    x, labels = global_batch()
    weights = build_model(x.shape[1]).get_weights()
    for name in names:
        loss_1, grads_1 = single_device_step(LOSSES[name](), weights, x, labels)
        key = f"{name}/known"
        grads_n = [result[f"{key}/grad{i}"] for i in range(len(grads_1))]
        assert_same_step((loss_1, grads_1), (float(result[f"{key}/loss"]), grads_n))


@pytest.mark.parametrize("loss_name", ["arcface_partial_fc", "proxy_anchor"])
def test_proxy_losses_with_sharded_centres_train_the_same_chunked(loss_name):
    """Three Adam steps on 4 replicas of 6 rows each, in chunks of 4: the losses, the
    weights and every centre as one device unchunked."""
    whole = proxy_case.train(make_replicas("single"), loss_name)
    chunked = proxy_case.train(mirrored(4), loss_name, chunk_size=4)
    np.testing.assert_allclose(chunked["losses"], whole["losses"], rtol=1e-5)
    assert relative_difference(whole["weights"], chunked["weights"]) < 1e-5
    np.testing.assert_allclose(chunked["centres"], whole["centres"], rtol=1e-5, atol=1e-6)


def train_steps(replicas, chunk_size, steps=3, memory=0, model_fn=build_model, **step_options):
    """`steps` SGD steps of semi-hard triplets on 26-row batches: metrics and weights."""
    with replicas.scope():
        model = model_fn()
        optimizer = keras.optimizers.SGD(0.5)
        key_memory = KeyMemory(memory, 8) if memory else None  # mirrored, as the job's
    step = TrainStep(
        model,
        optimizer,
        losses.TripletSemiHardLoss(margin=0.5),
        replicas,
        memory=key_memory,
        embedding_chunk_size=chunk_size,
        **step_options,
    )
    metrics = [step(*global_batch(size=26, seed=s)) for s in range(steps)]
    return metrics, model.get_weights()


def test_training_steps_with_a_cross_batch_memory_are_the_same_chunked():
    """A memory of 40 past keys (mined from the second step on), 4 replicas in chunks of
    4, three steps: every metric and weight as one device unchunked."""
    whole, whole_weights = train_steps(make_replicas("single"), None, memory=40)
    chunked, chunked_weights = train_steps(mirrored(4), 4, memory=40)
    assert chunked[-1]["memory_negative_fraction"] > 0  # the memory took part
    for a, b in zip(whole, chunked, strict=True):
        for name in ("loss", "active_triplet_fraction", "positive_distance", "embedding_norm"):
            assert b[name] == pytest.approx(a[name], rel=1e-5), name
    assert relative_difference(whole_weights, chunked_weights) < 1e-5


def test_a_non_finite_row_in_one_chunk_leaves_every_weight_unchanged():
    """The verdict covers the gradients the second pass accumulates: a NaN input in the
    last chunk of one replica stops the update on every replica."""
    replicas = mirrored(4)
    with replicas.scope():
        model = build_model()
        optimizer = keras.optimizers.SGD(0.5)
    step = TrainStep(
        model,
        optimizer,
        losses.TripletSemiHardLoss(margin=0.5),
        replicas,
        embedding_chunk_size=3,
        skip_nonfinite=True,
    )
    before = model.get_weights()
    x, labels = global_batch(size=26)
    x[25, 0] = np.nan
    metrics = step(x, labels)
    assert metrics["finite_gradients"] == 0.0
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def random_model(seed=0):
    """Dropout and Gaussian noise: both draw from Keras SeedGenerators in training."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.GaussianNoise(0.3),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(8),
        ]
    )


def seed_states(model) -> list:
    return [
        g.state.numpy().copy() for layer in model._flatten_layers() for g in layer._seed_generators
    ]


def test_the_second_pass_replays_the_first_pass_s_dropout_and_noise():
    """The chunked gradient must be that of the embeddings the loss was computed on: the
    same chunks, drawn in the same order from the same seeds, under one tape. Without the
    replay the second pass draws other masks and the gradient is silently wrong."""
    x, labels = global_batch(size=26)
    loss = losses.TripletSemiHardLoss(margin=0.5)
    replicas = make_replicas("single")
    model = random_model()
    start = seed_states(model)
    forward = lambda rows: model(rows, training=True)  # noqa: E731

    @tf.function
    def chunked():
        passes = ChunkedEmbeddingPass(model, 5)
        result = loss_and_gradients(
            loss, replicas, forward, model.trainable_variables, x, labels, embedding_pass=passes
        )
        return result.loss, result.grads

    value, grads = chunked()
    after = seed_states(model)
    assert any((a != b).any() for a, b in zip(start, after, strict=True))  # they drew

    for generator, state in zip(
        [g for layer in model._flatten_layers() for g in layer._seed_generators], start, strict=True
    ):
        generator.state.assign(state)
    with tf.GradientTape() as tape:
        embeddings = tf.concat([forward(x[i : i + 5]) for i in range(0, 26, 5)], axis=0)
        want = loss(labels, embeddings)
    want_grads = tape.gradient(want, model.trainable_variables)
    for a, b in zip(after, seed_states(model), strict=True):
        np.testing.assert_array_equal(a, b)  # the chunked step ends where one pass does
    assert float(value) == pytest.approx(float(want), rel=1e-6)
    scale = max(float(tf.reduce_max(tf.abs(g))) for g in want_grads)
    for got, expected in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-6 * scale)


def test_batchnorm_moving_statistics_update_once_per_chunk():
    """'batch' BatchNorm: each chunk updates the moving statistics once (a ghost batch),
    as the first pass does; the second pass leaves them as it found them."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8), keras.layers.BatchNormalization(momentum=0.5)]
    )
    norm = model.layers[-1]
    x, labels = global_batch(size=26)
    chunk_means = []
    mean = np.zeros(8)
    h = model.layers[0](x).numpy()
    for i in range(0, 26, 10):
        mean = 0.5 * mean + 0.5 * h[i : i + 10].mean(axis=0)
        chunk_means.append(mean)
    _, _ = train_steps(make_replicas("single"), 10, steps=1, model_fn=lambda: model)
    # One step changed the Dense weights after both passes; the statistics come from
    # the weights the passes ran with, which the loop above used.
    np.testing.assert_allclose(norm.moving_mean.numpy(), chunk_means[-1], rtol=1e-5, atol=1e-6)


def test_fit_chunked_on_two_replicas_equals_fit_on_one_device_unchunked():
    whole, _ = fitted("semihard")
    chunked, history = fitted("semihard", mirrored_strategy(2), embedding_chunk_size=5)
    assert relative_difference(whole.get_weights(), chunked.get_weights()) < 1e-5
    assert len(history.history["loss"]) == 1
    assert GlobalMiningModel.from_config(chunked.get_config()).embedding_chunk_size == 5


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", True])
def test_a_chunk_size_that_is_not_a_positive_int_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"embedding_chunk_size=\.\.\.\) must be a positive int"):
        GlobalMiningModel(build_model(), embedding_chunk_size=bad)


def test_fit_refuses_synchronized_batchnorm_with_chunks():
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(synchronized=True),
        ]
    )
    with pytest.raises(ValueError, match="cannot be exact with synchronized BatchNorm"):
        GlobalMiningModel(model, embedding_chunk_size=4)
    GlobalMiningModel(model)  # unchunked it is fine


@pytest.fixture(scope="module")
def job_losses(tmp_path_factory):
    """train/loss per step of the short job: one device whole; chunked on 4 replicas with a
    cross-batch memory and on 2 Horovod workers (slices of 16 and 32 rows, chunks of 7)."""
    runs = {
        "single": ((), ("distribute.strategy='single'",)),
        "single_memory": ((), ("distribute.strategy='single'", "train.cross_batch_memory=128")),
        "mirrored4_memory": (
            (),
            (
                "distribute.strategy='mirrored'",
                "distribute.cpu_replicas=4",
                "train.cross_batch_memory=128",
                "train.embedding_chunk_size=7",
            ),
        ),
        "horovod2": (HOROVOD_2, ("train.embedding_chunk_size=7",)),
    }
    results = {}
    for name, (launcher, params) in runs.items():
        workdir = tmp_path_factory.mktemp(name)
        run_job(workdir, SHORT_JOB + params, launcher)
        results[name] = series(workdir, "train/loss")
    return results


def test_the_chunked_job_s_loss_curve_is_the_whole_job_s(job_losses):
    assert len(job_losses["single"]) == 6 and np.ptp(job_losses["single"]) > 1e-4
    np.testing.assert_allclose(job_losses["horovod2"], job_losses["single"], rtol=1e-5)
    np.testing.assert_allclose(
        job_losses["mirrored4_memory"], job_losses["single_memory"], rtol=1e-5
    )


SYNCHRONIZED_BACKBONE = (
    "train.model=@backbone_embedding",
    "backbone_embedding.backbone='MobileNetV3Small'",
    "backbone_embedding.image_size=32",
    "backbone_embedding.weights=None",
    "backbone_embedding.batchnorm='synchronized'",
)


@pytest.mark.parametrize(
    "bindings, message",
    [
        (("train.embedding_chunk_size=0",), "train.embedding_chunk_size must be >= 1, got 0."),
        (("train.embedding_chunk_size='8'",), "train.embedding_chunk_size must be int or None"),
        (
            ("train.embedding_chunk_size=8", *SYNCHRONIZED_BACKBONE),
            "train.embedding_chunk_size=8 cannot be combined with synchronized BatchNorm",
        ),
    ],
)
def test_a_job_with_a_chunk_size_it_cannot_use_exits_2_naming_it(tmp_path, bindings, message):
    done = run_job(tmp_path / "w", SHORT_JOB + bindings, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert message in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_the_job_says_once_that_batchnorm_statistics_are_per_chunk():
    from trainer.step.learner import _check_chunkable

    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8), keras.layers.BatchNormalization()]
    )
    said = []
    _check_chunkable(model, False, 64, said.append)
    assert len(said) == 1 and "each chunk of up to 64 rows (ghost batches)" in said[0], said
    model.layers[-1].trainable = False  # frozen: exact, nothing to say
    said.clear()
    _check_chunkable(model, False, 64, said.append)
    assert said == []


class _CountedTerms(losses.TripletSemiHardLoss):
    """Counts the anchor tiles its query/key form computes when the step runs (the
    tiles are a loop's iterations: one trace serves them all)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tiles = []

    def _count(self):
        self.tiles.append(1)
        return np.int32(0)

    def terms(self, *args):
        with tf.control_dependencies([tf.numpy_function(self._count, [], tf.int32)]):
            return super().terms(*args)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_the_trainer_s_step_mines_in_tiles_of_its_budget(chunk_size):
    """26 anchors against 26 keys within a budget of 7 rows: 4 tiles, each computed once
    forward and once recomputed, chunked or not (the chunked embeddings keep the slice's
    static row count, which fixes the number of tiles)."""
    counted = _CountedTerms(margin=0.5)
    model = build_model()
    step = TrainStep(
        model,
        keras.optimizers.SGD(0.5),
        counted,
        make_replicas("single"),
        embedding_chunk_size=chunk_size,
        mining_budget_bytes=7 * 26 * 4 * ARRAYS_ALIVE,
    )
    x, labels = global_batch(size=26)
    whole, _ = single_device_step(
        losses.TripletSemiHardLoss(margin=0.5), model.get_weights(), x, labels
    )
    metrics = step(x, labels)
    assert len(counted.tiles) == 4 * 2
    assert metrics["loss"] == pytest.approx(whole, rel=1e-5)


def test_the_documented_fit_example_runs_as_written(tmp_path):
    page = (ROOT / "docs" / "batches-beyond-memory.md").read_text()
    code = page[page.index("## In `model.fit`") :].split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses_printed = [float(v) for v in done.stdout.split("loss [")[1].split("]")[0].split(",")]
    assert len(losses_printed) == 2 and all(np.isfinite(losses_printed))
