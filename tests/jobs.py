"""Runs `python -m trainer.main` (alone, or under a launch script) and reads what it wrote."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A short digits job: 6 steps at global batch 64 (4 classes × 16), every step logged.
SHORT_JOB = (
    "train.steps=6",
    "train.global_batch_size=64",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.checkpoint_every=1000",
    "train.export_model=False",
)


def run_job(workdir, params=(), launcher=(), timeout=300, check=True, extra=()):
    """Runs the trainer with `--gin_param`s, optionally under a launch script."""
    command = [*launcher] if launcher else [sys.executable, "-m", "trainer.main"]
    command += [f"--workdir={workdir}", *extra] + [f"--gin_param={p}" for p in params]
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "VENV": os.path.dirname(os.path.dirname(sys.executable)),
    }
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
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
