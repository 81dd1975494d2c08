"""Elastic Horovod (launch/horovod.sh --elastic): a job that gains or loses a worker goes on,
and trains exactly as it would have without the change.

Two "hosts" on this machine, localhost and 127.0.0.1, stand for two nodes; the host
discovery script prints what a file lists, so the test can add one.
"""

import os
import signal
import time

import numpy as np
import psutil

from tests.jobs import ROOT, is_worker, run_job, scalars, start_job, wait_for, workers_of

ELASTIC_JOB = (
    "train.steps=5000",  # far more than it runs: SIGTERM ends it
    "train.global_batch_size=64",
    "train.log_every=1",
    "train.elastic_commit_every=5",
    "train.checkpoint_every=100000",
    "train.eval_every=100000",
    "train.export_model=False",
)


def replicas_by_step(workdir) -> dict:
    """{step: replica count} as the chief logged it (a replayed step: its last value)."""
    if not os.path.isdir(workdir):
        return {}
    try:
        return {step: int(n) for step, n in scalars(workdir, "train/replicas").items()}
    except KeyError:  # nothing written yet
        return {}


def steps_with(workdir, count: int, after: int = 0) -> int:
    return sum(1 for s, n in replicas_by_step(workdir).items() if n == count and s > after)


def test_an_elastic_job_goes_on_when_a_worker_joins_and_when_the_chief_dies(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:1\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat '{hosts}'\n")
    discover.chmod(0o755)
    workdir = tmp_path / "elastic"
    launcher = (os.path.join(ROOT, "launch", "horovod.sh"), "--elastic", "1", "2", str(discover))
    # Starting on one host, horovodrun cannot compare the hosts' network interfaces.
    job = start_job(workdir, ELASTIC_JOB, launcher, HOROVODRUN_ARGS="--network-interface lo")
    tree = psutil.Process(job.pid)
    try:
        wait_for(lambda: steps_with(workdir, 1) >= 3, job, interval=0.5)
        hosts.write_text("localhost:1\n127.0.0.1:1\n")  # a second node comes up
        wait_for(lambda: steps_with(workdir, 2) >= 10, job, interval=0.5)
        first = [
            p
            for p in workers_of(tree)
            if is_worker(p) and p.environ().get("HOROVOD_HOSTNAME") == "localhost"
        ]
        assert len(first) == 1, [p.cmdline() for p in workers_of(tree)]
        last_with_two = max(replicas_by_step(workdir))
        first[0].kill()  # the chief since step 1; the worker that joined must take over
        killed_at = time.time()
        wait_for(lambda: steps_with(workdir, 1, after=last_with_two) >= 1, job, interval=0.1)
        print(f"training went on {time.time() - killed_at:.1f} s after the chief was killed")
        wait_for(lambda: steps_with(workdir, 1, after=last_with_two) >= 10, job, interval=0.5)
        job.send_signal(signal.SIGTERM)
        stdout, stderr = job.communicate(timeout=120)
    finally:
        for p in [*workers_of(tree), tree]:
            try:
                p.kill()
            except psutil.Error:
                pass
    assert job.returncode == 0, stdout[-3000:] + stderr[-5000:]
    stopped = int(stdout.split("stopped by SIGTERM at step ")[1].split()[0])

    by_step = replicas_by_step(workdir)
    assert sorted(by_step) == list(range(1, stopped + 1))
    counts = [by_step[s] for s in sorted(by_step)]
    phases = [n for i, n in enumerate(counts) if i == 0 or n != counts[i - 1]]
    assert phases == [1, 2, 1], phases
    assert "elastic: 2 worker(s), training from step" in stdout
    assert stdout.count("elastic: 1 worker(s), training from step") == 2, stdout

    # The same history without elastic Horovod: one process to the step before the join,
    # two (horovod.sh 2) to the last commit before the kill, one to the end, resuming
    # from checkpoints in between. The loss must be the same at every step. (Against one
    # uninterrupted process it also agrees, up to float rounding: the two-worker steps
    # sum in another order, and training amplifies that, to ~1e-4 after 50 steps.)
    joined, left = [s for s in range(2, stopped + 1) if by_step[s] != by_step[s - 1]]
    reference = tmp_path / "reference"
    horovod_2 = (os.path.join(ROOT, "launch", "horovod.sh"), "2")
    for launcher, first, last in (
        ((), 1, joined - 1),
        (horovod_2, joined, left - 1),
        ((), left, stopped),
    ):
        strategy = "auto" if launcher else "single"
        params = (
            *ELASTIC_JOB,
            f"distribute.strategy='{strategy}'",
            f"train.stop_after_steps={last - first + 1}",
        )
        run_job(reference, params, launcher)
    expected, got = scalars(reference, "train/loss"), scalars(workdir, "train/loss")
    assert sorted(got) == sorted(expected) == list(range(1, stopped + 1))
    differences = [abs(got[s] - expected[s]) / abs(expected[s]) for s in range(1, stopped + 1)]
    print(
        f"joined at step {joined}, back to one at {left}, stopped at {stopped}; largest "
        f"relative loss difference {max(differences):.1e}"
    )
    for step in range(1, stopped + 1):
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-6, err_msg=f"step {step}")
    assert os.path.exists(workdir / "checkpoints" / f"ckpt-{stopped}.index")
