"""The exported model's `serving_default` (encoded JPEGs in, decoded and pre-processed
inside the graph) against the job's own evaluation pipeline over the same files
(`data.pipeline.eval_batches`: tf.data decoding in parallel, then the model's `serve`).

  python -m bench.serving [--images 512] [--size 128] [--batch 64] [--rounds 3]

Synthetic 500×375 JPEGs (bench.pipeline's) in a temporary folder; an untrained
`small_convnet` at --size exported by `trainer.outputs.export.saved_model`. Each round times
both ways over every image, in alternating order; reported: images/s of each (medians)
and the ratio serving_default / pipeline per round (median, lowest, highest).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.pipeline import write_data  # noqa: E402
from data.pipeline import ImagePreprocessing, eval_batches  # noqa: E402
from data.sources import image_folder  # noqa: E402
from trainer.model import small_convnet  # noqa: E402
from trainer.outputs.export import saved_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as root:
        print(f"writing {args.images} JPEGs of 500×375 into {root}", flush=True)
        _, folder = write_data(root, args.images)
        source = image_folder(folder)
        preprocessing = ImagePreprocessing(size=args.size)
        path = saved_model(small_convnet(image_size=args.size), os.path.join(root, "model"),
                           preprocessing)  # fmt: skip
        model = tf.saved_model.load(path)
        serving = model.signatures["serving_default"]
        files = [open(p, "rb").read() for p in source.items]
        rows = [(s, min(s + args.batch, len(files))) for s in range(0, len(files), args.batch)]

        def served() -> None:
            for first, end in rows:
                serving(images=tf.constant(files[first:end]))["embeddings"].numpy()

        def pipeline() -> None:
            for images, _, _ in eval_batches(source, rows, preprocessing):
                model.serve(tf.cast(images, tf.float32)).numpy()

        served(), pipeline()  # warm-up: tracing, file cache
        ways = {"serving_default": served, "pipeline": pipeline}
        rates = {name: [] for name in ways}
        for round_ in range(args.rounds):
            for name in list(ways) if round_ % 2 == 0 else list(ways)[::-1]:
                start = time.perf_counter()
                ways[name]()
                rates[name].append(len(files) / (time.perf_counter() - start))
            print(f"round {round_ + 1}: " + "  ".join(
                f"{n} {rates[n][-1]:7.1f} images/s" for n in ways), flush=True)  # fmt: skip
        ratios = sorted(
            a / b for a, b in zip(rates["serving_default"], rates["pipeline"], strict=True)
        )
        print(
            f"serving_default {np.median(rates['serving_default']):.1f} images/s, pipeline "
            f"{np.median(rates['pipeline']):.1f} images/s: ratio {np.median(ratios):.3f} "
            f"(median of {args.rounds} rounds; {ratios[0]:.3f}-{ratios[-1]:.3f}); "
            f"batches of {args.batch}, {args.size} px, {os.cpu_count()} cores"
        )


if __name__ == "__main__":
    main()
