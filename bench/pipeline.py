"""The input pipeline against plain tf.data, on the same JPEGs, in alternating rounds.

  python -m bench.pipeline [--images 640] [--rounds 5] [--steps 16] [--batch 64] [--size 224]

Synthetic photos (smooth random 500×375 JPEGs, quality 90, 32 classes) are written to a
temporary folder (deleted afterwards) as TFRecord shards and as an image folder. Each
round builds each pipeline afresh and times `--steps` batches of `--batch` crops of
`--size` px, one process, from building it to its last batch:

- tfrecord: `data.pipeline.train_batches` over `data.sources.tfrecord` (P×K sampler,
  this process holding the whole batch) against `TFRecordDataset(num_parallel_reads)`
  → parse → `decode_and_crop_jpeg` on the sampled window → antialiased resize → flip →
  uint8 → `batch` → `prefetch`.
- folder: `train_batches` over `data.sources.image_folder` against the same plain
  pipeline over the file list with `tf.io.read_file`.

Prints images/s of each, the ratio ours / plain (median of the rounds' ratios, target
>= 0.9) and images/s per core.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from data.pipeline import ImagePreprocessing, train_batches  # noqa: E402
from data.records import encode_example  # noqa: E402
from data.sampler import PKSampler  # noqa: E402
from data.sources import image_folder, tfrecord  # noqa: E402

AUTOTUNE = tf.data.AUTOTUNE
CLASSES, SHARDS = 32, 8


def write_data(root: str, images: int) -> tuple[str, str]:
    """`images` JPEGs of 500×375 in CLASSES classes, as TFRecord shards and a folder."""
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "images")
    writers = [
        tf.io.TFRecordWriter(os.path.join(root, f"train-{s:05d}.tfrecord")) for s in range(SHARDS)
    ]
    for i in range(images):
        label = i % CLASSES
        coarse = rng.integers(0, 255, size=(1, 24, 32, 3)).astype(np.float32)
        photo = tf.cast(tf.image.resize(coarse, (375, 500))[0], tf.uint8)
        encoded = tf.io.encode_jpeg(photo, quality=90).numpy()
        os.makedirs(os.path.join(folder, f"{label:03d}"), exist_ok=True)
        with open(os.path.join(folder, f"{label:03d}", f"{i}.jpg"), "wb") as f:
            f.write(encoded)
        writers[i % SHARDS].write(encode_example(encoded, label))
    for writer in writers:
        writer.close()
    return os.path.join(root, "train-*.tfrecord"), folder


def plain(encoded_images: tf.data.Dataset, size: int, batch: int) -> tf.data.Dataset:
    """The plain tf.data pipeline over a dataset of encoded JPEGs."""

    def prepare(i, encoded):
        seed = tf.stack([tf.constant(0, tf.int64), i])
        begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.image.extract_jpeg_shape(encoded),
            tf.zeros([1, 0, 4]),
            seed=seed,
            area_range=(0.35, 1.0),
            aspect_ratio_range=(0.75, 1.333),
            min_object_covered=0.0,
            use_image_if_no_bounding_boxes=True,
        )
        window = tf.stack([begin[0], begin[1], extent[0], extent[1]])
        image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
        image = tf.image.resize(image, (size, size), antialias=True)
        image = tf.image.stateless_random_flip_left_right(image, seed=seed[::-1])
        return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)

    return (
        encoded_images.repeat()
        .enumerate()
        .map(prepare, num_parallel_calls=AUTOTUNE)
        .batch(batch)
        .prefetch(AUTOTUNE)
    )


def plain_records(pattern: str, size: int, batch: int) -> tf.data.Dataset:
    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string)}
    records = tf.data.TFRecordDataset(tf.io.gfile.glob(pattern), num_parallel_reads=AUTOTUNE)
    return plain(
        records.map(lambda r: tf.io.parse_single_example(r, spec)["image/encoded"]), size, batch
    )


def plain_files(folder: str, size: int, batch: int) -> tf.data.Dataset:
    paths = sorted(tf.io.gfile.glob(os.path.join(folder, "*", "*.jpg")))
    return plain(tf.data.Dataset.from_tensor_slices(paths).map(tf.io.read_file), size, batch)


def images_per_second(make, steps: int, batch: int) -> float:
    """Rate over `steps` batches, from building the pipeline to its last batch (a head
    start on a warm-up batch would let the deeper pipeline decode ahead unseen)."""
    began = time.perf_counter()
    iterator = iter(make())
    for _ in range(steps):
        images = next(iterator)
        assert images.shape[0] == batch and images.dtype == tf.uint8
    return steps * batch / (time.perf_counter() - began)


def ours(source, size: int, batch: int, steps: int, round_: int):
    sampler = PKSampler(source.labels, batch // 4, 4, seed=round_)
    batches = train_batches(source, sampler, (0, batch), 0, steps, ImagePreprocessing(size))
    return (images for images, _, _ in batches)


def compare(name, make_ours, make_plain, rounds, steps, batch) -> None:
    results = []
    for r in range(rounds):
        first, second = (make_ours, make_plain) if r % 2 == 0 else (make_plain, make_ours)
        rates = {}
        for make in (first, second):
            rates[make] = images_per_second(functools.partial(make, r), steps, batch)
        results.append((rates[make_ours], rates[make_plain]))
        print(
            f"  {name} round {r + 1}: ours {rates[make_ours]:6.0f}  "
            f"plain {rates[make_plain]:6.0f} images/s"
        )
    ours_rate = float(np.median([o for o, _ in results]))
    plain_rate = float(np.median([p for _, p in results]))
    ratios = sorted(o / p for o, p in results)
    cores = len(os.sched_getaffinity(0))
    print(
        f"{name}: train_batches {ours_rate:,.0f} images/s, plain tf.data {plain_rate:,.0f} "
        f"images/s, ratio {np.median(ratios):.3f} (median of {rounds} rounds; "
        f"{ratios[0]:.3f}-{ratios[-1]:.3f}) (target >= 0.9); per core: "
        f"{ours_rate / cores:,.0f} and {plain_rate / cores:,.0f} images/s ({cores} cores)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="bench-pipeline-")
    try:
        began = time.time()
        pattern, folder = write_data(root, args.images)
        print(f"wrote {args.images} JPEGs of 500x375 in {time.time() - began:.0f}s to {root}")
        records, files = tfrecord(pattern), image_folder(folder)
        size, batch, steps = args.size, args.batch, args.steps
        compare(
            "tfrecord",
            lambda r: ours(records, size, batch, steps, r),
            lambda r: plain_records(pattern, size, batch),
            args.rounds,
            steps,
            batch,
        )
        compare(
            "folder",
            lambda r: ours(files, size, batch, steps, r),
            lambda r: plain_files(folder, size, batch),
            args.rounds,
            steps,
            batch,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
