"""Non-finite values: the run stops naming the step and the last good checkpoint, and never
checkpoints NaN weights; with train.nonfinite='skip' such steps are left out and counted."""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import losses
from data.sampler import PKSampler
from data.sources import Source, digits
from tests.cross_replica_case import global_batch, mirrored
from tests.jobs import gin_bound, run_horovod_2, scalars
from trainer.backends.replicas import Replicas
from trainer.loop import NumericalError, train
from trainer.step.train_step import TrainStep


def poisoned_digits():
    """Digits 0-5 with NaN pixels in one example that the sampler first draws at step 3."""
    clean = digits(classes=(0, 6))
    sampler = PKSampler(clean.labels, 6, 16, seed=0)
    earlier = set(sampler.global_batch(0)) | set(sampler.global_batch(1))
    bad = next(i for i in sampler.global_batch(2) if i not in earlier)  # reported as step 3
    items = clean.items.copy()
    items[bad] = np.nan
    return Source("poisoned digits", items, clean.labels, "pixels", clean.class_names)


def run(workdir, nonfinite, steps):
    with gin_bound({"export.enabled": False, "checkpoints.keep": 100}):
        return train(
            str(workdir),
            Replicas(),
            steps=steps,
            train_data=poisoned_digits,
            nonfinite=nonfinite,
            checkpoint_every=1,
            log_every=1,
            eval_every=1000,
        )


def model_weights(checkpoint):
    # The model's weights, stored once, under the optimizer's path to them.
    names = [n for n, _ in tf.train.list_variables(checkpoint) if "_trainable_variables/" in n]
    assert names
    return {n: tf.train.load_variable(checkpoint, n) for n in names}


def test_a_nan_stops_the_run_before_saving_and_names_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NumericalError, match=r"non-finite (loss|gradient) at step 3 .*ckpt-2"):
        run(tmp_path, "stop", steps=10)
    checkpoints = tmp_path / "checkpoints"
    assert tf.train.latest_checkpoint(str(checkpoints)).endswith("ckpt-2")
    assert not (checkpoints / "ckpt-3.index").exists()
    for value in model_weights(str(checkpoints / "ckpt-2")).values():
        assert np.all(np.isfinite(value))


def test_skip_mode_leaves_bad_steps_out_and_counts_them(tmp_path):
    results = run(tmp_path, "skip", steps=8)
    assert set(results) == {"recall@1", "recall@4", "map@r"}
    skipped = scalars(tmp_path, "train/skipped_steps")
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[8] >= 1
    before = model_weights(str(tmp_path / "checkpoints" / "ckpt-2"))
    after_bad = model_weights(str(tmp_path / "checkpoints" / "ckpt-3"))
    after_good = model_weights(str(tmp_path / "checkpoints" / "ckpt-4"))
    for name, value in before.items():
        np.testing.assert_array_equal(after_bad[name], value)  # the bad step changed nothing
        assert np.all(np.isfinite(after_good[name]))
    assert any(not np.array_equal(after_good[n], before[n]) for n in before)


class SqrtGate(keras.layers.Layer):
    """x · (1 + sqrt(s · x₀²)): finite forward, but a NaN gradient for s from any row whose
    x₀ is 0 (x · 0 / sqrt(0)). A NaN that only the replica holding that row sees."""

    def build(self, input_shape):
        self.s = self.add_weight(shape=(), initializer="ones", name="s")

    def call(self, x):
        return x * (1.0 + tf.sqrt(self.s * tf.square(x[:, :1])))


def gated_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6,)), SqrtGate(), keras.layers.Dense(8)])


@pytest.mark.parametrize("backend", ["single", "mirrored4"])
def test_a_nan_gradient_on_one_replica_changes_no_weight_anywhere(backend):
    """Row 20 of 24 (replica 3 of 4) makes a NaN gradient; the loss stays finite, so
    only a verdict over every replica's gradients catches it, before the update."""
    replicas = Replicas() if backend == "single" else mirrored(4)
    x, labels = global_batch()
    x[20, 0] = 0.0
    with replicas.scope():
        model = gated_model()
        optimizer = keras.optimizers.Adam(0.1)
    step = TrainStep(model, optimizer, losses.TripletSemiHardLoss(margin=0.5), replicas)
    before = [v.numpy().copy() for v in model.variables]
    metrics = step(x, labels)
    assert np.isfinite(metrics["loss"]) and metrics["finite_gradients"] == 0.0
    for value, old in zip(model.variables, before, strict=True):
        np.testing.assert_array_equal(value.numpy(), old)
    assert int(optimizer.iterations.numpy()) == 0
    x[20, 0] = 1.0  # the same step without the bad row applies
    metrics = step(x, labels)
    assert metrics["finite_gradients"] == 1.0 and int(optimizer.iterations.numpy()) == 1
    assert any(
        not np.array_equal(v.numpy(), o) for v, o in zip(model.variables, before, strict=True)
    )


