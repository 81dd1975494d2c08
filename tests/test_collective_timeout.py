"""`distribute.timeout_seconds`: a 45 s pause of one worker is survived exactly, a worker
stopped for good ends the job naming it, on Horovod and on MultiWorkerMirrored."""

import inspect
import json
import os
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from data.errors import InputError
from tests.jobs import HOROVOD_2, multi_worker_2, run_job, scalars, stop_rank_1
from trainer.backends import collective_timeout, heartbeat

PAUSE_SECONDS = 45  # longer than Gloo's 30 s and than TensorFlow's 10 s heartbeat default
SHORT_TIMEOUT = 20
JOB = (
    "train.steps=10",
    "train.log_every=1",
    "train.checkpoint_every=5",
    "train.eval_every=1000",
    "export.enabled=False",
)


@pytest.mark.parametrize("backend", ["horovod", "multi_worker"])
def test_a_45_second_pause_of_one_worker_is_survived_exactly(tmp_path, backend):
    launcher, env = (HOROVOD_2, {}) if backend == "horovod" else multi_worker_2()
    straight = tmp_path / "straight"
    run_job(straight, JOB, launcher, timeout=600, env=env)
    paused = tmp_path / "paused"
    status, _, stderr, took = stop_rank_1(paused, launcher, JOB, PAUSE_SECONDS, **env)
    assert status == 0, stderr[-3000:]
    assert took > PAUSE_SECONDS
    expected, got = scalars(straight, "train/loss"), scalars(paused, "train/loss")
    assert sorted(got) == list(range(1, 11))
    for step in got:
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-5)


@pytest.mark.parametrize("backend", ["horovod", "multi_worker"])
def test_a_worker_stopped_for_good_ends_the_job_naming_it(tmp_path, backend):
    launcher, env = (HOROVOD_2, {}) if backend == "horovod" else multi_worker_2()
    params = JOB + ("train.steps=100000", f"distribute.timeout_seconds={SHORT_TIMEOUT}")
    checkpoints = str(tmp_path / "checkpoints")
    status, _, stderr, took = stop_rank_1(
        tmp_path, launcher, params, None, lambda: tf.train.latest_checkpoint(checkpoints), **env
    )
    print(f"{backend}: the job ended {took:.1f} s after worker 1 was stopped")
    assert status == collective_timeout.EXIT_STATUS, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]  # the stopped worker says nothing
    line = errors[0]
    assert f"distribute.timeout_seconds={SHORT_TIMEOUT} at step " in line
    assert f"not answering: rank 1 on host {socket.gethostname()} (silent for " in line
    assert "rank 0" not in line.split("not answering:")[1]
    last = tf.train.latest_checkpoint(checkpoints)
    assert last and f"the last complete checkpoint is {last}: the same command resumes" in line, (
        line
    )
    assert SHORT_TIMEOUT <= took < SHORT_TIMEOUT + 45, took


@pytest.mark.parametrize("backend", ["horovod", "multi_worker"])
def test_a_worker_alive_but_stuck_ends_the_job_saying_where_it_is(tmp_path, backend):
    """Its heartbeat goes on, so only what its main thread was doing singles it out.
    On Horovod its Horovod thread also goes on answering, so neither Gloo's timeout nor
    the stall shutdown fires: the other worker's watchdog ends the job."""
    launcher, env = (HOROVOD_2, {}) if backend == "horovod" else multi_worker_2()
    params = JOB + ("train.steps=100000", f"distribute.timeout_seconds={SHORT_TIMEOUT}")
    hung = os.path.join(os.path.dirname(__file__), "hung_worker")
    status, _, stderr, took = stop_rank_1(
        tmp_path, launcher, params, None, stop_with=signal.SIGUSR1, PYTHONPATH=hung, **env
    )
    print(f"{backend}: the job ended {took:.1f} s after worker 1 hung")
    assert status == collective_timeout.EXIT_STATUS, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    print(line)
    assert f"distribute.timeout_seconds={SHORT_TIMEOUT} at step " in line
    assert "not answering: rank 1 on host " in line
    # At the others' step, or behind it (the others dispatch steps ahead of reading them).
    assert ("(alive at step " in line or "(still at step " in line) and (
        "; in hang_forever (tests/hung_worker/sitecustomize.py:" in line
    ), line
    assert SHORT_TIMEOUT <= took < heartbeat.stall_after(SHORT_TIMEOUT) + 30, took


