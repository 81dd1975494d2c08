"""Cost of elastic Horovod: training speed of a fixed 2-worker job against the same job
under `launch/horovod.sh --elastic`, in one run.

  python -m bench.elastic [--steps 200] [--rounds 3]

Each round runs the default digits job three ways, in turn: `horovod.sh 2`, elastic with
`train.elastic_commit_every=10` (the default) and with 1 (a commit every step). A commit
copies the model and optimizer state to host memory and asks the workers whether hosts
changed (one small broadcast). The figure per job is the median of its logged
`train/examples_per_second` after the first 20 steps; the ratio to the fixed job of the
same round is reported, and the median ratio over rounds. Only the ratios are meaningful
on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOROVOD = os.path.join(ROOT, "launch", "horovod.sh")


def examples_per_second(workdir: str, warmup: int = 20) -> float:
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(
        workdir, size_guidance={event_accumulator.TENSORS: 0}
    )
    events.Reload()
    rates = [
        float(tf.make_ndarray(e.tensor_proto))
        for e in events.Tensors("train/examples_per_second")
        if e.step > warmup
    ]
    return statistics.median(rates)


def run_job(workdir: str, launcher: list[str], steps: int, extra=(), env=None) -> float:
    params = (
        f"train.steps={steps}",
        "train.log_every=1",
        "train.eval_every=100000",
        "train.checkpoint_every=100000",
        "export.enabled=False",
        *extra,
    )
    command = [*launcher, f"--workdir={workdir}", *[f"--gin_param={p}" for p in params]]
    venv = os.path.dirname(os.path.dirname(sys.executable))
    done = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "VENV": venv, **(env or {})},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return examples_per_second(workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        discover = os.path.join(tmp, "discover.sh")
        with open(discover, "w") as f:
            f.write("#!/bin/sh\necho localhost:2\n")
        os.chmod(discover, 0o755)
        elastic = [HOROVOD, "--elastic", "2", "2", discover]
        one_host = {"HOROVODRUN_ARGS": "--network-interface lo"}
        modes = {
            "fixed": ([HOROVOD, "2"], (), None),
            "elastic, commit every 10": (elastic, ("train.elastic_commit_every=10",), one_host),
            "elastic, commit every 1": (elastic, ("train.elastic_commit_every=1",), one_host),
        }
        ratios = {mode: [] for mode in modes if mode != "fixed"}
        for round_index in range(args.rounds):
            rates = {}
            for mode, (launcher, extra, env) in modes.items():
                workdir = os.path.join(tmp, f"{round_index}-{len(rates)}")
                rates[mode] = run_job(workdir, launcher, args.steps, extra, env)
                print(f"round {round_index + 1}: {mode}: {rates[mode]:,.0f} examples/s", flush=True)
            for mode in ratios:
                ratios[mode].append(rates[mode] / rates["fixed"])
    summary = {mode: round(statistics.median(r), 3) for mode, r in ratios.items()}
    print("speed relative to the fixed 2-worker job (median over rounds):")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
