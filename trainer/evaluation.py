"""Evaluation on held-out classes, by the protocols papers report.

- All against all (SOP, CUB, Cars): every evaluation example queries all the others
  (itself excluded): `retrieval_metrics`.
- Queries against a gallery (In-Shop, re-identification, landmarks): `evaluation.gallery`
  names a second source and only the gallery is ranked: `query_gallery_metrics`. A
  query whose class is not in the gallery has nothing to find: it is left out of both
  figures, and counted.
- Verification (faces): TAR@FAR, ROC AUC, EER and 10-fold accuracy on pairs
  (trainer/retrieval/verification.py), with `evaluation.verification` or `evaluation.pairs`.

Recall@k: the share of queries with at least one same-class key among their k nearest.
MAP@R (Musgrave et al., "A Metric Learning Reality Check", 2020): with R the number of
keys of the query's class, the mean over queries of (1/R) · Σ_{i ≤ R} P@i · [rank i is
relevant].

It holds at millions of examples: no N×N array anywhere. Queries are ranked a chunk at a
time with `tf.math.top_k` on the device (or by a faiss index, `evaluation.search`),
keeping only the neighbours the metrics need (depth = max(k, largest R)); R comes from
class counts. Each query's figures are summed, so the queries can be split over devices
and processes and the sums added (`sharded_retrieval_metrics`). Ties in distance are
broken by index (top_k's order).
"""

from __future__ import annotations

import dataclasses

import gin
import numpy as np
import tensorflow as tf

from data.errors import InputError
from data.pipeline import eval_batches, listed
from losses import pairwise_distances
from trainer.backends import heartbeat
from trainer.retrieval import verification
from trainer.retrieval.neighbours import (
    RECALL_OF_EXACT_AT,
    ApproximateIndex,
    SearchSettings,
    recall_of_exact,
)
from trainer.retrieval.verification import IMPOSTOR_SAMPLE, verification_metrics  # noqa: F401  (public here)

# Distances held at once per device: chunk rows × N keys (2^25 float32 = 128 MB).
MAX_DISTANCES_PER_CHUNK = 1 << 25
SEARCH_SAMPLE = 1000  # queries whose approximate neighbours are checked against exact


def retrieval_metrics(embeddings, labels, ks=(1,), distance="cosine", chunk=1024) -> dict:
    """{'recall@k': ..., 'map@r': ...} of `embeddings` (N, D) with `labels` (N,), in one process.

    Exact: every query against all N keys, `chunk` queries at a time (fewer when N is
    large, so a chunk's distances stay within MAX_DISTANCES_PER_CHUNK).
    """
    ranking = Ranking(embeddings, labels, ks, distance, chunk)
    return ranking.metrics(ranking.sums(0, ranking.num_queries))


def query_gallery_metrics(
    queries, query_labels, gallery, gallery_labels, ks=(1,), distance="cosine", chunk=1024
) -> dict:
    """{'recall@k': ..., 'map@r': ...} of `queries` ranked against `gallery` only, in one
    process. R is the query's class count in the gallery; a query whose class is absent
    from the gallery is left out (`Ranking.left_out` counts them)."""
    ranking = Ranking(gallery, gallery_labels, ks, distance, chunk, queries, query_labels)
    return ranking.metrics(ranking.sums(0, ranking.num_queries))


def sharded_retrieval_metrics(
    embeddings, labels, ks, distance, replicas, chunk=1024, search=None
) -> dict:
    """`retrieval_metrics` with the queries split over every replica of the job."""
    ranking = Ranking(embeddings, labels, ks, distance, chunk, search=search)
    return sharded_metrics(ranking, replicas)


