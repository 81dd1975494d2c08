"""What a finished job leaves behind: the embedding model as a SavedModel that serves
encoded images, and the evaluation embeddings for TensorBoard's projector (labels as
metadata)."""

from __future__ import annotations

import json
import os
import shutil

import gin
import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins import projector as tb_projector

from data.errors import InputError
from data.pipeline import ImagePreprocessing
from losses.distances import canonical_distance
from trainer.settings import check_types

# Beside the graph (TF Serving ignores assets.extra): what the model's embeddings are
# compared with, so an index is never built or searched with another distance.
FACTS = os.path.join("assets.extra", "embedding.json")


@gin.configurable("export")
def export_settings(enabled: bool = True) -> bool:
    """Whether the chief exports the SavedModel at the end (gin/base.gin)."""
    check_types("export", export_settings, dict(locals()))
    return enabled


def saved_model(model, path: str, preprocessing=None, distance: str | None = None) -> str:
    """Exports `model` (images -> L2-normalized embeddings) with three signatures:

    - `serving_default`: a batch of encoded images (tf.string: JPEG, PNG, BMP or GIF,
      any size), decoded and pre-processed inside the graph as the evaluation does it
      (`preprocessing`, the job's eval pre-processing), so a server needs nothing of
      this project and there is no skew between training and serving;
    - `embed`: decoded uint8 images of one size per call (any size), pre-processed alike;
    - `serve`: images already pre-processed (float32, the model's input size), as before.

    The first two return {"embeddings": …}; `serve` returns the embeddings alone, as it did.

    `distance` (the job's loss's) and the embedding width go to assets.extra/embedding.json.
    Written to a temporary folder and renamed, so `path` never holds half a model.
    """
    height, width, channels = model.input_shape[1:]
    prepare = serving_preprocessing(preprocessing, (height, width), channels)

    def embed_decoded(images):  # uint8 [N, H, W, C] -> embeddings
        prepared = tf.map_fn(prepare, images, fn_output_signature=tf.TensorSpec(
            (height, width, channels), tf.float32))  # fmt: skip
        return {"embeddings": model(prepared, training=False)}

    def embed_encoded(images):  # tf.string [N] -> embeddings
        def decoded(encoded):
            image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
            return prepare(image)

        prepared = tf.map_fn(decoded, images, fn_output_signature=tf.TensorSpec(
            (height, width, channels), tf.float32))  # fmt: skip
        return {"embeddings": model(prepared, training=False)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    encoded_spec = tf.TensorSpec([None], tf.string, name="images")
    decoded_spec = tf.TensorSpec([None, None, None, channels], tf.uint8, name="images")
    archive.add_endpoint("serving_default", embed_encoded, [encoded_spec])
    archive.add_endpoint("embed", embed_decoded, [decoded_spec])
    archive.add_endpoint(
        "serve",
        lambda images: model(images, training=False),
        [tf.TensorSpec([None, height, width, channels], tf.float32, name="images")],
    )
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    archive.write_out(partial, verbose=False)
    os.makedirs(os.path.join(partial, os.path.dirname(FACTS)), exist_ok=True)
    with open(os.path.join(partial, FACTS), "w") as f:
        distance = canonical_distance(distance) if distance else None
        json.dump({"distance": distance, "dim": int(model.output_shape[-1])}, f)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(partial, path)
    return path


def load_model(path: str):
    """The SavedModel at `path`, with its `serve` and `serving_default` signatures."""
    try:
        model = tf.saved_model.load(path)
    except (OSError, ValueError, tf.errors.OpError) as error:
        raise InputError(f"the SavedModel {path!r} cannot be loaded: {str(error)[:200]}") from error
    if "serving_default" not in model.signatures or not hasattr(model, "serve"):
        raise InputError(
            f"the SavedModel {path!r} has no serving_default and serve signatures: export it "
            "with this version of the trainer (a finished job writes <workdir>/saved_model)"
        )
    return model


def embedding_facts(path: str) -> dict:
    """The exported model's distance and width ({} for an export older than the file)."""
    try:
        with open(os.path.join(path, FACTS)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise InputError(f"{os.path.join(path, FACTS)!r} cannot be read: {error}") from error


def check_distance(path: str, distance: str, what: str) -> None:
    """Refuses a SavedModel whose embeddings were trained for another distance than `what`'s."""
    exported = embedding_facts(path).get("distance")
    if exported is not None and exported != distance:
        raise InputError(
            f"the SavedModel {path!r} was trained for the {exported} distance, {what} uses "
            f"{distance}: embeddings compared with another distance than their loss's rank wrongly"
        )


def serving_preprocessing(preprocessing, size: tuple[int, int], channels: int):
    """A decoded uint8 image (H, W, C) -> the model's input, as the evaluation prepares
    it: an image source's central crop and resize in [0, 255] (`data.pipeline.
    ImagePreprocessing.eval`); a pixel source's pixels scaled to [0, 1] and resized to
    its size (its evaluation takes them as they are)."""
    if isinstance(preprocessing, ImagePreprocessing):
        return lambda image: preprocessing.eval(tf.cast(image, tf.float32))

    def pixels(image):
        image = tf.cast(image, tf.float32) / 255.0
        resized = lambda: tf.image.resize(image, size, antialias=True)  # noqa: E731
        as_is = tf.reduce_all(tf.shape(image)[:2] == size)  # a resize there is not exact
        return tf.ensure_shape(tf.cond(as_is, lambda: image, resized), (*size, None))

    return pixels


def projector(logdir: str, embeddings: np.ndarray, source, max_points: int = 100_000) -> str:
    """Writes embeddings.tsv and metadata.tsv (label, class name) under `logdir`/projector
    and the projector config TensorBoard reads from `logdir`.

    At most `max_points` rows, evenly strided (the projector samples 100k points
    anyway, and a browser cannot load the TSV of a million).
    """
    folder = os.path.join(logdir, "projector")
    os.makedirs(folder, exist_ok=True)
    rows = np.linspace(0, len(embeddings) - 1, min(len(embeddings), max_points)).astype(int)
    np.savetxt(os.path.join(folder, "embeddings.tsv"), embeddings[rows], delimiter="\t", fmt="%.6g")
    with open(os.path.join(folder, "metadata.tsv"), "w") as f:
        f.write("label\tclass\n")
        for label in source.labels[rows]:
            f.write(f"{label}\t{source.class_names[label]}\n")
    config = tb_projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = "eval_embeddings"
    embedding.tensor_path = os.path.join("projector", "embeddings.tsv")
    embedding.metadata_path = os.path.join("projector", "metadata.tsv")
    tb_projector.visualize_embeddings(logdir, config)
    return folder
