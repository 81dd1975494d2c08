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

    python -m bench.grad_cache [--batches 512,2048,8192] [--chunk 128] [--steps 2]
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


def child(batch: int, chunk: int | None, steps: int) -> dict:
    """Runs in its own process: the figures of one configuration."""
    import keras

    import losses
    from trainer.model import small_convnet
    from trainer.replicas import make_replicas
    from trainer.train_step import TrainStep

    keras.utils.set_random_seed(0)
    replicas = make_replicas("single")
    model = small_convnet(image_size=IMAGE, embedding_dim=128)
    step = TrainStep(
        model,
        keras.optimizers.SGD(0.01),
        losses.TripletSemiHardLoss(margin=0.2, distance="cosine"),
        replicas,
        embedding_chunk_size=chunk,
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


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _available_mb() -> float:
    with open("/proc/meminfo") as info:
        fields = dict(line.split(":", 1) for line in info)
    return int(fields["MemAvailable"].split()[0]) / 1024


def run(batch: int, chunk: int | None, steps: int) -> dict | None:
    command = [sys.executable, "-m", "bench.grad_cache", "--child", str(batch), str(chunk or 0)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [*command, "--steps", str(steps)], capture_output=True, text=True, env=env
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
    args = parser.parse_args()
    if args.child:
        batch, chunk = args.child
        print(json.dumps(child(batch, chunk or None, args.steps)))
        return
    batches = [int(b) for b in args.batches.split(",")]
    print(f"small_convnet {IMAGE} px, semi-hard triplets, one process; chunk {args.chunk}")
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
            result = run(batch, chunk, args.steps)
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
