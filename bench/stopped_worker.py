"""How long a job takes to notice a worker that stopped answering.

  python -m bench.stopped_worker [--timeout 60] [--rounds 2] [--backends horovod,multi_worker]

Each round runs the default digits job on 2 workers with `distribute.timeout_seconds`
set, stops worker 1 (SIGSTOP, as a swap storm or a hung host) once the first checkpoint
is written, and measures the seconds from the stop to the job's end, with its exit
status and last error line. The figure is the detection time over the timeout: what the
setting costs beyond itself (the backend's polling, the launcher's stopping the rest).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import tensorflow as tf

from tests.jobs import HOROVOD_2, multi_worker_2, stop_rank_1
from trainer.backends.collective_timeout import EXIT_STATUS

JOB = (
    "train.steps=100000",
    "train.log_every=1",
    "train.checkpoint_every=5",
    "train.eval_every=100000",
    "export.enabled=False",
)


def one_round(backend: str, timeout: float) -> float:
    launcher, env = (HOROVOD_2, {}) if backend == "horovod" else multi_worker_2()
    with tempfile.TemporaryDirectory() as workdir:
        checkpoints = f"{workdir}/checkpoints"
        status, _, stderr, took = stop_rank_1(
            workdir,
            launcher,
            JOB + (f"distribute.timeout_seconds={timeout:g}",),
            None,
            lambda: tf.train.latest_checkpoint(checkpoints),
            **env,
        )
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if status != EXIT_STATUS or not errors:
        sys.exit(f"{backend}: exit status {status}, expected {EXIT_STATUS}:\n{stderr[-3000:]}")
    print(f"  {backend}: ended {took:.1f} s after the stop, exit {status}: {errors[-1]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backends", default="horovod,multi_worker")
    args = parser.parse_args()
    for backend in args.backends.split(","):
        print(f"{backend}: 2 workers, distribute.timeout_seconds={args.timeout:g}", flush=True)
        took = [one_round(backend, args.timeout) for _ in range(args.rounds)]
        median = statistics.median(took)
        print(
            f"{backend}: detected in {', '.join(f'{t:.1f}' for t in took)} s; median "
            f"{median:.1f} s = {median / args.timeout:.2f} x the timeout",
            flush=True,
        )


if __name__ == "__main__":
    main()
