"""Retrieval evaluation on held-out classes: Recall@k and MAP@R by exact nearest neighbours.

Every evaluation example queries all the others (itself excluded). Recall@k: the share
of queries with at least one same-class example among their k nearest. MAP@R
(Musgrave et al., "A Metric Learning Reality Check", 2020): with R the number of other
examples of the query's class, the mean over queries of
(1/R) · Σ_{i ≤ R} P@i · [rank i is relevant].

It holds at millions of examples: no N×N array anywhere. Queries are ranked a chunk at a
time with `tf.math.top_k` on the device, keeping only the neighbours the metrics need
(depth = max(k, largest R)); R comes from class counts. Each query's figures are summed,
so the queries can be split over devices and processes and the sums added
(`sharded_retrieval_metrics`). Ties in distance are broken by index (top_k's order).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from data.errors import InputError
from data.pipeline import eval_batches, listed
from losses import pairwise_distances

# Distances held at once per device: chunk rows × N keys (2^25 float32 = 128 MB).
MAX_DISTANCES_PER_CHUNK = 1 << 25


def retrieval_metrics(embeddings, labels, ks=(1,), distance="cosine", chunk=1024) -> dict:
    """{'recall@k': ..., 'map@r': ...} of `embeddings` (N, D) with `labels` (N,), in one process.

    Exact: every query against all N keys, `chunk` queries at a time (fewer when N is
    large, so a chunk's distances stay within MAX_DISTANCES_PER_CHUNK).
    """
    ranking = Ranking(embeddings, labels, ks, distance, chunk)
    return ranking.metrics(ranking.sums(0, len(ranking.labels)))


def sharded_retrieval_metrics(embeddings, labels, ks, distance, replicas, chunk=1024) -> dict:
    """`retrieval_metrics` with the queries split over every replica of the job.

    Every process holds all embeddings (the keys); each ranks its share of the queries,
    split again over its local devices, and the per-query sums are added across
    processes, so N replicas each do 1/N of the work.
    """
    ranking = Ranking(embeddings, labels, ks, distance, chunk)
    start, end = replicas.process_rows(len(ranking.labels))
    devices = replicas.local_devices()
    bounds = np.linspace(start, end, len(devices) + 1).round().astype(int)
    local = sum(
        ranking.sums(first, last, device)
        for device, first, last in zip(devices, bounds[:-1], bounds[1:], strict=True)
    )
    return ranking.metrics(replicas.sum_over_processes(local))


class Ranking:
    """The keys, labels and per-query R of an evaluation set, ready to rank queries."""

    def __init__(self, embeddings, labels, ks, distance, chunk):
        labels = np.asarray(labels)
        n = len(labels)
        if n < 2:
            raise ValueError(f"Retrieval needs at least 2 evaluation examples, got {n}.")
        _, class_of, counts = np.unique(labels, return_inverse=True, return_counts=True)
        self.r = (counts[class_of] - 1).astype(np.int32)
        self.ks = tuple(ks)
        self.depth = min(max(int(self.r.max()), *self.ks), n - 1)
        self.chunk = max(1, min(chunk, MAX_DISTANCES_PER_CHUNK // n))
        self.labels = labels
        self.embeddings = np.asarray(embeddings, np.float32)
        self.distance = distance
        self._keys, self._key_labels = {}, {}
        self._rank = tf.function(self._rank_chunk, reduce_retracing=True)

    def sums(self, start: int, end: int, device: str | None = None) -> np.ndarray:
        """[hits@k for each k..., sum of AP over queries with R > 0, number of them]
        of the queries [start, end), ranked on `device`."""
        totals = np.zeros(len(self.ks) + 2)
        with tf.device(device):
            keys, key_labels = self._on(device)
            for first in range(start, end, self.chunk):
                last = min(first + self.chunk, end)
                totals += self._rank(
                    keys[first:last],
                    key_labels[first:last],
                    tf.range(int(first), int(last), dtype=tf.int32),
                    tf.constant(self.r[first:last]),
                    keys,
                    key_labels,
                ).numpy()
        return totals

    def metrics(self, totals) -> dict:
        n = len(self.labels)
        result = {f"recall@{k}": float(totals[i] / n) for i, k in enumerate(self.ks)}
        ap_sum, with_relevant = totals[-2], totals[-1]
        result["map@r"] = float(ap_sum / with_relevant) if with_relevant else 0.0
        return result

    def _on(self, device):
        """The keys as tensors on `device`, copied there once."""
        if device not in self._keys:
            self._keys[device] = tf.constant(self.embeddings)
            self._key_labels[device] = tf.constant(self.labels)
        return self._keys[device], self._key_labels[device]

    def _rank_chunk(self, queries, query_labels, query_rows, r, keys, key_labels):
        depth = self.depth
        d = pairwise_distances(queries, keys, self.distance)
        # One neighbour more than needed, then the query itself (if among them) moves to
        # the end: the ranking of the others, without writing into the N-wide row.
        _, nearest = tf.math.top_k(-d, k=depth + 1, sorted=True)
        is_self = tf.cast(nearest == query_rows[:, None], tf.int32)
        nearest = tf.gather(nearest, tf.argsort(is_self, axis=1, stable=True), batch_dims=1)
        relevant = tf.gather(key_labels, nearest[:, :depth]) == query_labels[:, None]
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


def embed_source(embed_and_gather, replicas, source, chunk_size: int = 512, preprocessing=None):
    """(embeddings, unreadable rows) of a whole evaluation source, in order, on every process.

    Each replica embeds its slice of each chunk and the slices are all-gathered
    (`embedding_function`), so the work is sharded and every process ends with all rows.
    An image unreadable now (changed since the start-up check) was replaced by another
    of its class (data.pipeline.substitutes); its row is listed.
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


class Evaluator:
    """Embeds the eval set on all replicas, computes retrieval metrics, logs them."""

    def __init__(self, model, replicas, data, distance, recall_k, chunk_size, summaries, say):
        self.model, self.replicas, self.distance = model, replicas, distance
        self.source, self.preprocessing = data.eval_source, data.eval_preprocessing
        self.on_corrupt = data.on_corrupt
        self.ks = sorted({1, recall_k})
        self.chunk_size, self.summaries, self.say = chunk_size, summaries, say
        self.retrace()

    def retrace(self) -> None:
        """A fresh compiled embedding step (see `TrainStep.retrace`)."""
        self.embed = embedding_function(self.model, self.replicas)

    def __call__(self, step: int):
        embeddings, unreadable_rows = embed_source(
            self.embed, self.replicas, self.source, self.chunk_size, self.preprocessing
        )
        if len(unreadable_rows):
            self._unreadable(step, [self.source.describe(i) for i in unreadable_rows])
        metrics = sharded_retrieval_metrics(
            embeddings, self.source.labels, self.ks, self.distance, self.replicas
        )
        self.last_mean_cosine = mean_cosine_of(embeddings)
        scalars = {f"eval/{k}": v for k, v in metrics.items()}
        self.summaries.scalars(step, {**scalars, "eval/mean_cosine": self.last_mean_cosine})
        figures = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        self.say(
            f"eval at step {step}: {figures}  mean cosine {self.last_mean_cosine:.3f}", flush=True
        )
        return metrics, embeddings

    def _unreadable(self, step: int, names: list[str]) -> None:
        if self.on_corrupt == "stop":
            raise InputError(
                f"{len(names)} evaluation image(s) of {self.source.name} cannot be read at step "
                f"{step}, although they passed the start-up check: {listed(names)}. Fix them "
                "and run the same command, or set verify_images.on_corrupt='skip'."
            )
        self.say(
            f"eval at step {step}: unreadable image(s) {listed(names)} replaced by others of "
            "their class"
        )
