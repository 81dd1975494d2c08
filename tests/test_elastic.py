"""Elastic Horovod (launch/horovod.sh --elastic): a job that gains or loses a worker goes on,
and trains exactly as it would have without the change.

Two "hosts" on this machine, localhost and 127.0.0.1, stand for two nodes; the host
discovery script prints what a file lists, so the test can add one.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import tensorflow as tf

from tests.jobs import (
    HOROVOD_2,
    HOROVOD_SH,
    ROOT,
    is_worker,
    job_env,
    killing_all_at_exit,
    run_job,
    scalars,
    scalars_so_far,
    start_job,
    wait_for,
    workers_of,
)

ELASTIC_JOB = (
    "train.steps=5000",  # far more than it runs: SIGTERM ends it
    "train.global_batch_size=64",
    "train.log_every=1",
    "train.elastic_commit_every=5",
    "train.checkpoint_every=100000",
    "train.eval_every=100000",
    "export.enabled=False",
)


def replicas_by_step(workdir) -> dict:
    """{step: replica count} as the chief logged it (a replayed step: its last value)."""
    return {step: int(n) for step, n in scalars_so_far(workdir, "train/replicas").items()}


def steps_with(workdir, count: int, after: int = 0) -> int:
    return sum(1 for s, n in replicas_by_step(workdir).items() if n == count and s > after)


def discovery_script(tmp_path, hosts: str):
    """An executable that prints the hosts file it returns with it (the test can edit it)."""
    listing = tmp_path / "hosts"
    listing.write_text(hosts)
    script = tmp_path / "discover.sh"
    script.write_text(f"#!/bin/sh\ncat '{listing}'\n")
    script.chmod(0o755)
    return listing, script


def elastic_launcher(discover, max_workers: int = 2) -> tuple:
    return (HOROVOD_SH, "--elastic", "1", str(max_workers), str(discover))


def trains_on(job, workdir, count: int, steps: int) -> None:
    """Waits until the job has trained `steps` steps on `count` replicas from now on."""
    after = max(replicas_by_step(workdir), default=0)
    wait_for(lambda: steps_with(workdir, count, after) >= steps, job, interval=0.5)


def workers_on(tree, host: str) -> list:
    return [
        p for p in workers_of(tree) if is_worker(p) and p.environ().get("HOROVOD_HOSTNAME") == host
    ]


def phases(by_step: dict) -> list[tuple[int, int, int]]:
    """(replica count, first step, last step) of each stretch with one count."""
    runs = []
    for step in sorted(by_step):
        if runs and runs[-1][0] == by_step[step]:
            runs[-1][2] = step
        else:
            runs.append([by_step[step], step, step])
    return [tuple(r) for r in runs]


def replayed_by_stretches(reference, history: list, params: tuple) -> dict:
    """{step: loss} of the same history without elastic Horovod: each stretch run on its
    own with one process or two (horovod.sh 2), resuming from the checkpoint of the one
    before. Same replica counts at the same steps, so the same sums in the same order."""
    for count, first_step, last_step in history:
        strategy = "single" if count == 1 else "auto"
        stretch = (
            *params,
            f"distribute.strategy='{strategy}'",
            f"train.stop_after_steps={last_step - first_step + 1}",
        )
        run_job(reference, stretch, HOROVOD_2 if count == 2 else ())
    return scalars(reference, "train/loss")


def start_elastic(tmp_path, hosts: str, params: tuple = ELASTIC_JOB):
    """(hosts file, workdir, job): an elastic job on the hosts the file lists (the test
    may edit it), in tmp_path/elastic."""
    listing, discover = discovery_script(tmp_path, hosts)
    workdir = tmp_path / "elastic"
    # Starting on one host, horovodrun cannot compare the hosts' network interfaces.
    job = start_job(
        workdir, params, elastic_launcher(discover), HOROVODRUN_ARGS="--network-interface lo"
    )
    return listing, workdir, job


def stopped_by_sigterm(job) -> tuple[str, str, int]:
    """Ends the job with SIGTERM: (stdout, stderr, the step it stopped at)."""
    job.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return stdout, stderr, int(stdout.split("stopped by SIGTERM at step ")[1].split()[0])


def assert_losses_equal_replay(tmp_path, workdir, history, params, stopped: int) -> float:
    """Every step's loss equals the same history replayed stretch by stretch without
    elastic Horovod (`replayed_by_stretches`); returns the largest relative difference."""
    expected = replayed_by_stretches(tmp_path / "reference", history, params)
    got = scalars(workdir, "train/loss")
    assert sorted(got) == sorted(expected) == list(range(1, stopped + 1))
    for step in range(1, stopped + 1):
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-6, err_msg=f"step {step}")
    return max(abs(got[s] - expected[s]) / abs(expected[s]) for s in got)


def test_an_elastic_job_goes_on_as_workers_join_leave_and_die(tmp_path):
    hosts, workdir, job = start_elastic(tmp_path, "localhost:1\n")
    with killing_all_at_exit(job) as tree:
        trains_on(job, workdir, 1, 3)
        hosts.write_text("localhost:1\n127.0.0.1:1\n")  # a second node comes up...
        trains_on(job, workdir, 2, 5)
        hosts.write_text("localhost:1\n")  # ...is taken away...
        trains_on(job, workdir, 1, 5)
        hosts.write_text("localhost:1\n127.0.0.1:1\n")  # ...and comes back
        # 6 steps: the 6th runs only once both workers have passed the commit of the 5th
        # (commits every 5 steps, and a worker joins at one). A kill before that commit
        # sends the job back to the last one, retraining the stretch on 1 worker.
        trains_on(job, workdir, 2, 6)
        first = workers_on(tree, "localhost")
        assert len(first) == 1, [p.cmdline() for p in workers_of(tree)]
        last_with_two = max(replicas_by_step(workdir))
        first[0].kill()  # the chief since step 1; the worker that joined must take over
        killed_at = time.time()
        wait_for(lambda: steps_with(workdir, 1, after=last_with_two) >= 1, job, interval=0.1)
        print(f"training went on {time.time() - killed_at:.1f} s after the chief was killed")
        trains_on(job, workdir, 1, 5)
        stdout, stderr, stopped = stopped_by_sigterm(job)
    by_step = replicas_by_step(workdir)
    assert sorted(by_step) == list(range(1, stopped + 1))
    history = phases(by_step)
    assert [count for count, _, _ in history] == [1, 2, 1, 2, 1], history
    assert stdout.count("elastic: 2 worker(s), training from step") == 2, stdout
    assert stdout.count("elastic: 1 worker(s), training from step") == 3, stdout
    assert "horovodrun: worker 127.0.0.1[0] left the job (its host was removed)" in stderr
    assert "Fatal Python error" not in stderr  # the removed worker's abort, summarized

    # The same history without elastic Horovod: each stretch run on its own with one
    # process or two (horovod.sh 2), resuming from the checkpoint of the one before. The
    # loss must be the same at every step. (Against one uninterrupted process it agrees
    # only up to float rounding: two workers sum in another order, and training amplifies
    # that, to ~1e-4 relative after 50 steps.)
    worst = assert_losses_equal_replay(tmp_path, workdir, history, ELASTIC_JOB, stopped)
    print(
        f"(replicas, first step, last step): {history}; largest relative loss difference "
        f"{worst:.1e}"
    )
    assert os.path.exists(workdir / "checkpoints" / f"ckpt-{stopped}.index")


def test_an_elastic_job_splits_a_batch_that_its_workers_do_not_divide(tmp_path):
    """64 rows on 3 workers (22/21/21), then on fewer after one dies, to step 30.

    Without elastic Horovod a batch that does not divide is refused, so the 3-worker
    stretch is compared with one process (equal up to float rounding); the rest is
    replayed exactly from the job's own checkpoint at the step it went back to. The
    killed worker is not the chief, which finishes writing that checkpoint. (Killed
    during that save, the chief would leave none, while the others still go back to
    the step in memory.) Its host leaves with it: 2 workers are left if that was
    localhost, 1 if it was 127.0.0.1.
    """
    _, discover = discovery_script(tmp_path, "localhost:1\n127.0.0.1:2\n")
    workdir = tmp_path / "elastic"
    params = (
        *ELASTIC_JOB,
        "train.steps=30",
        "train.checkpoint_every=5",
        "checkpoints.keep=9",
    )
    job = start_job(workdir, params, elastic_launcher(discover, max_workers=3))
    with killing_all_at_exit(job) as tree:
        # Step 6 runs only once every worker has passed step 5's commit. Killed before
        # that, the job would go back to step 0 and retrain every step on fewer workers,
        # leaving no 3-worker stretch to compare.
        trains_on(job, workdir, 3, 6)
        workers = [p for p in workers_of(tree) if is_worker(p)]
        chief = [p for p in workers if p.environ().get("HOROVOD_RANK") == "0"][0]
        chief_host = chief.environ()["HOROVOD_HOSTNAME"]
        [p for p in workers if p.environ()["HOROVOD_HOSTNAME"] != chief_host][0].kill()
        stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stdout[-3000:] + stderr[-5000:]
    assert "elastic: 3 worker(s) (22/21/21 rows), training from step 0" in stdout
    assert (workdir / "results.json").exists()  # the chief at the end wrote the outputs
    history = phases(replicas_by_step(workdir))
    left = 2 if chief_host == "127.0.0.1" else 1
    assert [count for count, _, _ in history] == [3, left], history
    went_back_to = history[1][1] - 1
    got = scalars(workdir, "train/loss")
    assert sorted(got) == list(range(1, 31))

    single = tmp_path / "single"
    run_job(
        single, (*params, "distribute.strategy='single'", f"train.stop_after_steps={went_back_to}")
    )
    expected = scalars(single, "train/loss")
    for step in range(1, went_back_to + 1):
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-5, err_msg=f"step {step}")

    replay = tmp_path / "replay" / "checkpoints"
    replay.mkdir(parents=True)
    for path in (workdir / "checkpoints").glob(f"ckpt-{went_back_to}.*"):
        shutil.copy(path, replay)
    (replay / "checkpoint").write_text(f'model_checkpoint_path: "ckpt-{went_back_to}"\n')
    if left == 2:
        run_job(replay.parent, params, HOROVOD_2)
    else:
        run_job(replay.parent, (*params, "distribute.strategy='single'"))
    expected = scalars(replay.parent, "train/loss")
    assert sorted(expected) == list(range(went_back_to + 1, 31))
    for step in expected:
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-6, err_msg=f"step {step}")
    print(f"{history}: went back to step {went_back_to} after the kill")


@pytest.mark.parametrize(
    "binding, message",
    [
        ("train.stepz=5", "doesn't have a parameter named 'stepz'"),  # before Horovod starts
        ("optimizer.learning_rate=0", "optimizer.learning_rate must be > 0, got 0"),  # after
    ],
)
def test_a_mistake_in_an_elastic_job_is_one_message_and_status_2(tmp_path, binding, message):
    _, discover = discovery_script(tmp_path, "localhost:1\n127.0.0.1:1\n")
    done = run_job(tmp_path / "w", (binding,), elastic_launcher(discover), check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count(message) == 1, done.stderr[-3000:]  # the chief's
    assert re.search(r"horovodrun: worker \S+ exited with status 2", done.stderr)
    assert "Traceback" not in done.stderr


def test_an_elastic_job_under_plain_horovodrun_needs_a_workdir(tmp_path):
    """Workers that join later could not agree on a default workdir with the others."""
    _, discover = discovery_script(tmp_path, "localhost:1\n127.0.0.1:1\n")
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    elastic = ["--min-np", "1", "--max-np", "2", "--host-discovery-script", str(discover)]
    command = [horovodrun, "--gloo", "-np", "2", *elastic, sys.executable, "-m", "trainer.main"]
    env = job_env(PYTHONPATH=ROOT)  # run from tmp_path, to see that it writes nothing
    env.pop("METRIC_TRAINER_RUN_ID", None)
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "An elastic Horovod job needs --workdir" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


class _PeerDiesAtCommit:
    """Replicas whose collectives fail as Horovod's do when a peer has died."""

    def sum_over_processes(self, array):
        raise tf.errors.UnknownError(None, None, "Horovod has been shut down: a peer died")