def test_a_bad_timeout_is_refused_naming_the_setting(tmp_path):
    done = run_job(tmp_path, ("distribute.timeout_seconds=0",), check=False)
    assert done.returncode == 2
    assert "distribute.timeout_seconds must be a number of seconds > 0, got 0" in done.stderr
    for bad in ("-3", "'600'", "True"):
        with pytest.raises(InputError, match="distribute.timeout_seconds"):
            collective_timeout.checked(eval(bad))


def test_horovod_gets_the_timeout_for_gloo_and_for_its_stall_check():
    assert collective_timeout.horovod_environment(600) == {
        "HOROVOD_GLOO_TIMEOUT_SECONDS": "600",
        "HOROVOD_STALL_CHECK_TIME_SECONDS": "60",
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "600",
    }
    short = collective_timeout.horovod_environment(20)
    assert short["HOROVOD_STALL_CHECK_TIME_SECONDS"] == "20"  # warned no later than shut


def test_timed_out_collectives_are_told_from_other_errors():
    gloo = tf.errors.UnknownError(
        None, None, "Graph execution error: ... Timed out waiting 600000ms for recv operation"
    )
    assert collective_timeout.collective_failed(gloo)
    assert collective_timeout.collective_failed(tf.errors.DeadlineExceededError(None, None, ""))
    try:
        try:
            raise tf.errors.UnavailableError(
                None, None, "tasks are unhealthy (stopped sending heartbeats): task:1"
            )
        except tf.errors.UnavailableError as cause:
            raise RuntimeError("step failed") from cause
    except RuntimeError as chained:
        assert collective_timeout.collective_failed(chained)
    assert not collective_timeout.collective_failed(ValueError("Timed out waiting"))
    assert not collective_timeout.collective_failed(
        tf.errors.InvalidArgumentError(None, None, "Incompatible shapes: [3] vs. [4]")
    )


def write_heartbeat(workdir, rank, **fields):
    folder = workdir / heartbeat.FOLDER
    folder.mkdir(exist_ok=True)
    record = {"rank": rank, "host": "node-a", "pid": 1, "step": 10, "time": 1000.0, **fields}
    (folder / f"worker-{rank}.json").write_text(json.dumps(record))


def test_the_silent_worker_is_named_from_the_heartbeats(tmp_path):
    # timeout 60: a heartbeat every 6 s, silent after 18 s.
    write_heartbeat(tmp_path, 0, time=1060.0)
    write_heartbeat(tmp_path, 1, time=1059.0)
    write_heartbeat(tmp_path, 2, time=1020.0, step=7)
    write_heartbeat(tmp_path, 5, time=0.0)  # another run's rank: not of this job
    named = heartbeat.unanswering(str(tmp_path), 4, me=0, timeout_seconds=60, now=1061.0)
    assert named == [
        "rank 2 on host node-a (silent for 41 s; last heard at step 7)",
        "rank 3 (never started: no heartbeat)",
    ]


def test_a_worker_alive_but_behind_is_named_when_none_fell_silent(tmp_path):
    write_heartbeat(tmp_path, 0, time=1060.0, step=12)
    write_heartbeat(tmp_path, 1, time=1060.0, step=12)
    write_heartbeat(tmp_path, 2, time=1060.0, step=11, doing="in save (checkpoints.py:9)")
    named = heartbeat.unanswering(str(tmp_path), 3, me=1, timeout_seconds=60, now=1061.0)
    assert named == [
        "rank 2 on host node-a (still at step 11, the others at 12; in save (checkpoints.py:9))"
    ]


