"""The step-time stall of a checkpoint with large class centres, synchronous against
asynchronous (`checkpoints.asynchronous`).

  python -m bench.checkpoint_stall [--classes 1000000] [--dim 128] [--steps 30]
                                   [--rounds 2] [--sample-rate 0.01]

One process holds ArcFace's centres with their Adam slots (1M × 128: 1.5 GiB) and runs
the centre part of a step (bench.centres.centre_step, Partial FC at --sample-rate, global
batch 512). A checkpoint (`trainer.outputs.checkpoints.Checkpoints`, the job's own, with a small
model variable beside the centres) is saved after step `steps // 2`, into a temporary
folder on this machine's disk, in alternating rounds of each mode. Reported per mode,
medians over rounds:
- blocked: the time the step loop spent inside `save` (and, asynchronous, in `settle`
  at each later step, where the loop commits the checkpoint once written, and `finish`);
- stall: the loop's time from the save to the last step, less as many normal steps
  (the median step before the save): what the checkpoint cost the job;
- counted after: the time from the save until the checkpoint counted (its index written).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("synchronous", "asynchronous")


def child(mode: str, classes: int, dim: int, steps: int, sample_rate: float) -> dict:
    """One round of one mode in this process; the figures as a dict."""
    import numpy as np
    import tensorflow as tf

    import losses
    from bench.centres import centre_step
    from trainer.backends.replicas import Replicas
    from trainer.outputs.checkpoints import Checkpoints
    from trainer.step.class_centres import ShardedCentres

    replicas = Replicas()
    loss = losses.ArcFaceLoss(num_classes=classes, sample_rate=sample_rate)
    shards = ShardedCentres(loss, replicas, classes, dim, "adam", schedule=lambda _: 1e-3)
    directory = tempfile.mkdtemp(prefix="bench-checkpoint-stall-")
    checkpoints = Checkpoints(
        directory, replicas, keep=2, centres=shards, asynchronous=mode == "asynchronous",
        model=tf.Variable(np.zeros((1000, 128), np.float32)),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(512, dim)).astype(np.float32))
    y = tf.constant(rng.integers(0, classes, size=512).astype(np.int32))
    step = centre_step(replicas, shards, 512)
    saved_at, times, blocked, counted = steps // 2, [], 0.0, None
    try:
        for s in range(1, steps + 1):
            start = time.perf_counter()
            float(step(x, y)[0])
            began = time.perf_counter()
            if s == saved_at:
                saved = began
                done = checkpoints.save(s, wait=False)
            else:
                done = checkpoints.settle(np.asarray(checkpoints.progress()))
            blocked += (time.perf_counter() - began) * (s >= saved_at)
            if done is not None:
                counted = time.perf_counter() - saved
            times.append(time.perf_counter() - start)
        began = time.perf_counter()
        if checkpoints.finish() is not None:
            counted = time.perf_counter() - saved
        blocked += time.perf_counter() - began
        after = sum(times[saved_at - 1 :]) + time.perf_counter() - began
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    normal = float(np.median(times[1 : saved_at - 1]))  # the first step traces
    return {
        "step_s": normal,
        "blocked_s": blocked,
        "stall_s": after - normal * (steps - saved_at + 1),
        "counted_after_s": counted,
        "bytes": shards.local_bytes(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sample-rate", type=float, default=0.01)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 8:
        parser.error("--steps must be at least 8 (normal steps before the save, and after)")
    settings = (args.classes, args.dim, args.steps, args.sample_rate)
    if args.child:
        print(json.dumps(child(args.child, *settings)), flush=True)
        return
    results = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES:
            command = [
                sys.executable, "-m", "bench.checkpoint_stall", "--child", mode,
                "--classes", str(args.classes), "--dim", str(args.dim),
                "--steps", str(args.steps), "--sample-rate", str(args.sample_rate),
            ]  # fmt: skip
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[mode].append(result)
            print(f"round {round_ + 1} {mode:12s} " + " ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
            ), flush=True)  # fmt: skip
    size = results[MODES[0]][0]["bytes"] / 2**30
    print(f"checkpoint of {args.classes:,} × {args.dim} centres with Adam slots ({size:.2f} GiB), "
          f"medians of {args.rounds} rounds:")  # fmt: skip
    import numpy as np

    for mode in MODES:
        med = {k: float(np.median([r[k] for r in results[mode]])) for k in results[mode][0]}
        print(
            f"  {mode:12s} step {med['step_s']:.3f} s   blocked {med['blocked_s']:.3f} s   "
            f"stall {med['stall_s']:.3f} s   counted {med['counted_after_s']:.3f} s after the save"
        )


if __name__ == "__main__":
    main()
