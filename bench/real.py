"""Real product photos: Fashion-MNIST, trained on 5 classes, retrieval on 5 unseen ones.

  python -m bench.real [--steps 400] [--only pixels,small,mobilenet]

Debian's `dataset-fashion-mnist` (70,000 28×28 grayscale product photos, 10 classes, MIT
licence) is installed with apt-get when missing (as root; otherwise the one command to
run is printed). The job trains on the training split's classes 0-4 (T-shirt, trouser,
pullover, dress, coat: 30,000 images) with P×K batches of 80 = 5 × 16, semi-hard
triplets (margin 0.2, cosine), and evaluates retrieval on 300 test images of each of
classes 5-9 (sandal, shirt, sneaker, bag, ankle boot), against raw pixels on the same
images (mean-centred, cosine). One process, this machine's CPU; each run prints its
time. Rows:

- pixels: the raw-pixel baseline.
- small_convnet: `small_convnet(image_size=28, channels=1)` with its default widths
  (32, 64), and with one conv layer of 64 (what did best here; BENCHMARKS.md lists the
  settings tried).
- MobileNetV3Small from scratch (`backbone_embedding`, weights=None, 'batch' BatchNorm,
  images padded to 32 px and repeated to RGB), with precise BatchNorm (50 batches) and
  without it (train.precise_batchnorm_batches=0), with `eval/mean_cosine`.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gin
import numpy as np  # noqa: E402

FOLDER = "/usr/share/datasets/fashion-mnist"
PACKAGE = "dataset-fashion-mnist"
NAMES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
         "ankle boot")  # fmt: skip
EVAL_PER_CLASS = 300


def ensure_installed() -> None:
    """Installs Debian's Fashion-MNIST package when its files are missing."""
    if os.path.exists(os.path.join(FOLDER, "train-images-idx3-ubyte.gz")):
        return
    command = ["apt-get", "install", "-y", "-qq", PACKAGE]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit(f"Fashion-MNIST is missing: run `sudo apt-get install {PACKAGE}` and try again.")
    print(f"installing {PACKAGE} with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(command, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
        subprocess.run(command, env=env, check=True, capture_output=True)


def read_idx(name: str) -> np.ndarray:
    """An IDX file of the package (images: (N, 28, 28) uint8; labels: (N,) uint8)."""
    with gzip.open(os.path.join(FOLDER, name), "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def splits():
    """(train images, labels) of classes 0-4; (eval images, labels) of 300 test images
    of each of classes 5-9. Images float32 in [0, 255], (N, 28, 28, 1)."""
    train_x, train_y = (
        read_idx("train-images-idx3-ubyte.gz"),
        read_idx("train-labels-idx1-ubyte.gz"),
    )
    test_x, test_y = read_idx("t10k-images-idx3-ubyte.gz"), read_idx("t10k-labels-idx1-ubyte.gz")
    keep = train_y < 5
    picked = np.concatenate([np.flatnonzero(test_y == c)[:EVAL_PER_CLASS] for c in range(5, 10)])
    as_float = lambda x: x.astype(np.float32)[..., None]  # noqa: E731
    return (as_float(train_x[keep]), train_y[keep]), (as_float(test_x[picked]), test_y[picked])


def source(name, images, labels):
    from data.sources import Source

    return Source(name, images, labels.astype(np.int32), "pixels", NAMES)


def to_rgb32(images):
    """28×28 gray -> 32×32 RGB (padded with black, the photos' background)."""
    return np.repeat(np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))), 3, axis=-1)


def pixels_row(evaluation) -> dict:
    from trainer.evaluation import mean_cosine_of, retrieval_metrics

    images, labels = evaluation
    flat = images.reshape(len(images), -1)
    flat = flat - flat.mean(axis=0)
    began = time.time()
    metrics = retrieval_metrics(flat, labels, (1,), "cosine")
    return {**metrics, "mean_cosine": mean_cosine_of(flat), "seconds": time.time() - began}


