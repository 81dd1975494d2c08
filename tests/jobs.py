"""Runs `python -m trainer.main` (alone, or under a launch script) and reads what it wrote."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import gin
import numpy as np
import psutil
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOROVOD_SH = os.path.join(ROOT, "launch", "horovod.sh")
HOROVOD_2 = (HOROVOD_SH, "2")  # launcher of two Horovod workers on this machine


def horovodrun(workers: int) -> tuple[str, ...]:
    """horovodrun itself, `workers` workers on this machine (Gloo), for a script's argv."""
    hosts = f"localhost:{workers}"
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    return (horovodrun, "-np", str(workers), "--gloo", "-H", hosts)


HOROVODRUN_2 = horovodrun(2)  # two workers, for a script's argv after it

# A short digits job: 6 steps at global batch 64 (4 classes × 16), every step logged.
SHORT_JOB = (
    "train.steps=6",
    "train.global_batch_size=64",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.checkpoint_every=1000",
    "export.enabled=False",
)


# A job that checkpoints at step 3 and logs every step, on one device: for resume tests.
RESUMABLE_JOB = (
    "distribute.strategy='single'",
    "train.log_every=1",
    "train.checkpoint_every=3",
    "train.eval_every=1000",
    "export.enabled=False",
)


def straight_and_resumed(folder, params=(), steps=6, stop_after=3):
    """Runs `params` for `steps` in one go (folder/straight), and stopped after
    `stop_after` steps then restarted (folder/stopped). Returns both workdirs and the
    output of the stopped run and the restart."""
    straight, stopped = folder / "straight", folder / "stopped"
    run_job(straight, params + (f"train.steps={steps}",))
    cut = run_job(
        stopped, params + (f"train.steps={steps}", f"train.stop_after_steps={stop_after}")
    )
    resumed = run_job(stopped, params + (f"train.steps={steps}",))
    return straight, stopped, cut.stdout, resumed.stdout


def run_horovod_2(
    module: str, *args: str, timeout: int = 300, workers: int = 2
) -> subprocess.CompletedProcess:
    """`python -m module args` on two (or `workers`) Horovod workers of this machine;
    must succeed."""
    done = subprocess.run(
        [*horovodrun(workers), sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def job_command(workdir, params=(), launcher=(), extra=()) -> list[str]:
    """`python -m trainer.main` (or a launch script) with `--gin_param`s."""
    command = [*launcher] if launcher else [sys.executable, "-m", "trainer.main"]
    return command + [f"--workdir={workdir}", *extra] + [f"--gin_param={p}" for p in params]


def job_env(**extra) -> dict:
    """This environment, with the launch scripts pointed at the running virtualenv."""
    venv = os.path.dirname(os.path.dirname(sys.executable))
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "VENV": venv, **extra}


def start_job(workdir, params=(), launcher=(), **env) -> subprocess.Popen:
    """Starts the trainer without waiting (for tests that signal or kill it); `env` is
    added to the environment."""
    return subprocess.Popen(
        job_command(workdir, params, launcher),
        cwd=ROOT,
        env=job_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_job(workdir, params=(), launcher=(), timeout=300, check=True, extra=(), env=None):
    """Runs the trainer with `--gin_param`s, optionally under a launch script; `env` is
    added to the environment."""
    command = job_command(workdir, params, launcher, extra)
    done = subprocess.run(
        command,
        cwd=ROOT,
        env=job_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {done.returncode}\n{done.stdout[-3000:]}\n"
            f"{done.stderr[-5000:]}"
        )
    return done


def read_events(workdir) -> event_accumulator.EventAccumulator:
    events = event_accumulator.EventAccumulator(
        str(workdir), size_guidance={event_accumulator.TENSORS: 0}
    )
    events.Reload()
    return events


def scalars(workdir, tag) -> dict:
    """{step: value} of a scalar tag written with tf.summary."""
    return {
        e.step: float(tf.make_ndarray(e.tensor_proto)) for e in read_events(workdir).Tensors(tag)
    }


def series(workdir, tag) -> np.ndarray:
    values = scalars(workdir, tag)
    return np.array([values[s] for s in sorted(values)])


def scalars_so_far(workdir, tag) -> dict:
    """`scalars` of a running job: {} while the workdir or the tag does not exist yet."""
    if not os.path.isdir(workdir):
        return {}
    try:
        return scalars(workdir, tag)
    except KeyError:  # nothing written yet
        return {}


def logged_steps(workdir) -> int:
    return len(scalars_so_far(workdir, "train/loss"))


def wait_for(condition, process, timeout=300, interval=0.01):
    """Polls `condition` until it holds; fails if `process` ends or time runs out first."""
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(interval)


def workers_of(process) -> list:
    try:
        return process.children(recursive=True)
    except psutil.Error:  # already ended
        return []


def is_worker(process) -> bool:
    try:
        return process.cmdline()[1:3] == ["-m", "trainer.main"]
    except psutil.Error:  # gone meanwhile
        return False


def all_gone(processes) -> bool:
    time.sleep(1)
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)


@contextlib.contextmanager
def killing_all_at_exit(job):
    """The launcher's process tree; whatever happens, nothing is left running after."""
    tree = psutil.Process(job.pid)
    try:
        yield tree
    finally:
        for p in [*workers_of(tree), tree]:
            try:
                p.kill()
            except psutil.Error:
                pass


def multi_worker_2():
    """launch/multi_worker.sh with 2 local workers on ports of their own (the suite runs
    two test files at once)."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    return (os.path.join(ROOT, "launch", "multi_worker.sh"), "local", "2"), {
        "MULTI_WORKER_PORT": str(port)
    }


def worker_of_rank(tree, rank: int):
    """The python worker process of Horovod rank / TF_CONFIG task `rank`."""
    for process in workers_of(tree):
        if not is_worker(process):
            continue
        environ = process.environ()
        task = json.loads(environ.get("TF_CONFIG", "{}")).get("task", {}).get("index")
        if environ.get("HOROVOD_RANK") == str(rank) or task == rank:
            return process
    raise AssertionError(f"no worker of rank {rank} among {workers_of(tree)}")


def stop_rank_1(workdir, launcher, params, pause, ready=None, stop_with=signal.SIGSTOP, **env):
    """Runs the job, stops worker 1 (`stop_with`, SIGSTOP by default) once 3 steps are
    logged (and `ready()`), continues it after `pause` seconds (None: never). Returns
    (exit status, stdout, stderr, seconds from the stop to the job's end)."""
    job = start_job(workdir, params, launcher, **env)
    with killing_all_at_exit(job) as tree:
        wait_for(lambda: logged_steps(workdir) >= 3 and (ready is None or ready()), job)
        worker = worker_of_rank(tree, 1)
        stopped_at = time.time()
        worker.send_signal(stop_with)
        if pause is not None:
            time.sleep(pause)
            worker.send_signal(signal.SIGCONT)
        stdout, stderr = job.communicate(timeout=600)
        return job.returncode, stdout, stderr, time.time() - stopped_at


@contextlib.contextmanager
def gin_bound(bindings: dict):
    """gin bindings (e.g. {"export.enabled": False}) for a direct call of
    trainer.loop.train, whose parts read their own configurables; cleared afterwards."""
    with gin.unlock_config():
        for key, value in bindings.items():
            gin.bind_parameter(key, value)
    try:
        yield
    finally:
        gin.clear_config()
