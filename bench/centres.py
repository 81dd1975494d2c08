"""Sharded class centres (Partial FC): memory per process and step time, on Horovod workers.

  python -m bench.centres [--classes 1000000] [--dim 128] [--workers 1 2 4]
                          [--time-classes 100000] [--steps 10] [--save-rounds 2]

Memory: each of N Horovod processes builds a proxy loss's centres with their Adam slots
(`trainer.step.class_centres.ShardedCentres`, ArcFace) for C classes of width D, and reports
their bytes and its resident-memory growth; both must fall as 1/N.

Saving (--save-rounds > 0): each worker count saves its centres and slots into a
checkpoint in a temporary folder, alternately as the job does (every process writes its
own rows, the chief merges the indexes) and gathered onto the chief (what the job did
before: every process receives the whole matrices, the chief writes them). Reported per
mode: the median wall time from a barrier before to a barrier after, and the most any one
process's resident memory rose above where it stood before the save (sampled every 5 ms).

Step time (2 workers, --time-classes): the centre part of an ArcFace step (gathered
global batch of 512 × D against the shard, the per-example all-reduces, the gradient
and the shard's Adam update) with the centres sharded (r = 1 and Partial FC r = 0.1),
against data parallelism: every worker holding all C centres and computing the whole
loss (what one gets without sharding; the model's part is the same in all three and
left out). Median of the timed steps after two warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.memory import peak_during, rss_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gathered_save(centres, directory: str, step: int) -> None:
    """The save as it was: the whole matrices gathered on every process, the chief writes."""
    import numpy as np
    import tensorflow as tf

    from trainer.step.class_centres import centres_prefix

    full = centres.gathered()
    if centres.replicas.is_chief:
        names = [*full, "iterations"]
        tensors = [*full.values(), np.array(centres.shards[0].iterations.numpy(), np.int64)]
        tf.raw_ops.SaveV2(prefix=centres_prefix(directory, step), tensor_names=names,
                          shape_and_slices=[""] * len(names), tensors=tensors)  # fmt: skip


def timed_saves(centres, replicas, rounds: int) -> dict:
    """Median seconds and the largest per-process resident-memory rise of each way to save."""
    import shutil
    import tempfile

    import numpy as np

    directory = replicas.agree(tempfile.mkdtemp(prefix="bench-centres-"))
    ways = {"per_shard": centres.save, "gathered": lambda d, s: gathered_save(centres, d, s)}
    seconds, rise = {w: [] for w in ways}, {w: 0.0 for w in ways}
    for round_ in range(rounds):
        for way, save in ways.items():
            replicas.sum_over_processes([0.0])

            def save_everywhere(save=save, round_=round_):
                save(directory, round_)
                replicas.sum_over_processes([0.0])  # every process done

            _, took, grown = peak_during(save_everywhere)
            seconds[way].append(took)
            most = replicas.gather_process_rows(np.array([grown]))
            rise[way] = max(rise[way], float(most.max()))
            if replicas.is_chief:
                shutil.rmtree(directory)
                os.makedirs(directory)
    if replicas.is_chief:
        shutil.rmtree(directory, ignore_errors=True)
    return {
        **{f"save_{w}_s": float(np.median(seconds[w])) for w in ways},
        **{f"save_{w}_rise": rise[w] for w in ways},
    }


def centre_step(replicas, shards, batch: int):
    """The centre part of an ArcFace step on `shards` (a tf.function of x, y): the
    gathered batch against this replica's shard, the gradient and the shard's update."""
    import tensorflow as tf

    @tf.function
    def step(x, y):
        keys = replicas.all_gather(x, (batch,) * replicas.size)
        labels = replicas.all_gather(tf.cast(y, tf.float32)[:, None], None)[:, 0]
        labels = tf.cast(labels, tf.int32)
        shard = shards.variable()
        with tf.GradientTape() as tape:
            tape.watch(keys)
            block = shards.block(keys, labels, shards.shards[0].iterations)
        grad_keys, grad_c = tape.gradient(block.surrogate, [keys, shard])
        shards.apply(grad_c)
        return block.value, tf.reduce_sum(grad_keys)

    return step


def worker(classes: int, dim: int, steps: int, timed: bool, save_rounds: int = 0) -> None:
    """One Horovod process: builds the centres (and times steps); rank 0 prints JSON."""
    import time

    import numpy as np
    import tensorflow as tf

    import losses
    from trainer.backends.replicas import Replicas, make_replicas
    from trainer.step.class_centres import ShardedCentres

    replicas = make_replicas("horovod")
    before = rss_bytes()
    loss = losses.ArcFaceLoss(num_classes=classes)
    centres = ShardedCentres(loss, replicas, classes, dim, "adam", schedule=lambda _: 1e-3)
    grown = rss_bytes() - before
    result = {"workers": replicas.size, "bytes": centres.local_bytes(), "rss_growth": grown}
    if save_rounds:
        result.update(timed_saves(centres, replicas, save_rounds))
    if timed:
        rng = np.random.default_rng(replicas.rank)
        batch = 512 // replicas.size
        x = tf.constant(rng.normal(size=(batch, dim)).astype(np.float32))
        y = tf.constant(rng.integers(0, classes, size=batch).astype(np.int32))
        for name, rate, backend in (("sharded", 1.0, replicas), ("partial_fc_0.1", 0.1, replicas),
                                    ("data_parallel_full", 1.0, Replicas())):  # fmt: skip
            loss = losses.ArcFaceLoss(num_classes=classes, sample_rate=rate)
            shards = ShardedCentres(loss, backend, classes, dim, "adam", lambda _: 1e-3)
            result[f"{name}_bytes"] = shards.local_bytes()

            step = centre_step(replicas, shards, batch)

            times = []
            for s in range(steps + 2):
                start = time.perf_counter()
                value, _ = step(x, y)
                float(value)
                replicas.sum_over_processes([0.0])  # every worker done
                if s >= 2:
                    times.append(time.perf_counter() - start)
            result[f"{name}_ms"] = 1000 * float(np.median(times))
    if replicas.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def run(workers: int, classes: int, dim: int, steps: int, timed: bool, save_rounds=0) -> dict:
    command = [
        os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", str(workers), "-H",
        f"localhost:{workers}", "--gloo", sys.executable, "-m", "bench.centres", "--worker",
        "--classes", str(classes), "--dim", str(dim), "--steps", str(steps),
        *(["--timed"] if timed else []), "--save-rounds", str(save_rounds),
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if "RESULT " in line]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return json.loads(lines[-1].split("RESULT ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--time-classes", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--save-rounds", type=int, default=2,
                        help="saves timed per way and worker count (0: none)")  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--timed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.classes, args.dim, args.steps, args.timed, args.save_rounds)
        return
    print(f"centres + Adam slots, ArcFace, C = {args.classes:,}, D = {args.dim}", flush=True)
    first = None
    for n in args.workers:
        r = run(n, args.classes, args.dim, args.steps, timed=False, save_rounds=args.save_rounds)
        first = first or r["bytes"] * r["workers"]
        print(
            f"  {n} worker(s): {r['bytes'] / 2**20:8.1f} MiB of centres and slots per process "
            f"(x{r['bytes'] * n / first:.3f} of 1/N), resident memory grew "
            f"{r['rss_growth'] / 2**20:8.1f} MiB",
            flush=True,
        )
        if args.save_rounds:
            print(
                f"    save, median of {args.save_rounds}: per shard {r['save_per_shard_s']:6.2f} s "
                f"(+{r['save_per_shard_rise'] / 2**20:7.1f} MiB at most per process), gathered "
                f"{r['save_gathered_s']:6.2f} s (+{r['save_gathered_rise'] / 2**20:7.1f} MiB)",
                flush=True,
            )
    r = run(2, args.time_classes, args.dim, args.steps, timed=True)
    base = r["data_parallel_full_ms"]
    print(f"ArcFace centre step, C = {args.time_classes:,}, 2 workers, global batch 512:")
    for name in ("data_parallel_full", "sharded", "partial_fc_0.1"):
        print(
            f"  {name:20s} {r[name + '_ms']:8.1f} ms  x{r[name + '_ms'] / base:.2f}  "
            f"{r[name + '_bytes'] / 2**20:7.1f} MiB per worker"
        )


if __name__ == "__main__":
    main()
