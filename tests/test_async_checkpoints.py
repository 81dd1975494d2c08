"""Checkpoints whose class centres are written while the steps go on
(`checkpoints.asynchronous`): what is saved is the step's snapshot, the checkpoint counts
only once everything is on disk, and a kill during the write leaves the one before."""

import errno
import os
import signal
import threading

import numpy as np
import pytest
import tensorflow as tf

from tests.jobs import ROOT, logged_steps, run_job, scalars, start_job, wait_for
from tests.proxy_case import CLASSES, LOSSES, PROXY_JOB
from trainer.backends.replicas import Replicas
from trainer.outputs.checkpoints import Checkpoints
from trainer.step.class_centres import ShardedCentres


def centres() -> ShardedCentres:
    loss = LOSSES["arcface"](seed=1)
    loss.num_classes = CLASSES
    return ShardedCentres(loss, Replicas(), CLASSES, 4, "adam", schedule=lambda _: 0.01)


def gated(shards: ShardedCentres, gate: threading.Event, failure=None):
    """Makes `shards`' part writes wait for `gate` (then fail with `failure`, if given)."""
    write_part = shards.write_part

    def write(*args):
        gate.wait(60)
        if failure is not None:
            raise failure
        return write_part(*args)

    shards.write_part = write


def agreed(checkpoints: Checkpoints):
    """What the step loop does at a log step, on one process."""
    return checkpoints.settle(np.asarray(checkpoints.progress()))


def test_the_snapshot_is_saved_and_counts_only_once_written(tmp_path):
    shards, gate = centres(), threading.Event()
    weights = tf.Variable([1.0, 2.0])
    checkpoints = Checkpoints(str(tmp_path), Replicas(), keep=2, centres=shards,
                              asynchronous=True, weights=weights)  # fmt: skip
    assert checkpoints.save(3) is not None  # synchronous: counts at once
    gated(shards, gate)
    (shard,) = shards.shards
    at_step_5 = shard.centres.numpy().copy()
    assert checkpoints.save(5, wait=False) is None
    shards.apply(tf.ones_like(shard.centres))  # the steps go on: Adam's update in place
    weights.assign([3.0, 4.0])
    assert not np.array_equal(shard.centres.numpy(), at_step_5)
    assert agreed(checkpoints) is None  # still writing: the index names step 3
    assert checkpoints.latest.endswith("ckpt-3")
    assert not (tmp_path / "centres-5.index").exists()
    gate.set()
    checkpoints._pending.finished.wait(60)
    assert agreed(checkpoints).endswith("ckpt-5")
    assert checkpoints.latest.endswith("ckpt-5")
    restored = centres()
    restored.restore(str(tmp_path), 5)
    assert restored.shards[0].centres.numpy().tobytes() == at_step_5.tobytes()
    reader = tf.train.load_checkpoint(str(tmp_path / "ckpt-5"))
    names = [n for n in reader.get_variable_to_shape_map() if n.startswith("weights")]
    np.testing.assert_array_equal(reader.get_tensor(names[0]), [1.0, 2.0])  # before the change
    assert not list(tmp_path.glob("*_temp"))


def test_a_third_save_keeps_two_and_forgets_the_oldest_with_its_centres(tmp_path):
    shards = centres()
    checkpoints = Checkpoints(str(tmp_path), Replicas(), keep=2, centres=shards,
                              asynchronous=True, step_holder=tf.Variable(0))  # fmt: skip
    for step in (2, 4, 6):
        checkpoints.save(step, wait=False)
    assert checkpoints.finish().endswith("ckpt-6")
    assert [os.path.basename(p) for p in checkpoints.manager.checkpoints] == ["ckpt-4", "ckpt-6"]
    assert sorted(p.name for p in tmp_path.glob("*.index")) == [
        "centres-4.index", "centres-6.index", "ckpt-4.index", "ckpt-6.index"
    ]  # fmt: skip


def test_a_write_that_fails_raises_its_own_error_and_leaves_nothing_half_written(tmp_path):
    shards, gate = centres(), threading.Event()
    checkpoints = Checkpoints(str(tmp_path), Replicas(), keep=2, centres=shards,
                              asynchronous=True, step_holder=tf.Variable(0))  # fmt: skip
    checkpoints.save(3)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "centres-5_temp"))
    gated(shards, gate, failure=full)
    checkpoints.save(5, wait=False)
    gate.set()
    with pytest.raises(OSError) as raised:
        checkpoints.finish()
    assert raised.value is full
    assert checkpoints.latest.endswith("ckpt-3")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "centres-3.data-00000-of-00001", "centres-3.index", "checkpoint",
        "ckpt-3.data-00000-of-00001", "ckpt-3.index",
    ]  # fmt: skip


def test_the_job_goes_on_while_centres_are_written_and_a_kill_then_resumes_from_the_one_before(
    tmp_path,
):
    """Checkpoint 6's centres never get written (a hung file system): the steps go on
    past it, the index still names checkpoint 3; killed there, the job resumes from 3
    and ends as an uninterrupted run."""
    params = (*PROXY_JOB, "distribute.cpu_replicas=2", "train.checkpoint_every=3")
    workdir = tmp_path / "killed"
    stalled = os.path.join(os.path.dirname(__file__), "stalled_centres")
    job = start_job(workdir, params, PYTHONPATH=f"{stalled}:{ROOT}", STALLED_CENTRES_STEP="6")
    try:
        wait_for(lambda: logged_steps(workdir) >= 8, job, timeout=240, interval=0.2)
        index = (workdir / "checkpoints" / "checkpoint").read_text()
        assert 'model_checkpoint_path: "ckpt-3"' in index, index
    finally:
        job.send_signal(signal.SIGKILL)
        _, stderr = job.communicate()
    assert "stalling the centres of checkpoint 6" in stderr
    resumed = run_job(workdir, params)
    assert "at step 3" in resumed.stdout, resumed.stdout
    straight = tmp_path / "straight"
    run_job(straight, params)
    got, want = scalars(workdir, "train/loss"), scalars(straight, "train/loss")
    np.testing.assert_allclose([got[s] for s in range(4, 13)], [want[s] for s in range(4, 13)],
                               rtol=1e-5)  # fmt: skip


def test_a_wrong_value_of_the_setting_is_named():
    from data.errors import InputError
    from trainer.outputs.checkpoints import CheckpointSettings, checkpoint_settings

    assert checkpoint_settings() == CheckpointSettings(keep=3, asynchronous=True)
    assert checkpoint_settings(asynchronous=False).asynchronous is False
    with pytest.raises(InputError, match=r"checkpoints.asynchronous must be bool, got 'yes'"):
        checkpoint_settings(asynchronous="yes")
    with pytest.raises(InputError, match=r"checkpoints.keep must be >= 1, got 0"):
        checkpoint_settings(keep=0)
