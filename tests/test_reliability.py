"""Nothing lost, nothing hung: SIGKILL and resume, SIGTERM checkpoints, a dead worker."""

import contextlib
import os
import signal
import time

import numpy as np
import tensorflow as tf

from tests.jobs import (
    HOROVOD_2,
    all_gone,
    is_worker,
    killing_all_at_exit,
    logged_steps,
    run_job,
    scalars,
    start_job,
    wait_for,
    workers_of,
)

RESUMABLE_JOB = (
    "distribute.strategy='single'",
    "train.steps=40",
    "train.checkpoint_every=10",
    "train.log_every=1",
    "train.eval_every=1000",
    "export.enabled=False",
)


def test_a_job_killed_with_sigkill_resumes_as_if_never_stopped(tmp_path):
    straight = tmp_path / "straight"
    run_job(straight, RESUMABLE_JOB)
    killed = tmp_path / "killed"
    job = start_job(killed, RESUMABLE_JOB)
    # Killed as soon as the first checkpoint is complete (its index file names it).
    wait_for(lambda: tf.train.latest_checkpoint(str(killed / "checkpoints")), job)
    job.send_signal(signal.SIGKILL)
    job.communicate()
    assert job.returncode == -signal.SIGKILL
    resumed = run_job(killed, RESUMABLE_JOB)
    assert "resumed from" in resumed.stdout and "at step 10" in resumed.stdout
    expected, got = scalars(straight, "train/loss"), scalars(killed, "train/loss")
    assert sorted(got) == list(range(1, 41))
    for step in range(11, 41):
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-4)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    params = RESUMABLE_JOB[:1] + (
        "train.steps=100000",
        "train.checkpoint_every=100000",
        "train.log_every=1",
        "export.enabled=False",
    )
    job = start_job(tmp_path, params)
    wait_for(lambda: logged_steps(tmp_path) >= 5, job)
    job.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 0, stderr[-3000:]
    assert "stopped by SIGTERM at step" in stdout
    step = int(stdout.split("stopped by SIGTERM at step ")[1].split()[0])
    assert 5 <= step < 100000
    assert os.path.exists(tmp_path / "checkpoints" / f"ckpt-{step}.index")


@contextlib.contextmanager
def long_horovod_job(workdir):
    """A 2-worker job under launch/horovod.sh, once it has logged 3 steps: (launcher,
    worker processes). Whatever happens, nothing is left running afterwards."""
    params = ("train.steps=100000", "train.log_every=1", "train.checkpoint_every=100000")
    job = start_job(workdir, params, HOROVOD_2)
    with killing_all_at_exit(job) as tree:
        wait_for(lambda: logged_steps(workdir) >= 3, job)
        workers = [p for p in workers_of(tree) if is_worker(p)]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        yield job, workers


def test_a_dead_horovod_worker_ends_the_job_instead_of_hanging(tmp_path):
    with long_horovod_job(tmp_path) as (job, workers):
        rank_1 = [p for p in workers if p.environ().get("HOROVOD_RANK") == "1"]
        killed_at = time.time()
        rank_1[0].kill()
        job.communicate(timeout=120)
        ended_after = time.time() - killed_at
        assert job.returncode != 0
        print(f"the job ended {ended_after:.1f} s after a worker was killed")
        assert ended_after < 60, ended_after
        assert all_gone(workers)


def test_sigterm_to_the_horovod_launcher_stops_all_workers_at_one_checkpoint(tmp_path):
    with long_horovod_job(tmp_path) as (job, workers):
        job.send_signal(signal.SIGTERM)  # the launcher only, as a batch scheduler would
        stdout, stderr = job.communicate(timeout=120)
        assert job.returncode == 0, stderr[-3000:]
        step = int(stdout.split("stopped by SIGTERM at step ")[1].split()[0])
        assert os.path.exists(tmp_path / "checkpoints" / f"ckpt-{step}.index")
        assert all_gone(workers)


def test_a_checkpoint_cut_short_by_a_kill_is_ignored(tmp_path):
    """TensorFlow writes a checkpoint's files before the index that names it: files of a
    save that was killed half-way are never read; the job resumes from the one before."""
    params = RESUMABLE_JOB[:1] + (
        "train.checkpoint_every=10",
        "train.eval_every=1000",
        "export.enabled=False",
    )
    run_job(tmp_path, params + ("train.steps=20",))
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "ckpt-30.index").write_bytes(b"half written")
    (checkpoints / "ckpt-30.data-00000-of-00001").write_bytes(b"\0" * 100)
    resumed = run_job(tmp_path, params + ("train.steps=30",))
    assert "resumed from" in resumed.stdout and "ckpt-20 at step 20" in resumed.stdout
    assert tf.train.latest_checkpoint(str(checkpoints)).endswith("ckpt-30")
    assert (
        tf.train.load_checkpoint(str(checkpoints / "ckpt-30")).get_tensor(
            "step/.ATTRIBUTES/VARIABLE_VALUE"
        )
        == 30
    )
