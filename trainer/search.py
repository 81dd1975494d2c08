"""`python -m trainer.search INDEX IMAGE...`: each image's k nearest rows of an index
written by `python -m trainer.index`, and whether the best passes its threshold.

  python -m trainer.search INDEX a.jpg b.png [--k=5] [--json] [--saved_model=DIR]

The images are embedded through the exported model's `serving_default` (their file
bytes, the graph a server runs), by default the SavedModel the index was built with.
Exit status 2 with one line naming the thing for a missing index or SavedModel, a model
of another embedding width or distance, or an image that cannot be read or decoded.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from data.errors import InputError
from trainer.outputs.export import check_distance, load_model
from trainer.retrieval.index_folder import IndexFolder
from trainer.retrieval.neighbours import prepared

FLAGS = flags.FLAGS
flags.DEFINE_integer("k", 5, "Neighbours per image.")
flags.DEFINE_bool("json", False, "One JSON document on stdout instead of lines.")
flags.DEFINE_string("saved_model", None, "The SavedModel to embed with (default: the index's).")


def reported_distance(raw, distance: str) -> np.ndarray:
    """faiss's scores as distances: 1 - inner product for cosine (unit vectors), the
    square root of faiss's squared L2 for 'euclidean', faiss's value for the squared."""
    raw = np.asarray(raw, np.float64)
    if distance == "cosine":
        return 1.0 - raw
    return raw if distance == "squared_euclidean" else np.sqrt(np.maximum(raw, 0.0))


def read_images(paths) -> list[bytes]:
    """The files' bytes, each checked to decode (the one that does not is named)."""
    encoded = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
            tf.io.decode_image(data, channels=3, expand_animations=False)
        except OSError as error:
            raise InputError(f"image {path!r} cannot be read: {error.strerror}") from error
        except (tf.errors.InvalidArgumentError, ValueError) as error:
            raise InputError(f"image {path!r} is not a JPEG, PNG, BMP or GIF image") from error
        encoded.append(data)
    return encoded


def search(index_path: str, images, k: int, saved_model: str | None = None) -> list[dict]:
    """Each image's k nearest rows (path, label, class, distance) and the threshold's verdict."""
    folder = IndexFolder(index_path)
    meta = folder.meta
    if k < 1:
        raise InputError(f"--k must be >= 1, got {k}")
    model_path = saved_model or meta["saved_model"]
    model = load_model(model_path)
    check_distance(model_path, meta["distance"], f"the index {index_path!r}")
    encoded = read_images(images)
    serving = model.signatures["serving_default"]
    embeddings = serving(images=tf.constant(encoded))["embeddings"].numpy()
    if embeddings.shape[1] != meta["dim"]:
        raise InputError(
            f"the SavedModel {saved_model or meta['saved_model']!r} gives embeddings of width "
            f"{embeddings.shape[1]}, the index {index_path!r} holds width {meta['dim']}: "
            "search with the model the index was built with"
        )
    k = min(k, len(folder.paths))
    raw, ids = folder.index.search(prepared(embeddings, meta["distance"]), k)
    distances = reported_distance(raw, meta["distance"])
    results = []
    for image, row_ids, row_distances in zip(images, ids, distances, strict=True):
        neighbours = [
            {
                "path": str(folder.paths[i]),
                "label": int(folder.labels[i]),
                "class": str(folder.class_names[folder.labels[i]]),
                "distance": float(d),
            }
            for i, d in zip(row_ids, row_distances, strict=True)
            if i >= 0
        ]
        best = neighbours[0]["distance"] if neighbours else float("inf")
        results.append({"image": image, "neighbours": neighbours,
                        "match": bool(best <= meta["threshold"])})  # fmt: skip
    return results


def main(argv) -> None:
    logging.set_verbosity(logging.WARNING)  # faiss's loader logs at INFO
    try:
        if len(argv) < 3:
            raise InputError("usage: python -m trainer.search INDEX IMAGE... [--k=5] [--json]")
        folder = IndexFolder(argv[1])
        results = search(argv[1], argv[2:], FLAGS.k, FLAGS.saved_model)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    meta = folder.meta
    if FLAGS.json:
        document = {"threshold": meta["threshold"], "far": meta["far"],
                    "distance": meta["distance"], "results": results}  # fmt: skip
        print(json.dumps(document, indent=2))
        return
    for result in results:
        verdict = "match" if result["match"] else "no match"
        print(f"{result['image']}: {verdict} (threshold {meta['threshold']:.4f} "
              f"{meta['distance']}, FAR {meta['far']:g})")  # fmt: skip
        for rank, n in enumerate(result["neighbours"], 1):
            print(f"  {rank}. {n['distance']:.4f}  {n['class']} ({n['label']})  {n['path']}")


if __name__ == "__main__":
    app.run(main)