def job_row(model, training, evaluation, steps, **settings) -> dict:
    """Trains with the job on one device; its last evaluation and mean cosines."""
    from tests.jobs import scalars
    from trainer.backends.replicas import Replicas
    from trainer.loop import train

    began = time.time()
    gin.bind_parameter("optimizer.learning_rate", 1e-3)  # the parts read their own settings
    gin.bind_parameter("export.enabled", False)
    with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(io.StringIO()) as out:
        results = train(
            workdir,
            Replicas(),
            steps=steps,
            global_batch_size=80,
            examples_per_class=16,
            log_every=50,
            checkpoint_every=10 * steps,
            eval_every=steps,
            model=model,
            train_data=lambda: source("fashion-mnist 0-4", *training),
            eval_data=lambda: source("fashion-mnist 5-9", *evaluation),
            **settings,
        )
        eval_cosine = scalars(workdir, "eval/mean_cosine")[steps]
        try:
            train_cosine = scalars(workdir, "train/mean_cosine").get(steps)
        except KeyError:  # written for models with training BatchNorm only
            train_cosine = None
    warned = "warning: the evaluation embeddings collapsed" in out.getvalue()
    return {
        **results,
        "mean_cosine": eval_cosine,
        "train_mean_cosine": train_cosine,
        "warned": warned,
        "seconds": time.time() - began,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--only", default="pixels,small,mobilenet,proxies")
    args = parser.parse_args()
    only = set(args.only.split(","))
    ensure_installed()
    training, evaluation = splits()
    print(
        f"Fashion-MNIST: train on classes 0-4 ({len(training[1]):,} images), retrieval on "
        f"{len(evaluation[1]):,} test images of classes 5-9; {args.steps} steps of 80",
        flush=True,
    )
    from trainer.model import backbone_embedding, small_convnet

    rows = {}
    if "pixels" in only:
        rows["raw pixels (mean-centred, cosine)"] = pixels_row(evaluation)
    if "small" in only:
        for widths in ((32, 64), (64,)):
            rows[f"small_convnet(28, {widths}, gray)"] = job_row(
                lambda widths=widths: small_convnet(image_size=28, widths=widths, channels=1),
                training, evaluation, args.steps,
            )  # fmt: skip
    if "proxies" in only:
        import losses

        proxy_losses = {
            "semi-hard triplets (the default)": (None, 1.0),
            "ProxyAnchorLoss, centres at 100x": (losses.ProxyAnchorLoss(), 100.0),
            "ArcFaceLoss, centres at 100x": (losses.ArcFaceLoss(), 100.0),
        }
        for name, (loss, multiplier) in proxy_losses.items():
            rows[f"small_convnet(28, (64,), gray), {name}"] = job_row(
                lambda: small_convnet(image_size=28, widths=(64,), channels=1),
                training, evaluation, args.steps, loss=loss,
                centre_learning_rate_multiplier=multiplier,
            )  # fmt: skip
    if "mobilenet" in only:
        rgb_training = (to_rgb32(training[0]), training[1])
        rgb_evaluation = (to_rgb32(evaluation[0]), evaluation[1])

        def mobilenet():
            return backbone_embedding(
                "MobileNetV3Small", embedding_dim=64, image_size=32, weights=None
            )

        for batches in (50, 0):
            name = f"MobileNetV3Small, scratch, precise BN {batches or 'off'}"
            rows[name] = job_row(
                mobilenet, rgb_training, rgb_evaluation, args.steps,
                precise_batchnorm_batches=batches,
            )  # fmt: skip
    print("| model | MAP@R | recall@1 | eval mean cosine | train mean cosine | time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        train_cosine = r.get("train_mean_cosine")
        print(
            f"| {name} | {r['map@r']:.3f} | {r['recall@1']:.3f} | {r['mean_cosine']:.3f}"
            f"{' (warned)' if r.get('warned') else ''} | "
            f"{'' if train_cosine is None else f'{train_cosine:.3f}'} | {r['seconds']:.0f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