def test_a_commit_that_a_peer_never_reaches_saves_nothing():
    """Horovod's commit saves, then syncs: a survivor would keep a step whose TensorBoard
    record died, unflushed, with the chief. The state must stay at the last commit."""
    from horovod.common.exceptions import HorovodInternalError

    from trainer.backends.elastic import TrainingState

    variable = tf.Variable([1.0, 2.0])
    state = TrainingState(_PeerDiesAtCommit(), [variable], step=120)
    state.step = 125
    variable.assign([3.0, 4.0])
    with pytest.raises(HorovodInternalError):
        state.commit()
    state.restore()  # what Horovod's loop does on HorovodInternalError
    assert state.step == 120
    np.testing.assert_array_equal(variable.numpy(), [1.0, 2.0])


PROXY_LOSS = (
    "train.loss=@ArcFaceLoss()",
    "ArcFaceLoss.scale=16.0",
    "ArcFaceLoss.num_classes=20",  # 20 centres: 10 a worker when two
    "ArcFaceLoss.sample_rate=0.5",
    "optimizer.learning_rate=0.01",
)


def test_an_elastic_job_reshards_a_proxy_loss_s_centres(tmp_path):
    """ArcFace with Partial FC: 1 worker, a second joins (it receives the whole centres
    and takes its half), then dies (the survivor takes them all back from the commit).
    The loss curve is one device's."""
    params = (*ELASTIC_JOB, *PROXY_LOSS)
    hosts, workdir, job = start_elastic(tmp_path, "localhost:1\n", params)
    with killing_all_at_exit(job) as tree:
        trains_on(job, workdir, 1, 3)
        hosts.write_text("localhost:1\n127.0.0.1:1\n")
        trains_on(job, workdir, 2, 6)  # past the commit of the 5th (see above)
        workers_on(tree, "127.0.0.1")[0].kill()
        trains_on(job, workdir, 1, 5)
        _, _, stopped = stopped_by_sigterm(job)
    history = phases(replicas_by_step(workdir))
    assert [count for count, _, _ in history] == [1, 2, 1], history
    # Against one uninterrupted device the curve agrees only up to float rounding, which
    # Adam and ArcFace's scale amplify with every step (6e-4 relative by step 84 of a run
    # whose second worker joined late, at step 71). Replayed stretch by stretch, the
    # 2-worker stretch resumes the 1-worker checkpoint and reshards the centres as the
    # elastic job did in memory: every step must then agree.
    worst = assert_losses_equal_replay(tmp_path, workdir, history, params, stopped)
    print(f"{history}: largest relative loss difference from the replay {worst:.1e}")


