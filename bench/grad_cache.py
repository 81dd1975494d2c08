"""Cached-gradient chunking (train.embedding_chunk_size): peak memory and step time.

`small_convnet` at 64 px (RGB, widths 32/64, 128-D head), semi-hard triplets, one
process on the CPU, global batches of 512, 2,048 and 8,192 (P×K, K = 16), with and
without chunks of 128 rows. Each configuration runs in a fresh process, so that its
peak resident memory (ru_maxrss) is its own: one warm-up step (the trace), then timed
steps. Reported: the peak over the memory of the process before its first step (the
model, TensorFlow itself), and the step time; the cost of chunking is the ratio of
chunked to whole step time at the same batch, in the same run.

An unchunked configuration that the measured growth says would not fit in 80% of this
machine's memory is not started (it would be killed): its line says so.

`--mining`: the mining alone at a huge global batch, `--keys` embeddings (default
65,536, D = 128) on `--replicas` logical-CPU MirroredStrategy replicas (default 8: 8,192
anchors each; 1: one device), for semi-hard triplets and SupCon: one step's loss and
gradient (after a first, traced one), in anchor tiles within each budget of
`--budget-mb` (default the trainer's 256; a list sweeps, 0 = the whole block), against
the bare tiled distance computation of the same blocks in the same process; and the
peak resident memory of the process, whole and over its start (before the trace).

    python -m bench.grad_cache [--batches 512,2048,8192] [--chunk 128] [--steps 2]
    python -m bench.grad_cache --mining [--keys 65536] [--replicas 8] [--budget-mb 256]
    python -m bench.grad_cache --mining --keys 8192 --replicas 1 --budget-mb 0,256,64,8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

IMAGE = 64


def child(batch: int, chunk: int | None, steps: int, budget_mb: int) -> dict:
    """Runs in its own process: the figures of one configuration."""
    import keras

    import losses
    from trainer.backends.replicas import make_replicas
    from trainer.model import small_convnet
    from trainer.step.train_step import TrainStep

    keras.utils.set_random_seed(0)
    replicas = make_replicas("single")
    model = small_convnet(image_size=IMAGE, embedding_dim=128)
    step = TrainStep(
        model,
        keras.optimizers.SGD(0.01),
        losses.TripletSemiHardLoss(margin=0.2, distance="cosine"),
        replicas,
        embedding_chunk_size=chunk,
        mining_budget_bytes=budget_mb * 2**20,
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(batch, IMAGE, IMAGE, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(batch // 16), 16)
    before = _peak_mb()
    step(images, labels)  # the trace
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(images, labels)
        times.append(time.perf_counter() - start)
    return {"before_mb": before, "peak_mb": _peak_mb(), "step_seconds": float(np.median(times))}


def mining_child(loss_name: str, keys: int, budget_mb: int, replica_count: int) -> dict:
    """Runs in its own process: one global-batch mining step on logical CPUs."""
    from trainer.backends.replicas import configure_cpu_replicas

    if replica_count > 1:
        configure_cpu_replicas(replica_count)
    import tensorflow as tf

    import losses
    from losses.distances import pairwise_distances
    from losses.tiles import tile_rows
    from trainer.backends.replicas import make_replicas
    from trainer.step.global_loss import loss_and_gradients

    replicas = (
        make_replicas("mirrored", cpu_replicas=replica_count)
        if replica_count > 1
        else make_replicas("single")
    )
    loss = {
        "semihard": lambda: losses.TripletSemiHardLoss(margin=0.2, distance="cosine"),
        "supcon": lambda: losses.SupConLoss(temperature=0.1),
    }[loss_name]()
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(keys // 16), 16)
    x = rng.normal(size=(keys, 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with replicas.scope():
        scale = tf.Variable(tf.ones([128]))
    rows = replicas.replica_rows(keys)
    budget = budget_mb * 2**20 if budget_mb else 2**62  # 0: the whole block

    @tf.function
    def step(local_x, local_labels):
        result = loss_and_gradients(
            loss, replicas, lambda e: e * scale, [scale], local_x, local_labels,
            replica_rows=rows, mining_budget_bytes=budget,
        )  # fmt: skip
        return result.loss, replicas.sum_gradients(result.grads)[0]

    @tf.function
    def distances(local_x):
        everyone = replicas.all_gather(local_x, rows)
        tile = tile_rows(keys, budget)
        total = 0.0
        for start in range(0, rows[0], tile):
            total += tf.reduce_sum(
                pairwise_distances(local_x[start : start + tile], everyone, "cosine")
            )
        return total

    batch = replicas.split(x, labels)
    start_mb = _peak_mb()
    timed = {}
    for name, fn, args in (("step", step, batch), ("distances", distances, (batch[0],))):
        replicas.run(fn, args)  # the trace
        start = time.perf_counter()
        replicas.run(fn, args)
        timed[name] = time.perf_counter() - start
    return {
        "step_seconds": timed["step"],
        "distance_seconds": timed["distances"],
        "peak_mb": _peak_mb(),
        "over_start_mb": _peak_mb() - start_mb,
        "tile_rows": min(tile_rows(keys, budget), rows[0]),
    }


def mining(keys: int, budget_list: str, replica_count: int) -> None:
    where = f"{replica_count} logical CPUs" if replica_count > 1 else "one device"
    print(f"global batch {keys:,} (D = 128) on {where}")
    for budget_mb in (int(b) for b in budget_list.split(",")):
        print(f" mining budget {budget_mb or 'whole block'} {'MiB' if budget_mb else ''}")
        for loss_name in ("semihard", "supcon"):
            command = [sys.executable, "-m", "bench.grad_cache", "--mining-child", loss_name]
            command += ["--keys", str(keys), "--budget-mb", str(budget_mb)]
            command += ["--replicas", str(replica_count)]
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(f"  {loss_name}: exit {done.returncode}: {done.stderr[-800:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"  {loss_name}: tiles of {r['tile_rows']} anchors; step "
                f"{r['step_seconds']:.2f} s, bare tiled distances {r['distance_seconds']:.2f} s "
                f"(ratio {r['step_seconds'] / r['distance_seconds']:.1f}); peak "
                f"{r['peak_mb']:,.0f} MiB for the process, {r['over_start_mb']:,.0f} over start",
                flush=True,
            )


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _available_mb() -> float:
    with open("/proc/meminfo") as info:
        fields = dict(line.split(":", 1) for line in info)
    return int(fields["MemAvailable"].split()[0]) / 1024


def run(batch: int, chunk: int | None, steps: int, budget_mb: int) -> dict | None:
    command = [sys.executable, "-m", "bench.grad_cache", "--child", str(batch), str(chunk or 0)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [*command, "--steps", str(steps), "--budget-mb", str(budget_mb)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        print(f"  batch {batch} chunk {chunk}: exit {done.returncode}: {done.stderr[-500:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="512,2048,8192")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mining", action="store_true")
    parser.add_argument("--keys", type=int, default=65_536)
    parser.add_argument("--budget-mb", default="256")
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--mining-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mining_child:
        budget = int(args.budget_mb)
        print(json.dumps(mining_child(args.mining_child, args.keys, budget, args.replicas)))
        return
    if args.mining:
        mining(args.keys, args.budget_mb, args.replicas)
        return
    if args.child:
        batch, chunk = args.child
        print(json.dumps(child(batch, chunk or None, args.steps, int(args.budget_mb))))
        return
    batches = [int(b) for b in args.batches.split(",")]
    print(
        f"small_convnet {IMAGE} px, semi-hard triplets, one process; chunk {args.chunk}, "
        f"mining budget {args.budget_mb} MiB"
    )
    print(f"{'batch':>6} {'chunk':>6} {'peak MiB':>9} {'over start':>11} {'step s':>8}")
    figures = {}
    for batch in batches:
        for chunk in (None, args.chunk):
            grown = [figures[(b, None)] for b in batches if (b, None) in figures and b < batch]
            if chunk is None and grown:
                last_batch = max(b for b in batches if (b, None) in figures and b < batch)
                growth = (
                    figures[(last_batch, None)]["peak_mb"]
                    - figures[(last_batch, None)]["before_mb"]
                )
                needed = growth * batch / last_batch
                if needed > 0.8 * _available_mb():
                    print(
                        f"{batch:>6} {'none':>6}  not run: ~{needed:,.0f} MiB over start by the "
                        f"measured growth, {_available_mb():,.0f} MiB available"
                    )
                    continue
            result = run(batch, chunk, args.steps, args.budget_mb)
            if result is None:
                continue
            figures[(batch, chunk)] = result
            over = result["peak_mb"] - result["before_mb"]
            print(
                f"{batch:>6} {chunk or 'none':>6} {result['peak_mb']:>9,.0f} {over:>11,.0f} "
                f"{result['step_seconds']:>8.2f}",
                flush=True,
            )
    chunked = [figures[(b, args.chunk)] for b in batches if (b, args.chunk) in figures]
    if len(chunked) >= 2:
        small, large = chunked[0], chunked[-1]
        grown = (large["peak_mb"] - large["before_mb"]) / (small["peak_mb"] - small["before_mb"])
        print(
            f"chunked: peak at batch {batches[-1]} / at {batches[0]}: "
            f"{large['peak_mb'] / small['peak_mb']:.2f} (whole process), {grown:.2f} (over start)"
        )
    for batch in batches:
        if (batch, None) in figures and (batch, args.chunk) in figures:
            ratio = (
                figures[(batch, args.chunk)]["step_seconds"]
                / figures[(batch, None)]["step_seconds"]
            )
            print(f"cost at batch {batch}: chunked / whole step time {ratio:.2f}")


if __name__ == "__main__":
    main()
