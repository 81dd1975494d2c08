"""What the trainer costs at the sizes of real data sets, on synthetic data made in a
temporary folder (deleted afterwards, never committed), in one run.

  python -m bench.scale [--only eval,tfrecord,restart,sampler] [--keep DIR]

- eval: `retrieval_metrics` at N = 60,502 (Stanford Online Products' test split: 11,316
  classes), D = 128, against the bare computation it cannot avoid: the chunked distance
  matmul and a top-k of the same depth; and its peak memory growth (fresh process).
- tfrecord: peak resident memory of a short job (one process) over ~1 GB of TFRecords
  against the same job over ~20 MB.
- restart: time from launch to the first step when a job over a 100,000-image folder is
  restarted (its image check cached by the first start), against the same job over a
  1,000-image folder.
- sampler: building the P×K sampler over 5M labels of 100k classes, and a batch.

Each measurement runs in a fresh process, so peaks and caches do not mix.
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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def child(kind: str, *args) -> dict:
    """Runs `python -m bench.scale --child kind args...` and returns the JSON it prints."""
    command = [sys.executable, "-m", "bench.scale", "--child", kind, *map(str, args)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- evaluation ------------------------------------------------------------------------


def synthetic_embeddings(n=60_502, classes=11_316, dim=128, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    x = rng.normal(size=(classes, dim)).astype(np.float32)[labels]
    x += 0.8 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def eval_child(what: str) -> dict:
    import tensorflow as tf

    from trainer.evaluation import Ranking, retrieval_metrics

    x, labels = synthetic_embeddings()
    before = peak_mb()
    began = time.perf_counter()
    if what == "ours":
        metrics = retrieval_metrics(x, labels, (1, 4), "cosine")
    else:  # the bare work: every chunk's distances and its top-k, nothing else
        ranking = Ranking(x, labels, (1, 4), "cosine", 1024)
        keys = tf.constant(x)
        for start in range(0, len(labels), ranking.chunk):
            similarity = tf.matmul(keys[start : start + ranking.chunk], keys, transpose_b=True)
            tf.math.top_k(similarity, ranking.depth + 1)[1].numpy()
        metrics = {"depth": ranking.depth, "chunk": ranking.chunk}
    return {"seconds": time.perf_counter() - began, "peak_growth_mb": peak_mb() - before, **metrics}


def bench_eval(rounds: int) -> None:
    print("evaluation, N = 60,502, 11,316 classes, D = 128 (cosine), one process")
    ratios = []
    for r in range(rounds):
        ours, bare = child("eval", "ours"), child("eval", "bare")
        ratios.append(ours["seconds"] / bare["seconds"])
        print(
            f"  round {r + 1}: retrieval_metrics {ours['seconds']:.1f} s, bare matmul + "
            f"top-{bare['depth'] + 1} {bare['seconds']:.1f} s (chunks of {bare['chunk']}): "
            f"ratio {ratios[-1]:.2f}; peak memory growth {ours['peak_growth_mb']:.0f} MB "
            f"(bare {bare['peak_growth_mb']:.0f} MB); recall@1 {ours['recall@1']:.4f}, "
            f"map@r {ours['map@r']:.4f}",
            flush=True,
        )
    print(f"  => eval time / bare: {sorted(ratios)[len(ratios) // 2]:.2f} (target <= 3)")


# --- synthetic image data ----------------------------------------------------------------


def noise_pngs(count: int, side: int, seed: int = 0) -> list[bytes]:
    """Incompressible PNGs of side×side×3 (random pixels): a PNG costs about 3·side² bytes."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    return [
        tf.io.encode_png(rng.integers(0, 255, size=(side, side, 3), dtype=np.uint8)).numpy()
        for _ in range(count)
    ]