def test_an_elastic_job_waits_out_a_pause_and_drops_a_worker_that_stops_answering(tmp_path):
    """At distribute.timeout_seconds=60, a worker is stopped (SIGSTOP) for 45 s, then for
    good. Gloo's 30 s fails the other's collective either time, which marks it in the
    heartbeat folder and goes to the rendezvous. The pause is waited out: the worker
    continues, finds its collective failed, joins the rendezvous, and the job goes on
    with both. Stopped for good, the worker's guard (its parent on its own "host",
    127.0.0.1; nothing on the other host ends it) sees the mark, and ends it once silent
    for 60 s; the job re-forms without it. Every loss equals the same history of replica
    counts replayed without elastic Horovod."""
    params = (*ELASTIC_JOB, "distribute.timeout_seconds=60")
    _, workdir, job = start_elastic(tmp_path, "localhost:1\n127.0.0.1:1\n", params)
    with killing_all_at_exit(job) as tree:
        # Past the commit of step 5 on two workers: a stop then sends the job back to
        # a commit made by two (before it, all would be retrained by one).
        trains_on(job, workdir, 2, 7)
        (paused,) = workers_on(tree, "127.0.0.1")
        paused.send_signal(signal.SIGSTOP)
        time.sleep(45)
        paused.send_signal(signal.SIGCONT)
        continued_at = time.time()
        trains_on(job, workdir, 2, 3)
        print(f"training went on with both {time.time() - continued_at:.1f} s after the pause")
        assert paused.is_running() and paused.status() != psutil.STATUS_ZOMBIE
        last_with_two = max(replicas_by_step(workdir))
        paused.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        wait_for(lambda: steps_with(workdir, 1, after=last_with_two) >= 1, job, interval=0.5)
        print(f"training went on {time.time() - stopped_at:.1f} s after a worker was stopped")
        trains_on(job, workdir, 1, 3)
        _, stderr, stopped = stopped_by_sigterm(job)
    assert (
        f"warning: elastic: worker {paused.pid} on host {socket.gethostname()} did not answer "
        "(silent for "
    ) in stderr, stderr[-3000:]
    assert "ended by its guard" in stderr
    assert stderr.count("did not answer") == 1  # not for the pause
    by_step = replicas_by_step(workdir)
    assert sorted(by_step) == list(range(1, stopped + 1))
    history = phases(by_step)
    assert [count for count, _, _ in history] == [2, 1], history
    assert_losses_equal_replay(tmp_path, workdir, history, params, stopped)
