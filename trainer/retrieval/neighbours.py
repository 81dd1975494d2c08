"""Approximate nearest neighbours on faiss, for galleries too large to rank exactly.

`evaluation.search` picks the index: 'exact' (the default) ranks on TensorFlow
(trainer/evaluation.py); 'ivf' is an inverted file of `ivf_lists` k-means cells of
which each query visits `ivf_probes` (None: a twelfth); 'hnsw' a graph of `hnsw_links`
links per vector, searched with a beam of `hnsw_ef_search`. Cosine search is inner product on unit
vectors, the Euclidean distances are faiss's L2. Faiss's GPU build is used when it is
installed and sees a GPU.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from data.errors import InputError
from losses.distances import canonical_distance

SEARCHES = ("exact", "ivf", "hnsw")
IVF_TRAINING_POINTS_PER_LIST = 64  # k-means on at most this many points per cell
IVF_PROBED_SHARE = 12  # default probes: 1/12 of the cells (recall@10 of exact 0.99, BENCHMARKS)
MIN_TRAINING_POINTS_PER_LIST = 39  # fewer, and faiss's k-means warns: fewer cells then
RECALL_OF_EXACT_AT = 10  # eval/search_recall_of_exact: share of the exact 10 nearest found


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    kind: str = "exact"
    ivf_lists: int | None = None  # None: about 4 sqrt(N), at least 1
    ivf_probes: int | None = None  # None: a twelfth of the cells
    hnsw_links: int = 32
    hnsw_ef_search: int = 256
    seed: int = 0

    def check(self) -> None:
        if self.kind not in SEARCHES:
            raise InputError(f"Unknown evaluation.search {self.kind!r}; valid: {SEARCHES}.")
        for name in ("ivf_probes", "hnsw_links", "hnsw_ef_search"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"evaluation.{name} must be >= 1, got {getattr(self, name)}.")
        if self.ivf_lists is not None and self.ivf_lists < 1:
            raise InputError(f"evaluation.ivf_lists must be >= 1 or None, got {self.ivf_lists}.")

    @property
    def exact(self) -> bool:
        return self.kind == "exact"


def faiss_module():
    try:
        import faiss
    except ImportError as error:
        raise InputError(
            "evaluation.search 'ivf' and 'hnsw' need faiss (make install installs faiss-cpu; "
            f"pip install faiss-cpu): {error}"
        ) from error
    return faiss


def prepared(vectors, distance: str) -> np.ndarray:
    """float32, C-contiguous, unit rows for the cosine distance."""
    x = np.ascontiguousarray(vectors, np.float32)
    if canonical_distance(distance) == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(x, np.float32)


class ApproximateIndex:
    """A faiss index over `keys` (N, D): `search(queries, k)` -> (Q, k) row ids, nearest first."""

    def __init__(self, keys, distance: str, settings: SearchSettings):
        faiss = faiss_module()
        settings.check()
        self.settings, self.distance = settings, canonical_distance(distance)
        keys = prepared(keys, self.distance)
        n, dim = keys.shape
        metric = faiss.METRIC_INNER_PRODUCT if self.distance == "cosine" else faiss.METRIC_L2
        if settings.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, settings.hnsw_links, metric)
            index.hnsw.efConstruction = max(40, 2 * settings.hnsw_links)
        elif settings.kind == "ivf":
            lists = settings.ivf_lists or max(1, round(4 * math.sqrt(n)))
            lists = min(lists, max(1, n // MIN_TRAINING_POINTS_PER_LIST))
            quantizer = faiss.IndexFlat(dim, metric)
            index = faiss.IndexIVFFlat(quantizer, dim, lists, metric)
            index.cp.seed = settings.seed
            sample = min(n, lists * IVF_TRAINING_POINTS_PER_LIST)
            rows = np.random.default_rng(settings.seed).choice(n, sample, replace=False)
            index.train(keys[np.sort(rows)])
            index.nprobe = min(settings.ivf_probes or max(1, lists // IVF_PROBED_SHARE), lists)
        else:
            index = faiss.IndexFlat(dim, metric)
        index.add(keys)
        self.index, self.size, self.dim = on_gpus(faiss, index, settings.kind), n, dim

    def search(self, queries, k: int) -> np.ndarray:
        if self.settings.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.settings.hnsw_ef_search, k)
        _, ids = self.index.search(prepared(queries, self.distance), k)
        return ids

    @property
    def nbytes(self) -> int:
        """The index's size as faiss serializes it."""
        return int(faiss_module().serialize_index(self.index).size)


def on_gpus(faiss, index, kind: str):
    """`index` copied to every GPU faiss sees (its GPU build; not HNSW, which faiss runs
    on the CPU only), else as it is."""
    if kind == "hnsw" or not hasattr(faiss, "index_cpu_to_all_gpus") or not faiss.get_num_gpus():
        return index
    return faiss.index_cpu_to_all_gpus(index)


def recall_of_exact(approximate_ids, exact_ids) -> float:
    """Mean share of each query's exact nearest neighbours that the approximate search
    also returned (both (Q, k))."""
    found = [
        len(np.intersect1d(a, e)) / len(e) for a, e in zip(approximate_ids, exact_ids, strict=True)
    ]
    return float(np.mean(found))