def write_tfrecords(folder: str, total_bytes: int, classes: int = 50, files: int = 8) -> str:
    """~total_bytes of TFRecords of 256×256 noise PNGs (a few distinct images, cycled)."""
    import tensorflow as tf

    from data.records import encode_example

    pngs = noise_pngs(32, 256)
    count = max(classes * 2, total_bytes // len(pngs[0]))
    os.makedirs(folder, exist_ok=True)
    writers = [
        tf.io.TFRecordWriter(os.path.join(folder, f"part-{f:03d}.tfrecord")) for f in range(files)
    ]
    for i in range(count):
        writers[i % files].write(encode_example(pngs[i % len(pngs)], i % classes))
    for writer in writers:
        writer.close()
    return os.path.join(folder, "*.tfrecord")


def write_folder(folder: str, images: int, per_class: int = 10) -> str:
    """`images` tiny PNGs (16×16), `per_class` to a class folder."""
    png = noise_pngs(1, 16)[0]
    for c in range(images // per_class):
        os.makedirs(os.path.join(folder, f"{c:06d}"))
        for i in range(per_class):
            with open(os.path.join(folder, f"{c:06d}", f"{i}.png"), "wb") as f:
                f.write(png)
    return folder


IMAGE_JOB = (
    "train.model=@backbone_embedding",
    "backbone_embedding.backbone='MobileNetV3Small'",
    "backbone_embedding.image_size=32",
    "backbone_embedding.embedding_dim=16",
    "backbone_embedding.weights=None",
    "batchnorm.synchronized=True",
    "images.size=32",
    "train.global_batch_size=32",
    "train.examples_per_class=2",
    "export.enabled=False",
    "distribute.strategy='single'",
)


def job_args(workdir: str, params) -> list[str]:
    return [f"--workdir={workdir}"] + [f"--gin_param={p}" for p in IMAGE_JOB + tuple(params)]


def job_child(*args) -> dict:
    """Runs trainer.main in this process; its peak resident memory."""
    import runpy

    sys.argv = ["trainer.main", *args]
    try:
        runpy.run_module("trainer.main", run_name="__main__")
    except SystemExit as exit:
        if exit.code:
            raise
    return {"peak_mb": peak_mb()}


def bench_tfrecord(scratch: str) -> None:
    print("peak memory of a 20-step job (one process, eval included) over TFRecords")
    peaks = {}
    for name, size in (("20 MB", 20 << 20), ("1 GB", 1 << 30)):
        folder = os.path.join(scratch, f"records-{size}")
        pattern = write_tfrecords(folder, size)
        on_disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        params = (
            "train.steps=20",
            "train.eval_every=20",
            "train.train_data=@train_split/tfrecord",
            "train.eval_data=@eval_split/tfrecord",
            f"train_split/tfrecord.pattern='{pattern}'",
            f"eval_split/tfrecord.pattern='{pattern}'",
            "train_split/tfrecord.classes=(0, 40)",
            "eval_split/tfrecord.classes=(40, 50)",
        )
        result = child("job", *job_args(os.path.join(scratch, f"job-{size}"), params))
        peaks[name] = result["peak_mb"]
        print(f"  {on_disk / 1e6:,.0f} MB of records: peak {result['peak_mb']:,.0f} MB", flush=True)
        shutil.rmtree(folder)
    print(f"  => 1 GB job - 20 MB job: {peaks['1 GB'] - peaks['20 MB']:+.0f} MB (target <= 200)")


def time_to_first_step(args: list[str]) -> float:
    """Seconds from launch until the job prints its first step."""
    command = [sys.executable, "-m", "trainer.main", *args]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    began = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        with subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=errors, text=True
        ) as job:
            for line in job.stdout:
                if line.startswith("step"):
                    seconds = time.perf_counter() - began
                    job.kill()
                    return seconds
        errors.seek(0)
        raise RuntimeError(f"{' '.join(command)} printed no step:\n{errors.read()[-3000:]}")


def bench_restart(scratch: str, rounds: int) -> None:
    print("restart of a job over an image folder: launch to the first step")
    times = {}
    for images in (1_000, 100_000):
        began = time.perf_counter()
        folder = write_folder(os.path.join(scratch, f"folder-{images}"), images)
        made = time.perf_counter() - began
        classes = images // 10
        params = (
            "train.steps=1000",
            "train.eval_every=1000",
            "train.stop_after_steps=1",
            "train.train_data=@train_split/image_folder",
            "train.eval_data=@eval_split/image_folder",
            f"train_split/image_folder.root='{folder}'",
            f"eval_split/image_folder.root='{folder}'",
            f"train_split/image_folder.classes=(0, {classes - 1})",
            f"eval_split/image_folder.classes=({classes - 1}, {classes})",
        )
        workdir = os.path.join(scratch, f"restart-{images}")
        first = time_to_first_step(job_args(workdir, params))  # checks every image once
        child("job", *job_args(workdir, params))  # writes the checkpoint to restart from
        times[images] = []
        for _ in range(rounds):
            times[images].append(time_to_first_step(job_args(workdir, params)))
        print(
            f"  {images:,} images ({made:.0f} s to write): first start {first:.1f} s to step 1, "
            f"restarts {', '.join(f'{t:.1f}' for t in times[images])} s",
            flush=True,
        )
    ratio = min(times[100_000]) / min(times[1_000])
    print(
        f"  => restart over 100k images / over 1k (best of {rounds}): {ratio:.2f} (target <= 1.5)"
    )


def sampler_child() -> dict:
    import numpy as np

    from data.sampler import PKSampler

    labels = np.random.default_rng(0).integers(0, 100_000, size=5_000_000)
    began = time.perf_counter()
    sampler = PKSampler(labels, 64, 4, seed=0)
    built = time.perf_counter() - began
    began = time.perf_counter()
    for step in range(200):
        sampler.global_batch(step)
    return {"build_seconds": built, "batch_ms": (time.perf_counter() - began) / 200 * 1e3}


def bench_sampler() -> None:
    result = child("sampler")
    print(
        "P×K sampler over 5,000,000 labels of 100,000 classes (P = 64, K = 4): built in "
        f"{result['build_seconds']:.2f} s (target <= 10), {result['batch_ms']:.2f} ms a batch "
        "(target <= 5)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="eval,tfrecord,restart,sampler")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = {"eval": eval_child, "job": job_child, "sampler": sampler_child}[kind](*rest)
        print(json.dumps(result))
        return
    only = set(args.only.split(","))
    scratch = tempfile.mkdtemp(prefix="bench-scale-")
    try:
        if "sampler" in only:
            bench_sampler()
        if "eval" in only:
            bench_eval(args.rounds)
        if "tfrecord" in only:
            bench_tfrecord(scratch)
        if "restart" in only:
            bench_restart(scratch, args.rounds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