def test_with_every_worker_alive_at_one_step_each_one_s_whereabouts_are_said(tmp_path):
    write_heartbeat(tmp_path, 0, time=1060.0, doing="in quick_execute (execute.py:53)")
    write_heartbeat(tmp_path, 1, time=1060.0, doing="in sleep (hang.py:4) from trainer/loop.py:9")
    named = heartbeat.unanswering(str(tmp_path), 2, me=0, timeout_seconds=60, now=1061.0)
    assert named == [
        "rank 1 on host node-a (alive at step 10; in sleep (hang.py:4) from trainer/loop.py:9)"
    ]


def test_the_heartbeat_says_where_the_main_thread_is():
    said, done = [], threading.Event()

    def look():
        time.sleep(0.2)  # the main thread is in done.wait() by then
        said.append(heartbeat.main_thread_doing())
        done.set()

    threading.Thread(target=look).start()
    done.wait()
    waiting_at = inspect.currentframe().f_lineno - 1
    assert said[0].startswith("in wait (threading.py:"), said
    assert said[0].endswith(f") from tests/test_collective_timeout.py:{waiting_at}"), said


def test_a_worker_whose_process_ended_on_this_host_is_named(tmp_path):
    child = subprocess.Popen(["true"])  # its pid is free once it has been reaped
    child.wait()
    write_heartbeat(tmp_path, 0, host=socket.gethostname(), pid=os.getpid(), time=time.time())
    write_heartbeat(tmp_path, 1, host=socket.gethostname(), pid=child.pid, time=time.time())
    named = heartbeat.unanswering(str(tmp_path), 2, me=0, timeout_seconds=600)
    assert named == [f"rank 1 on host {socket.gethostname()} (its process {child.pid} is gone)"]


def test_the_heartbeat_is_written_at_once_and_then_carries_the_step(tmp_path):
    # A heartbeat every 15 s at this timeout, but a new step is written within ~1 s.
    beating = heartbeat.start(str(tmp_path), rank=3, timeout_seconds=600)
    try:
        path = tmp_path / heartbeat.FOLDER / "worker-3.json"
        first = json.loads(path.read_text())
        assert (first["rank"], first["step"], first["pid"]) == (3, 0, os.getpid())
        heartbeat.at_step(42)
        assert heartbeat.current_step() == 42
        deadline = time.time() + 5
        while json.loads(path.read_text())["step"] != 42:
            assert time.time() < deadline, "the heartbeat never carried the step"
            time.sleep(0.1)
        assert json.loads(path.read_text())["time"] > first["time"]
    finally:
        heartbeat.stop()
    assert not beating._thread.is_alive() or beating._stop.is_set()
    assert heartbeat.current_step() is None


def test_the_watchdog_acts_on_a_wait_in_tensorflow_not_on_a_hang_of_its_own(tmp_path):
    """The main thread blocked in a TensorFlow op (a dequeue from an empty queue, as a
    collective whose peer never comes) with no progress past the timeout: `on_stall` is
    called, here to unblock it. Stuck in Python instead (a sleep), it is not called:
    that worker is the stuck one, and the others name it."""
    queue = tf.queue.FIFOQueue(1, tf.float32)
    stalls = []

    def on_stall():
        stalls.append(time.monotonic())
        queue.enqueue(1.0)

    watch = heartbeat.Heartbeat(str(tmp_path), 0, timeout_seconds=0.5, on_stall=on_stall)
    watch.start()
    try:
        watch.progress_at = started = time.monotonic()  # as heartbeat.at_step does
        assert float(queue.dequeue()) == 1.0  # blocks until the watchdog acts
        assert len(stalls) == 1
        assert heartbeat.stall_after(0.5) <= stalls[0] - started < heartbeat.stall_after(0.5) + 3
    finally:
        watch.stop()

    own = heartbeat.Heartbeat(str(tmp_path), 0, timeout_seconds=0.5, on_stall=on_stall).start()
    try:
        own.progress_at = time.monotonic()
        time.sleep(heartbeat.stall_after(0.5) + 2.5)  # stuck in Python, not waiting
        assert len(stalls) == 1
    finally:
        own.stop()
