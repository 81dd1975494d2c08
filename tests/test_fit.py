"""Global mining in plain Keras `model.fit` (trainer/fit.py) and the drop-in loss classes.

The reference is one device fitting the same global batches in the same order; the
replicated fits must end at the same weights (relative 1e-5).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import losses
from tests.fit_case import (
    GLOBAL_BATCH,
    MINED_LOSSES,
    batches,
    embedding_net,
    fitted,
    mirrored_strategy,
    relative_difference,
)
from trainer.fit import FIT_METRICS, GlobalMiningModel

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("loss_name", list(MINED_LOSSES))
def test_mirrored_fit_on_1_2_4_replicas_equals_one_device(loss_name):
    single, _ = fitted(loss_name)
    for count in (1, 2, 4):
        replicated, history = fitted(loss_name, mirrored_strategy(count))
        assert replicated.replicas.size == count
        difference = relative_difference(
            single.embedding_model.get_weights(), replicated.embedding_model.get_weights()
        )
        assert difference < 1e-5, (count, difference)
        if count > 1 and loss_name != "batch_all":  # batch-all chooses no negative
            assert history.history["cross_replica_negative_fraction"][-1] > 0


def test_per_replica_mining_differs_where_the_hardest_negatives_sit_elsewhere():
    # Each replica's slice holds classes the other slice's negatives are closest to.
    x, y = batches()
    single, _ = fitted("hard", x=x, y=y)
    local, history = fitted("hard", mirrored_strategy(2), cross_replica_mining=False, x=x, y=y)
    assert history.history["cross_replica_negative_fraction"] == [0.0]
    difference = relative_difference(
        single.embedding_model.get_weights(), local.embedding_model.get_weights()
    )
    assert difference > 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _assert_workers_equal_one_device(out: Path, workers: int) -> None:
    """Every worker ends where one device does, starting from the chief's weights."""
    results = [np.load(f"{out}.{rank}.npz") for rank in range(workers)]
    for name in MINED_LOSSES:
        single, _ = fitted(name, seed=100)  # the chief's initial weights
        weights = single.embedding_model.get_weights()
        for rank, result in enumerate(results):
            assert int(result["workers"]) == workers
            theirs = [result[f"{name}/w{i}"] for i in range(len(weights))]
            assert relative_difference(weights, theirs) < 1e-5, (name, rank)
            if name != "batch_all":  # batch-all takes every negative: none is chosen
                assert float(result[f"{name}/remote"]) > 0


