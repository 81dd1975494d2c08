"""`python -m trainer.doctor` on this CPU machine: alone, under launch/mirrored.sh on
logical CPUs and under two Horovod workers; and the failures it must name."""

import os
import subprocess
import sys

from tests.jobs import HOROVOD_2, ROOT, job_env
from trainer.doctor import shared_gpus

MIRRORED_SH = os.path.join(ROOT, "launch", "mirrored.sh")


def doctor(*args, launcher=(), env=None, timeout=300):
    command = [*launcher, "doctor"] if launcher else [sys.executable, "-m", "trainer.doctor"]
    return subprocess.run(
        [*command, *args],
        cwd=ROOT,
        env={**job_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_one_process_is_well_and_says_what_it_checked():
    done = doctor()
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    out = done.stdout
    assert "tensorflow:  TensorFlow 2.21" in out and "CPU build" in out
    assert "backend:     single, 1 replica(s)" in out
    assert "worker 0:    host " in out
    assert "horovod:     0.28.1 with Gloo" in out
    assert "exactness:   20 steps, global batch 16, against one device" in out
    assert out.rstrip().endswith("doctor: all is well")
    assert "steps/s" in out


def test_mirrored_script_runs_the_doctor_on_every_replica():
    done = doctor("--steps=5", "--gin_param=distribute.cpu_replicas=2", launcher=(MIRRORED_SH,))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "backend:     mirrored, 2 replica(s)" in done.stdout
    assert "device:CPU:0, /job:localhost/replica:0/task:0/device:CPU:1" in done.stdout
    assert "global batch 32, against one device" in done.stdout and ": ok" in done.stdout


def test_two_horovod_workers_each_report_their_device_and_agree_with_one_device():
    done = doctor("--steps=5", launcher=HOROVOD_2)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "backend:     horovod, 2 replica(s)" in done.stdout
    assert "worker 0:    host" in done.stdout and "worker 1:    host" in done.stdout
    assert "local rank 1" in done.stdout
    assert "doctor: all is well" in done.stdout


def test_a_step_that_differs_from_one_device_fails_with_the_reason():
    """Mining each replica's slice alone is not the global batch's loss: the check sees it."""
    done = doctor("--steps=3", "--mining=per_replica", "--gin_param=distribute.cpu_replicas=2")
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    assert ": FAILED" in done.stdout
    assert "problem:     the 2-replica step differs from one device" in done.stderr


def test_gpus_that_this_tensorflow_cannot_see_are_a_problem(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA A100'\necho 'GPU 1: NVIDIA A100'\n")
    smi.chmod(0o755)
    done = doctor("--steps=2", env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    assert "driver:      2 GPU(s) listed by nvidia-smi" in done.stdout
    assert (
        "nvidia-smi lists 2 GPU(s) but TensorFlow sees none (this TensorFlow is a CPU build)"
        in (done.stderr)
    )


def test_a_bad_setting_is_named_with_status_2():
    done = doctor("--rows_per_replica=6")
    assert done.returncode == 2
    assert "--rows_per_replica must be a positive multiple of 4, got 6" in done.stderr


def test_two_workers_of_one_host_on_one_gpu_are_a_problem():
    workers = [
        (0, "node1", 0, ["/GPU:0"], ["0000:07:00.0"]),
        (1, "node1", 1, ["/GPU:0"], ["0000:07:00.0"]),
        (2, "node2", 0, ["/GPU:0"], ["0000:07:00.0"]),  # another host: its own GPU
        (3, "node2", 1, ["/GPU:0"], ["0000:0b:00.0"]),
    ]
    assert shared_gpus(workers) == ["workers 0 and 1 on host node1 share GPU 0000:07:00.0"]
    assert shared_gpus(workers[2:]) == []