def sharded_metrics(ranking: Ranking, replicas) -> dict:
    """The ranking's metrics with its queries split over every replica of the job.

    Every process holds all keys; each ranks its share of the queries, split again over
    its local devices (one share per process with a faiss index, which is on the host),
    and the per-query sums are added across processes, so N replicas each do 1/N of the
    work.
    """
    start, end = replicas.process_rows(ranking.num_queries)
    devices = replicas.local_devices() if ranking.index is None else [None]
    bounds = np.linspace(start, end, len(devices) + 1).round().astype(int)
    local = sum(
        ranking.sums(first, last, device)
        for device, first, last in zip(devices, bounds[:-1], bounds[1:], strict=True)
    )
    return ranking.metrics(replicas.sum_over_processes(local))


class Ranking:
    """The keys, their labels and each query's R, ready to rank queries against the keys.

    Without `queries` the keys are the queries too (all against all, each query's own
    row excluded); with them, the queries are ranked against the keys (the gallery)
    only, and those whose class has no key are left out. With `search` (a
    SearchSettings other than exact) a faiss index over the keys finds the neighbours.
    """

    def __init__(
        self, keys, key_labels, ks, distance, chunk, queries=None, query_labels=None, search=None
    ):
        key_labels = np.asarray(key_labels)
        self.embeddings = np.asarray(keys, np.float32)
        n = len(key_labels)
        self.all_against_all = queries is None
        if self.all_against_all:
            if n < 2:
                raise ValueError(f"Retrieval needs at least 2 evaluation examples, got {n}.")
            query_labels, self.queries = key_labels, self.embeddings
        else:
            if n < 1:
                raise ValueError("Query/gallery retrieval needs a gallery, got 0 examples.")
            self.queries = np.asarray(queries, np.float32)
            query_labels = np.asarray(query_labels)
            if len(query_labels) < 1:
                raise ValueError("Query/gallery retrieval needs queries, got 0.")
        classes, counts = np.unique(key_labels, return_counts=True)
        position = np.minimum(np.searchsorted(classes, query_labels), len(classes) - 1)
        in_keys = classes[position] == query_labels
        self.self_rows = 1 if self.all_against_all else 0  # one neighbour more: the query
        r = np.where(in_keys, counts[position], 0) - self.self_rows
        self.left_out = 0  # queries whose class has no key: ranked by nobody, counted
        if not self.all_against_all:
            self.left_out = int((~in_keys).sum())
            if self.left_out == len(query_labels):
                raise ValueError(
                    f"None of the {len(query_labels)} queries has its class in the gallery."
                )
            self.queries, query_labels, r = self.queries[in_keys], query_labels[in_keys], r[in_keys]
        self.r = r.astype(np.int32)
        self.ks = tuple(ks)
        self.depth = min(max(int(self.r.max()), *self.ks), n - self.self_rows)
        self.chunk = max(1, min(chunk, MAX_DISTANCES_PER_CHUNK // n))
        self.labels, self.query_labels = key_labels, query_labels
        self.distance = distance
        exact = search is None or search.exact
        self.index = None if exact else ApproximateIndex(self.embeddings, distance, search)
        self._keys, self._key_labels = {}, {}
        self._rank = tf.function(self._rank_chunk, reduce_retracing=True)
        self._score = tf.function(self._score_nearest, reduce_retracing=True)

    @property
    def num_queries(self) -> int:
        return len(self.query_labels)

    def sums(self, start: int, end: int, device: str | None = None) -> np.ndarray:
        """[hits@k for each k..., sum of AP over queries with R > 0, number of them]
        of the queries [start, end), ranked on `device` (or by the faiss index)."""
        totals = np.zeros(len(self.ks) + 2)
        with tf.device(device):
            keys, key_labels = self._on(device)
            for first in range(start, end, self.chunk):
                heartbeat.progress()
                last = min(first + self.chunk, end)
                query_rows = self._query_rows(first, last)
                query_labels, r = (
                    tf.constant(self.query_labels[first:last]),
                    tf.constant(self.r[first:last]),
                )
                if self.index is None:
                    queries = tf.constant(self.queries[first:last])
                    sums = self._rank(queries, query_labels, query_rows, r, keys, key_labels)
                else:
                    nearest = self.index.search(
                        self.queries[first:last], self.depth + self.self_rows
                    )
                    sums = self._score(nearest, query_labels, query_rows, r, key_labels)
                totals += sums.numpy()
        return totals

    def metrics(self, totals) -> dict:
        n = self.num_queries
        result = {f"recall@{k}": float(totals[i] / n) for i, k in enumerate(self.ks)}
        ap_sum, with_relevant = totals[-2], totals[-1]
        result["map@r"] = float(ap_sum / with_relevant) if with_relevant else 0.0
        return result

    def recall_of_exact(self, sample: int = SEARCH_SAMPLE, seed: int = 0) -> float:
        """The approximate search's recall of the exact nearest neighbours (at most
        RECALL_OF_EXACT_AT) on `sample` queries drawn with `seed`."""
        k = min(RECALL_OF_EXACT_AT, len(self.labels) - self.self_rows)
        rows = np.sort(
            np.random.default_rng(seed).choice(
                self.num_queries, min(sample, self.num_queries), replace=False
            )
        )
        keys, _ = self._on(None)
        exact, approximate = [], []
        for first in range(0, len(rows), self.chunk):
            chosen = rows[first : first + self.chunk]
            d = pairwise_distances(tf.constant(self.queries[chosen]), keys, self.distance)
            exact.append(self._without_self(tf.math.top_k(-d, k + self.self_rows)[1], chosen, k))
            found = self.index.search(self.queries[chosen], k + self.self_rows)
            approximate.append(self._without_self(tf.constant(found), chosen, k))
        return recall_of_exact(np.concatenate(approximate), np.concatenate(exact))

    def _without_self(self, nearest, rows, k: int) -> np.ndarray:
        if self.self_rows:
            nearest = self._self_last(nearest, tf.constant(rows, nearest.dtype))
        return np.asarray(nearest)[:, :k]

    def _query_rows(self, first: int, last: int):
        """Each query's own row among the keys (all against all), else -1: never a key."""
        if self.all_against_all:
            return tf.range(int(first), int(last), dtype=tf.int32)
        return tf.fill([last - first], -1)

    def _on(self, device):
        """The keys as tensors on `device`, copied there once."""
        if device not in self._keys:
            self._keys[device] = tf.constant(self.embeddings)
            self._key_labels[device] = tf.constant(self.labels)
        return self._keys[device], self._key_labels[device]

    def _rank_chunk(self, queries, query_labels, query_rows, r, keys, key_labels):
        d = pairwise_distances(queries, keys, self.distance)
        _, nearest = tf.math.top_k(-d, k=self.depth + self.self_rows, sorted=True)
        return self._score_nearest(nearest, query_labels, query_rows, r, key_labels)

    @staticmethod
    def _self_last(nearest, query_rows):
        """The query itself (if among its neighbours) moved to the end: the ranking of
        the others, without writing into the N-wide row."""
        is_self = tf.cast(nearest == tf.cast(query_rows, nearest.dtype)[:, None], tf.int32)
        return tf.gather(nearest, tf.argsort(is_self, axis=1, stable=True), batch_dims=1)

    def _score_nearest(self, nearest, query_labels, query_rows, r, key_labels):
        """The chunk's sums from each query's nearest keys (depth + self_rows of them,
        nearest first; -1 where a faiss index found fewer)."""
        depth = self.depth
        nearest = tf.cast(nearest, tf.int32)
        if self.self_rows:
            nearest = self._self_last(nearest, query_rows)
        nearest = nearest[:, :depth]
        found = nearest >= 0
        relevant = (tf.gather(key_labels, tf.maximum(nearest, 0)) == query_labels[:, None]) & found
        hits = [
            tf.reduce_sum(tf.cast(tf.reduce_any(relevant[:, :k], 1), tf.float64)) for k in self.ks
        ]
        relevant = tf.cast(relevant, tf.float64)
        ranks = tf.range(1, depth + 1, dtype=tf.float64)
        precision = tf.cumsum(relevant, axis=1) / ranks
        within_r = tf.cast(ranks[None, :] <= tf.cast(r, tf.float64)[:, None], tf.float64)
        r_float = tf.cast(r, tf.float64)
        ap = tf.reduce_sum(precision * relevant * within_r, 1) / tf.maximum(r_float, 1.0)
        has_relevant = tf.cast(r > 0, tf.float64)
        return tf.stack([*hits, tf.reduce_sum(ap * has_relevant), tf.reduce_sum(has_relevant)])


def eval_chunks(num_examples: int, chunk_size: int, num_replicas: int) -> list[tuple[int, int]]:
    """[start, end) chunks of the eval set, each split over the replicas by one all-gather.

    Every process runs one collective per chunk, so all must see the same chunks; the
    last is merged into the one before if it has fewer rows than replicas.
    """
    chunk_size = max(num_replicas, -(-chunk_size // num_replicas) * num_replicas)
    starts = list(range(0, num_examples, chunk_size))
    chunks = [(s, min(s + chunk_size, num_examples)) for s in starts]
    if len(chunks) > 1 and chunks[-1][1] - chunks[-1][0] < num_replicas:
        chunks[-2:] = [(chunks[-2][0], chunks[-1][1])]
    return chunks


def embedding_function(model, replicas):
    """Compiled per-replica step: embed the replica's images (inference mode) and
    all-gather the embeddings of every replica, in replica order, with a last column
    saying whether each row's image was read (1) or substituted (0)."""

    @tf.function
    def embed_and_gather(images, ok, replica_rows):
        embeddings = tf.cast(model(images, training=False), tf.float32)
        rows = tf.concat([embeddings, tf.cast(ok, tf.float32)[:, None]], axis=1)
        return replicas.all_gather(rows, replica_rows)

    return embed_and_gather


def embed_source(
    embed_and_gather, replicas, source, chunk_size: int = 512, preprocessing=None, progress=None
):
    """(embeddings, unreadable rows) of a whole evaluation source, in order, on every process.

    Each replica embeds its slice of each chunk and the slices are all-gathered
    (`embedding_function`), so the work is sharded and every process ends with all rows.
    An image unreadable now (changed since the start-up check) was replaced by another
    of its class (data.pipeline.substitutes); its row is listed. `progress(rows done)`
    is called after each chunk.
    """
    chunks = eval_chunks(len(source), chunk_size, replicas.size)
    my_rows = [_process_rows_of_chunk(replicas, start, end) for start, end in chunks]
    embeddings, read = None, np.ones(len(source), bool)
    batches = eval_batches(source, my_rows, preprocessing)
    for (start, end), (images, _, ok) in zip(chunks, batches, strict=True):
        distributed = replicas.distribute(images, ok, global_size=end - start)
        layout = {"replica_rows": replicas.replica_rows(end - start)}
        gathered = np.asarray(
            replicas.local_results(replicas.run(embed_and_gather, distributed, layout))[0]
        )
        if embeddings is None:  # one array of N rows, filled in place (no list of copies)
            embeddings = np.empty((len(source), gathered.shape[1] - 1), np.float32)
        embeddings[start:end] = gathered[:, :-1]
        read[start:end] = gathered[:, -1] > 0.5
        heartbeat.progress()  # long work, not a wait (the watchdog's clock)
        if progress is not None:
            progress(end)
    return embeddings, np.flatnonzero(~read)


def _process_rows_of_chunk(replicas, start: int, end: int) -> tuple[int, int]:
    """This process's rows of the chunk [start, end), as absolute indices."""
    first, last = replicas.process_rows(end - start)
    return start + first, start + last


def mean_cosine(embedding_sum, count: int) -> float:
    """Mean cosine over all pairs (i != j) of `count` unit vectors summing to
    `embedding_sum`: (|sum|² - n) / (n (n - 1)). O(n d), never an n × n matrix."""
    if count < 2:
        return float("nan")
    total = np.asarray(embedding_sum, np.float64)
    return float((total @ total - count) / (count * (count - 1)))


def mean_cosine_of(embeddings) -> float:
    """`mean_cosine` of the rows of `embeddings` (N, D), each L2-normalized first."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit_sum = (embeddings / np.maximum(norms, 1e-12)).sum(axis=0, dtype=np.float64)
    return mean_cosine(unit_sum, len(embeddings))


@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
    """What the job's evaluation computes (the gin configurable `evaluation`)."""

    gallery: object = None  # a source function: rank the eval source against it only
    search: SearchSettings = SearchSettings()
    ks: tuple = (1, 4)
    chunk_size: int = 512
    verification: bool = False
    pairs: str | None = None
    impostor_pairs: int = IMPOSTOR_SAMPLE
    search_sample: int = SEARCH_SAMPLE

    @property
    def verifies(self) -> bool:
        return self.verification or self.pairs is not None


@gin.configurable("evaluation")
def evaluation(
    gallery=None,
    search: str = "exact",
    recall_k=4,
    chunk_size: int = 512,
    verification: bool = False,
    pairs: str | None = None,
    impostor_pairs: int = IMPOSTOR_SAMPLE,
    search_sample: int = SEARCH_SAMPLE,
    ivf_lists: int | None = None,
    ivf_probes: int | None = None,
    hnsw_links: int = 32,
    hnsw_ef_search: int = 256,
) -> EvaluationSettings:
    """The evaluation's settings, checked (gin/base.gin documents each)."""
    ks = (recall_k,) if isinstance(recall_k, int) and not isinstance(recall_k, bool) else recall_k
    if not (
        isinstance(ks, tuple | list)
        and ks
        and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks)
    ):
        raise InputError(
            f"evaluation.recall_k must be a whole number >= 1 or a tuple of them, got {recall_k!r}."
        )
    for name, value in (
        ("chunk_size", chunk_size),
        ("impostor_pairs", impostor_pairs),
        ("search_sample", search_sample),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"evaluation.{name} must be a whole number >= 1, got {value!r}.")
    if not isinstance(verification, bool):
        raise InputError(f"evaluation.verification must be True or False, got {verification!r}.")
    if pairs is not None and not isinstance(pairs, str):
        raise InputError(f"evaluation.pairs must be a file path or None, got {pairs!r}.")
    if gallery is not None and not callable(gallery):
        raise InputError(
            f"evaluation.gallery must be a source (e.g. @gallery_split/list_file), got {gallery!r}."
        )
    settings = SearchSettings(search, ivf_lists, ivf_probes, hnsw_links, hnsw_ef_search)
    settings.check()
    return EvaluationSettings(
        gallery,
        settings,
        tuple(sorted({1, *ks})),
        chunk_size,
        verification,
        pairs,
        impostor_pairs,
        search_sample,
    )


COUNTS = ("queries_left_out",)  # figures that are counts, printed as such


def format_figures(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.0f}" if k in COUNTS else f"{k} {v:.4f}" for k, v in metrics.items())


def common_labels(*sources) -> list[np.ndarray]:
    """The sources' labels in one label space, matched by class name: two splits of a
    listing number their classes apart (list_file's positions among the kept ids)."""
    names = [np.asarray(source.class_names, dtype=object)[source.labels] for source in sources]
    _, inverse = np.unique(np.concatenate(names).astype(str), return_inverse=True)
    bounds = np.cumsum([0] + [len(n) for n in names])
    return [inverse[a:b].astype(np.int64) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class Evaluator:
    """Embeds the eval set (and gallery) on all replicas, computes the metrics, logs them."""

    def __init__(self, model, replicas, data, distance, settings, summaries, say, seed=0):
        self.model, self.replicas, self.distance = model, replicas, distance
        self.source, self.preprocessing = data.eval_source, data.eval_preprocessing
        self.gallery = data.gallery_source
        self.on_corrupt = data.on_corrupt
        self.settings, self.seed = settings, seed
        self.search = dataclasses.replace(settings.search, seed=seed)
        self.ks = settings.ks
        self.chunk_size, self.summaries, self.say = settings.chunk_size, summaries, say
        self.pairs = data.eval_pairs  # evaluation.pairs, read with the data; None: drawn
        self.retrace()

    def retrace(self) -> None:
        """A fresh compiled embedding step (see `TrainStep.retrace`)."""
        self.embed = embedding_function(self.model, self.replicas)

    def _embedded(self, source, step: int) -> np.ndarray:
        embeddings, unreadable_rows = embed_source(
            self.embed, self.replicas, source, self.chunk_size, self.preprocessing
        )
        if len(unreadable_rows):
            self._unreadable(step, source, [source.describe(i) for i in unreadable_rows])
        return embeddings

    def __call__(self, step: int):
        embeddings = self._embedded(self.source, step)
        metrics = self.retrieval(embeddings, step)
        scalars = {}
        if self.settings.verifies:
            found, png = self.verification(embeddings)
            metrics.update(found)
            self.summaries.image("eval/roc", png, step)
        self.last_mean_cosine = mean_cosine_of(embeddings)
        scalars.update({f"eval/{k}": v for k, v in metrics.items()})
        self.summaries.scalars(step, {**scalars, "eval/mean_cosine": self.last_mean_cosine})
        figures = format_figures(metrics)
        self.say(
            f"eval at step {step}: {figures}  mean cosine {self.last_mean_cosine:.3f}", flush=True
        )
        return metrics, embeddings

    def retrieval(self, embeddings, step: int) -> dict:
        """Recall@k and MAP@R, all against all or against the gallery; with an
        approximate search, its recall of the exact neighbours."""
        search = self.search
        if self.gallery is None:
            ranking = Ranking(
                embeddings, self.source.labels, self.ks, self.distance, 1024, search=search
            )
        else:
            gallery = self._embedded(self.gallery, step)
            query_labels, gallery_labels = common_labels(self.source, self.gallery)
            ranking = Ranking(
                gallery, gallery_labels, self.ks, self.distance, 1024, embeddings, query_labels,
                search=search,
            )  # fmt: skip
            if ranking.left_out:
                self.say(
                    f"eval at step {step}: {ranking.left_out} of {len(query_labels)} queries "
                    f"have no class in the gallery {self.gallery.name}: left out"
                )
        metrics = sharded_metrics(ranking, self.replicas)
        if self.gallery is not None:
            metrics["queries_left_out"] = float(ranking.left_out)
        if ranking.index is not None:
            metrics["search_recall_of_exact"] = ranking.recall_of_exact(
                self.settings.search_sample, self.seed
            )
        return metrics

    def verification(self, embeddings) -> tuple[dict, bytes | None]:
        """Verification metrics on the pairs file, or on every genuine pair and a sample
        of impostors; and the ROC curve as a PNG (the chief's: only it writes)."""
        scored = verification.scored_pairs(
            embeddings,
            self.source.labels,
            self.pairs,
            self.distance,
            self.seed,
            self.settings.impostor_pairs,
        )
        png = verification.roc_png(scored, self.source.name) if self.replicas.is_chief else None
        return verification.metrics_of(scored), png

    def _unreadable(self, step: int, source, names: list[str]) -> None:
        if self.on_corrupt == "stop":
            raise InputError(
                f"{len(names)} evaluation image(s) of {source.name} cannot be read at step "
                f"{step}, although they passed the start-up check: {listed(names)}. Fix them "
                "and run the same command, or set verify_images.on_corrupt='skip'."
            )
        self.say(
            f"eval at step {step}: unreadable image(s) {listed(names)} replaced by others of "
            "their class"
        )