def test_horovod_fit_of_two_workers_from_different_weights_equals_one_device(tmp_path):
    out = tmp_path / "fit"
    command = [str(BIN / "horovodrun"), "-np", "2", "--gloo", "-H", "localhost:2"]
    command += [sys.executable, "-m", "tests.fit_worker", str(out), "horovod"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _assert_workers_equal_one_device(out, workers=2)


def test_multi_worker_mirrored_fit_of_two_workers_equals_one_device(tmp_path):
    out = tmp_path / "fit"
    cluster = [f"localhost:{_free_port()}", f"localhost:{_free_port()}"]
    workers = []
    for index in range(2):
        tf_config = {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
        env["TF_CONFIG"] = json.dumps(tf_config)
        command = [sys.executable, "-m", "tests.fit_worker", str(out), "multi_worker"]
        workers.append(
            subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outputs = [w.communicate(timeout=600)[0].decode()[-3000:] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(outputs)
    _assert_workers_equal_one_device(out, workers=2)


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: losses.TripletSemiHardLoss(margin=0.2, distance="cosine"),
        lambda: losses.TripletHardLoss(margin=0.2, soft=True),
        lambda: losses.TripletBatchAllLoss(margin=0.2),
    ],
)
def test_every_loss_class_drops_into_plain_compile_and_fit_under_mirrored(make_loss):
    # Keras hands the loss float labels under a strategy; they hold integer class ids.
    x, y = batches()
    with mirrored_strategy(2).scope():
        model = embedding_net()
        model.compile(optimizer="adam", loss=make_loss())
    history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] != history.history["loss"][0]


def test_labels_that_are_not_whole_numbers_are_an_error_naming_them():
    x, _ = batches()
    labels = np.zeros(len(x), np.float32)
    labels[3] = 2.5
    with pytest.raises(ValueError, match=r"not whole numbers: \[2\.5\]"):
        losses.TripletSemiHardLoss()(labels, x)
    model = GlobalMiningModel(embedding_net())
    model.compile(optimizer="sgd", loss=losses.TripletHardLoss())
    with pytest.raises(tf.errors.InvalidArgumentError, match="not whole numbers"):
        model.fit(x, labels, batch_size=GLOBAL_BATCH, verbose=0)
    assert losses.TripletHardLoss()(labels.round(), x).numpy() >= 0  # whole floats are fine


def test_fit_logs_the_step_metrics_to_history_and_tensorboard(tmp_path):
    model, history = fitted(
        "semihard",
        mirrored_strategy(2),
        epochs=2,
        callbacks=[keras.callbacks.TensorBoard(str(tmp_path / "logs"), update_freq=1)],
    )
    assert set(FIT_METRICS) <= set(history.history)
    assert all(len(v) == 2 for v in history.history.values())
    tags = set()
    for event_file in (tmp_path / "logs" / "train").glob("events.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            tags |= {v.tag for v in event.summary.value}
    for name in ("loss", "active_triplet_fraction", "cross_replica_negative_fraction"):
        assert f"epoch_{name}" in tags and f"batch_{name}" in tags, (name, tags)


def test_evaluate_predict_and_saving(tmp_path):
    x, y = batches()
    model, _ = fitted("semihard", mirrored_strategy(2))
    single, _ = fitted("semihard")
    replicated = model.evaluate(x, y, batch_size=GLOBAL_BATCH, verbose=0, return_dict=True)
    one = single.evaluate(x, y, batch_size=GLOBAL_BATCH, verbose=0, return_dict=True)
    assert replicated["loss"] == pytest.approx(one["loss"], rel=1e-5)
    embedded = single.predict(x, verbose=0)
    per_batch = [
        losses.triplet_semihard_loss(y[i : i + GLOBAL_BATCH], embedded[i : i + GLOBAL_BATCH], 0.5)
        for i in range(0, len(x), GLOBAL_BATCH)
    ]
    expected = np.mean(per_batch)
    assert one["loss"] == pytest.approx(expected, rel=1e-5)
    embeddings = model.predict(x, batch_size=GLOBAL_BATCH, verbose=0)
    np.testing.assert_allclose(embeddings, single.predict(x, verbose=0), rtol=1e-5, atol=1e-6)

    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert isinstance(loaded, GlobalMiningModel) and loaded.loss.margin == 0.5
    assert_same_weights(loaded, model)
    # The loaded model runs on one device: its batches of 32 round differently in the
    # last bit from the replicas' slices of 16 (seen on an AMD CPU), hence allclose.
    np.testing.assert_allclose(loaded.predict(x, verbose=0), embeddings, rtol=1e-5, atol=1e-6)
    model.embedding_model.save(tmp_path / "embedding.keras")  # the wrapped model alone
    alone = keras.models.load_model(tmp_path / "embedding.keras")
    assert_same_weights(alone, model.embedding_model)
    np.testing.assert_allclose(alone.predict(x, verbose=0), embeddings, rtol=1e-5, atol=1e-6)


def assert_same_weights(loaded, saved):
    """Every weight of the saved model, bit for bit."""
    assert [w.name for w in loaded.weights] == [w.name for w in saved.weights]
    for got, want in zip(loaded.weights, saved.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=want.path)


def test_backup_and_restore_resumes_to_the_same_weights(tmp_path):
    x, y = batches()
    x, y = np.concatenate([x] * 2), np.concatenate([y] * 2)  # 6 steps an epoch
    uninterrupted, _ = fitted("hard", mirrored_strategy(2), x=x, y=y, epochs=3)

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("killed")

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="killed"):
        fitted("hard", mirrored_strategy(2), x=x, y=y, epochs=3, callbacks=[backup, Crash()])
    # A new process would build the model afresh (other initial weights) and resume.
    resumed, history = fitted(
        "hard", mirrored_strategy(2), seed=7, x=x, y=y, epochs=3, callbacks=[backup]
    )
    assert len(history.history["loss"]) == 1  # only the epoch that was lost
    difference = relative_difference(
        uninterrupted.embedding_model.get_weights(), resumed.embedding_model.get_weights()
    )
    assert difference < 1e-6


def test_mixed_precision_fit_under_a_loss_scale_optimizer():
    x, y = batches()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with mirrored_strategy(2).scope():
            model = GlobalMiningModel(embedding_net())
            model.compile(optimizer="sgd", loss=losses.TripletSemiHardLoss(margin=0.5))
        history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=2, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.all(np.isfinite(history.history["loss"]))
    assert model.predict(x, verbose=0).dtype == np.float16


def test_xla_is_refused_by_name_and_auto_runs_without_it():
    # The mining's shapes depend on the labels; XLA cannot compile them (on one GPU
    # Keras' 'auto' would pick XLA, so it is taken as False).
    with pytest.raises(ValueError, match="jit_compile=True.*positives each anchor has"):
        fitted("semihard", jit=True)
    model, _ = fitted("semihard", jit="auto")
    assert model.jit_compile is False


def test_mistakes_in_compile_are_named():
    model = GlobalMiningModel(embedding_net())
    with pytest.raises(ValueError, match="mined over a batch.*TripletLoss"):
        model.compile(optimizer="sgd", loss=losses.TripletLoss())
    with pytest.raises(ValueError, match="metrics"):
        model.compile(optimizer="sgd", loss=losses.TripletHardLoss(), metrics=["accuracy"])
    with pytest.raises(TypeError, match="wraps a keras.Model"):
        GlobalMiningModel(lambda x: x)
    with pytest.raises(ValueError, match="cannot take CrossBatchMemory.*train.cross_batch_memory"):
        model.compile(loss=losses.CrossBatchMemory(losses.SupConLoss(), memory_size=64))
