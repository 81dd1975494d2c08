"""`python -m trainer.index`: a retrieval index of a data source, embedded by an exported model.

  python -m trainer.index --saved_model=RUN/saved_model --gin_file=JOB --output=INDEX
      [--split=eval|train] [--search=exact|ivf|hnsw] [--far=1e-3] [--batch=256]

The source is the job config's `train.eval_data` (or `train.train_data`), read and
pre-processed by the evaluation's pipeline and embedded by the SavedModel's `serve`
signature (the job checked that this equals `serving_default` on the files' bytes),
sharded as the evaluation shards it: over `distribute.cpu_replicas` or the GPUs, or over
Horovod workers under `horovodrun -np N python -m trainer.index ...` (the chief writes). The
distance is the job's loss's. The index is faiss's: the config's `evaluation.search`
with its `ivf_*`/`hnsw_*` settings, or --search's kind with them; beside it go the rows'
paths and labels and a decision threshold calibrated on the source's genuine and
impostor pairs (the evaluation's `verification` pairs) for the false accept rate --far.
See trainer/retrieval/index_folder.py for the folder.

Exit status 2 with one line naming the thing for a missing or mismatched SavedModel or
config (a model trained for another distance than the config's loss), a source that
yields nothing or an image that cannot be read; nothing is written then.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import gin
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from data.errors import InputError
from data.pipeline import preprocessing_for
from losses.distances import canonical_distance
from trainer import main as job
from trainer.backends.replicas import Replicas, make_replicas
from trainer.evaluation import embed_source as embed_source_in_chunks
from trainer.evaluation import embedding_function, evaluation
from trainer.job_config import parse_config
from trainer.outputs.export import check_distance, load_model
from trainer.retrieval import index_folder
from trainer.retrieval.calibration import calibrate
from trainer.retrieval.neighbours import ApproximateIndex

FLAGS = flags.FLAGS
flags.DEFINE_string("saved_model", None, "The SavedModel a job exported (<workdir>/saved_model).")
flags.DEFINE_string("output", None, "The index folder to write (replaced whole).")
flags.DEFINE_enum("split", "eval", ["eval", "train"], "Which data source of the job to index.")
flags.DEFINE_enum(
    "search",
    None,
    ["exact", "ivf", "hnsw"],
    "faiss index kind (default: the config's evaluation.search).",
)
flags.DEFINE_float("far", 1e-3, "False accept rate the threshold is calibrated for.")
flags.DEFINE_integer("batch", 256, "Images embedded per call.")


class _ServeSignature:
    """The exported `serve` signature called as the evaluation calls its Keras model."""

    def __init__(self, model):
        self.model = model

    def __call__(self, images, training=False):
        del training  # an export is always in inference mode
        return self.model.serve(tf.cast(images, tf.float32))


def embed_source(model, replicas, source, batch: int, say=print) -> np.ndarray:
    """Every row of `source` embedded by `model.serve`, in order, sharded over the replicas
    and processes as the evaluation shards it (every process ends with all rows)."""
    started, shown = time.time(), [0.0]

    def progress(done: int) -> None:
        if time.time() - shown[0] >= 10 or done == len(source.labels):
            rate = done / max(time.time() - started, 1e-9)
            say(f"embedded {done:,}/{len(source.labels):,} ({rate:,.0f} images/s)", flush=True)
            shown[0] = time.time()

    with replicas.scope():
        step = embedding_function(_ServeSignature(model), replicas)
    embeddings, unreadable = embed_source_in_chunks(
        step, replicas, source, batch, preprocessing_for(source), progress
    )
    if len(unreadable):
        names = ", ".join(repr(str(source.items[i])) for i in unreadable[:3])
        raise InputError(
            f"{len(unreadable)} image(s) of {source.name} cannot be read now ({names}"
            f"{', …' if len(unreadable) > 3 else ''}): an index must not hold another "
            "image's embedding under their paths"
        )
    return embeddings


def build(saved_model: str, output: str, split: str, search: str | None, far: float, batch: int,
          replicas=None, say=print) -> dict | None:  # fmt: skip
    """Embeds the configured source, sharded over `replicas`, and has the chief write the
    index folder; returns its index.json on the chief (None on the other processes)."""
    replicas = replicas or Replicas()
    say = say if replicas.is_chief else (lambda *args, **kwargs: None)
    model = load_model(saved_model)
    source = gin.query_parameter(f"train.{split}_data").scoped_configurable_fn()
    if not len(source.labels):
        raise InputError(f"train.{split}_data ({source.name}) yields no examples to index")
    loss = gin.query_parameter("train.loss").scoped_configurable_fn()
    distance = canonical_distance(loss.distance)
    check_distance(saved_model, distance, "the config's train.loss")
    say(f"indexing {source.name}: {len(source.labels):,} examples, {distance} distance, "
        f"{replicas.size} replica(s)")  # fmt: skip
    embeddings = embed_source(model, replicas, source, batch, say)
    if not replicas.is_chief:
        return None
    settings = evaluation().search  # evaluation.search and its ivf_/hnsw_ settings
    if search is not None:
        settings = dataclasses.replace(settings, kind=search)
    search = settings.kind
    started = time.time()
    index = ApproximateIndex(embeddings, distance, settings)
    built = time.time() - started
    calibrated = calibrate(embeddings, source.labels, distance, far)
    paths = (
        [str(p) for p in source.items]
        if source.kind == "file"
        else [f"{source.name}[{i}]" for i in range(len(source.labels))]
    )
    meta = {
        "distance": distance,
        "dim": int(embeddings.shape[1]),
        "count": len(paths),
        "search": search,
        "source": source.name,
        "saved_model": os.path.abspath(saved_model),
        "build_seconds": round(built, 3),
        **calibrated,
    }
    index_folder.write(output, index.index, paths, source.labels, source.class_names, meta)
    say(
        f"wrote {output}: {len(paths):,} rows of width {meta['dim']} ({search}); threshold "
        f"{calibrated['threshold']:.4f} ({distance}) for FAR {far:g}: TAR "
        f"{calibrated['tar']:.4f} on {calibrated['genuine_pairs']:,} genuine pairs, FAR "
        f"{calibrated['measured_far']:.5f} on {calibrated['impostor_pairs']:,} impostor pairs"
    )
    return meta


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # faiss's loader logs at INFO
    try:
        for name in ("saved_model", "output"):
            if not getattr(FLAGS, name):
                raise InputError(f"--{name} is required")
        parse_config(job.gin_files(), FLAGS.gin_param)
        replicas = make_replicas()  # the config's distribute.*; Horovod under horovodrun
        build(FLAGS.saved_model, FLAGS.output, FLAGS.split, FLAGS.search, FLAGS.far,
              FLAGS.batch, replicas)  # fmt: skip
    except InputError as error:
        job.report(error)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
