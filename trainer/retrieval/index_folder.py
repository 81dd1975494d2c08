"""The folder `python -m trainer.index` writes and `python -m trainer.search` reads.

  index.faiss  the faiss index of the embeddings (exact, IVF or HNSW)
  rows.npz     each row's path (or source[i] for in-memory pixels), label and the class
               names; numpy arrays of strings and integers, read without pickle
  index.json   the distance, embedding width, row count, search kind, the SavedModel it
               was embedded with, and the decision threshold calibrated for a target FAR

Nothing is loaded with pickle. The folder is written beside its final place and renamed
into it, so a reader never meets half an index.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from data.errors import InputError
from trainer.retrieval.neighbours import faiss_module

FORMAT = 1
FILES = ("index.faiss", "rows.npz", "index.json")


def write(folder: str, index, paths, labels, class_names, meta: dict) -> None:
    """Writes the index folder atomically (a `.partial` folder renamed into place)."""
    faiss = faiss_module()
    partial = folder.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    if hasattr(faiss, "index_gpu_to_cpu") and type(index).__name__.startswith("Gpu"):
        index = faiss.index_gpu_to_cpu(index)
    faiss.write_index(index, os.path.join(partial, "index.faiss"))
    np.savez(
        os.path.join(partial, "rows.npz"),
        paths=np.asarray(paths, str),
        labels=np.asarray(labels, np.int64),
        class_names=np.asarray(class_names, str),
    )
    with open(os.path.join(partial, "index.json"), "w") as f:
        json.dump({"format": FORMAT, **meta}, f, indent=2)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


class IndexFolder:
    """An index folder read back: `meta`, `paths`, `labels`, `class_names`, `index`."""

    def __init__(self, folder: str):
        missing = [name for name in FILES if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise InputError(
                f"{folder!r} is not an index written by trainer.index (missing "
                f"{', '.join(missing)})"
            )
        try:
            with open(os.path.join(folder, "index.json")) as f:
                self.meta = json.load(f)
            rows = np.load(os.path.join(folder, "rows.npz"), allow_pickle=False)
            self.paths, self.labels = rows["paths"], rows["labels"]
            self.class_names = rows["class_names"]
            self.index = faiss_module().read_index(os.path.join(folder, "index.faiss"))
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise InputError(f"the index {folder!r} cannot be read: {error}") from error
        if self.meta.get("format") != FORMAT:
            raise InputError(f"{folder!r}: index format {self.meta.get('format')}, not {FORMAT}")
        if self.index.ntotal != len(self.paths) or self.index.d != self.meta["dim"]:
            raise InputError(
                f"{folder!r} is inconsistent: {self.index.ntotal} vectors of width "
                f"{self.index.d}, {len(self.paths)} rows, index.json says width {self.meta['dim']}"
            )
