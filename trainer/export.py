"""What a finished job leaves behind: the embedding model as a SavedModel, and the
evaluation embeddings for TensorBoard's projector (labels as metadata)."""

from __future__ import annotations

import os
import shutil

import numpy as np
from tensorboard.plugins import projector as tb_projector


def saved_model(model, path: str) -> str:
    """Exports `model` (images -> embeddings) with a `serve` signature.

    Written to a temporary folder and renamed, so `path` never holds half a model.
    """
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.export(partial, format="tf_saved_model", verbose=False)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(partial, path)
    return path


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
