"""Cost of global-batch mining: step time with global over local mining, in one run.

  python -m bench.cross_replica [--replicas 2 4] [--steps 40] [--batch 96]

For each replica count, a fresh process builds MirroredStrategy on logical CPUs, the
default job's digits model and two train steps that differ only in `cross_replica_mining`,
then times them in alternation on the same P×K-sampled batches: the median step
time per mode in each of 5 rounds, and the median over rounds of their ratio.
Only the ratio is meaningful on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench.rounds import ratio_line, run_child, summarize

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROUNDS = 5


def measure(replicas_count: int, steps: int, batch: int) -> dict:
    """Runs in the child process: median step seconds for global and local mining."""
    import keras
    import numpy as np

    import losses
    from data.sampler import PKSampler
    from data.sources import digits
    from trainer.backends.replicas import make_replicas
    from trainer.model import digits_convnet
    from trainer.step.train_step import TrainStep

    replicas = make_replicas("mirrored", cpu_replicas=replicas_count)
    source = digits(classes=(0, 6))
    x, y = source.items, source.labels
    sampler = PKSampler(y, batch // 16, 16, seed=0)  # the default job's P×K batches
    batches = [sampler.global_batch(step) for step in range(steps)]
    with replicas.scope():
        model = digits_convnet()
        optimizer = keras.optimizers.Adam(1e-4)
    loss = losses.TripletSemiHardLoss(margin=0.2, distance="cosine")
    runs = {
        mode: TrainStep(model, optimizer, loss, replicas, mode == "global")
        for mode in ("global", "local")
    }
    for run in runs.values():  # trace and warm up
        for rows in batches[:5]:
            run(x[rows], y[rows])
    rounds = []  # one (global, local) median pair per round: the machine's load drifts
    for _ in range(ROUNDS):
        times = {mode: [] for mode in runs}
        for i, rows in enumerate(batches):
            order = list(runs) if i % 2 == 0 else list(runs)[::-1]
            for mode in order:
                start = time.perf_counter()
                runs[mode](x[rows], y[rows])
                times[mode].append(time.perf_counter() - start)
        rounds.append({mode: float(np.median(t)) for mode, t in times.items()})
    return summarize(rounds, "global", "local")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=96, help="global batch (multiple of 16)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.batch)))
        return 0
    results = {}
    for n in args.replicas:
        print(f"{n} replicas, global batch {args.batch}, {args.steps} steps each ...", flush=True)
        t = run_child("bench.cross_replica", n, args.steps, args.batch)
        results[n] = t
        print("  " + ratio_line(t, "global", "local", ROUNDS), flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