def test_a_nan_gradient_on_one_horovod_worker_changes_no_weight_on_any():
    done = run_horovod_2("tests.horovod_nan_worker")
    for rank in (0, 1):
        assert f"RANK {rank} finite_gradients=0.0 unchanged=True iterations=0" in done.stdout


def test_the_loop_reads_the_device_only_at_log_checkpoint_and_print_steps(tmp_path, monkeypatch):
    """No host sync a step: the metrics wait on the device and are read together at the
    first step's print and at each log or checkpoint step; the one collective outside
    the step (stop requests, unreadable images) runs at those deterministic steps only."""
    from trainer import loop

    reads, agreements = [], []

    def stack(vectors):
        reads.append(len(vectors))
        return tf.stack(vectors)

    class Counted(Replicas):
        def sum_over_processes(self, array):
            if len(array) > 1 and array[0] in (0, 1, False, True):
                agreements.append(len(array) - 1)  # the steps it speaks for
            return super().sum_over_processes(array)

    monkeypatch.setattr(loop, "tf", types.SimpleNamespace(stack=stack))
    with gin_bound({"export.enabled": False}):
        train(
            str(tmp_path),
            Counted(),
            steps=20,
            log_every=5,
            checkpoint_every=10,
            eval_every=1000,
            progress_seconds=1e9,
        )
    assert reads == [1, 4, 5, 5, 5]  # step 1 (printed), then steps 5, 10, 15, 20
    assert agreements == [5, 5, 5, 5]
    assert sorted(scalars(tmp_path, "train/loss")) == [5, 10, 15, 20]


def test_the_next_batch_goes_to_the_devices_before_the_loop_waits_on_a_step(tmp_path, monkeypatch):
    """After dispatching step s the loop stages batch s + 1 (its copy to the devices then
    overlaps step s) before anything that waits on the device (a read of metrics)."""
    from trainer import loop

    events = []
    stage, dispatch = TrainStep.stage, TrainStep.dispatch_staged

    def staging(self, *args):
        events.append("stage")
        return stage(self, *args)

    def dispatching(self, staged):
        events.append("step")
        return dispatch(self, staged)

    def reading(vectors):
        events.append("read")
        return tf.stack(vectors)

    monkeypatch.setattr(TrainStep, "stage", staging)
    monkeypatch.setattr(TrainStep, "dispatch_staged", dispatching)
    monkeypatch.setattr(loop, "tf", types.SimpleNamespace(stack=reading))
    common = dict(steps=4, log_every=2, checkpoint_every=100, eval_every=100)
    with gin_bound({"export.enabled": False}):
        train(str(tmp_path), Replicas(), progress_seconds=1e9, **common)
    # step 1 is printed, steps 2 and 4 logged; the final evaluation reads nothing here.
    assert " ".join(events) == ("stage step stage read step stage read step stage step read"), (
        events
    )


@pytest.mark.parametrize("precision", [None, "mixed_float16"])
@pytest.mark.parametrize("count", [1, 2])
def test_skip_mode_recovers_after_a_long_run_of_bad_steps(precision, count):
    """200 steps of NaN data, then 50 good ones: every bad step is left out, every good
    one applies. (A loss scale halved at each skip would be 2^-185: 0 in float32, and
    every later step skipped.) float32 skips by the global verdict, with no scale;
    mixed_float16 keeps Keras' dynamic scale, floored at 1."""
    from tests.cross_replica_case import build_model
    from trainer.step.learner import OptimizerSettings, build_learner

    replicas = Replicas() if count == 1 else mirrored(count)
    learner = build_learner(
        replicas,
        model=build_model,
        loss=losses.TripletSemiHardLoss(margin=0.5),
        optimizer=OptimizerSettings(name="adam", learning_rate=1e-3),
        global_batch_size=len(global_batch()[1]),
        steps=250,
        seed=0,
        say=lambda *a, **k: None,
        precision=precision,
        nonfinite="skip",
    )
    try:
        x, labels = global_batch()
        bad = np.full_like(x, np.nan)
        finite = [learner.step_fn(bad, labels)["finite_gradients"] for _ in range(200)]
        assert finite == [0.0] * 200
        before = [w.copy() for w in learner.model.get_weights()]
        applied = [learner.step_fn(x, labels)["finite_gradients"] for _ in range(50)]
        after = learner.model.get_weights()
        assert np.abs(after[0] - before[0]).max() > 1e-4  # the first kernel trained
        assert int(learner.optimizer.iterations.numpy()) == sum(applied)
        if precision:
            # The 200 bad steps halved the scale down to its floor, 1; good steps apply.
            assert applied == [1.0] * 50, applied
            assert float(learner.optimizer.dynamic_scale.numpy()) == 1.0
        else:
            assert applied == [1.0] * 50
    finally:
        keras.mixed_precision.set_global_policy("float32")
