"""Retrieval evaluation on held-out classes: Recall@k and MAP@R by exact nearest neighbours.

Every evaluation example queries all the others (itself excluded). Recall@k: the share
of queries with at least one same-class example among their k nearest. MAP@R
(Musgrave et al., "A Metric Learning Reality Check", 2020): with R the number of other
examples of the query's class, the mean over queries of
(1/R) · Σ_{i ≤ R} P@i · [rank i is relevant].
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from data.pipeline import eval_batches
from losses import pairwise_distances


def retrieval_metrics(embeddings, labels, ks=(1,), distance="cosine", chunk=1024) -> dict:
    """{'recall@k': ..., 'map@r': ...} of `embeddings` (N, D) with `labels` (N,).

    Exact: all N² distances, computed `chunk` queries at a time, so memory stays at
    chunk × N. Ties in distance are broken by index.
    """
    embeddings = np.asarray(embeddings, np.float32)
    labels = np.asarray(labels)
    n = len(labels)
    if n < 2:
        raise ValueError(f"Retrieval needs at least 2 evaluation examples, got {n}.")
    r = (labels[:, None] == labels[None, :]).sum(axis=1) - 1
    max_r = int(r.max())
    depth = max(max_r, *ks)
    keys = tf.constant(embeddings)
    relevant_top = np.zeros((n, min(depth, n - 1)), bool)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        d = pairwise_distances(keys[start:stop], keys, distance).numpy()
        d[np.arange(stop - start), np.arange(start, stop)] = np.inf  # not itself
        order = np.argsort(d, axis=1, kind="stable")[:, : relevant_top.shape[1]]
        relevant_top[start:stop] = labels[order] == labels[start:stop, None]
    metrics = {f"recall@{k}": float(relevant_top[:, :k].any(axis=1).mean()) for k in ks}
    ranks = np.arange(1, relevant_top.shape[1] + 1)
    precision = np.cumsum(relevant_top, axis=1) / ranks
    within_r = ranks[None, :] <= r[:, None]
    ap = (precision * relevant_top * within_r).sum(axis=1) / np.maximum(r, 1)
    metrics["map@r"] = float(ap[r > 0].mean()) if (r > 0).any() else 0.0
    return metrics


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
    all-gather the embeddings of every replica, in replica order."""

    @tf.function
    def embed_and_gather(images, replica_rows):
        embeddings = tf.cast(model(images, training=False), tf.float32)
        return replicas.all_gather(embeddings, replica_rows)

    return embed_and_gather


def embed_source(embed_and_gather, replicas, source, chunk_size: int = 512) -> np.ndarray:
    """Embeddings of a whole evaluation source, in order, on every process.

    Each replica embeds its slice of each chunk and the slices are all-gathered
    (`embedding_function`), so the work is sharded and every process ends with all rows.
    """
    chunks = eval_chunks(len(source), chunk_size, replicas.size)
    my_rows = [_process_rows_of_chunk(replicas, start, end) for start, end in chunks]
    parts = []
    for (start, end), (images, _) in zip(chunks, eval_batches(source, my_rows), strict=True):
        distributed = replicas.distribute(images, global_size=end - start)
        layout = {"replica_rows": replicas.replica_rows(end - start)}
        gathered = replicas.run(embed_and_gather, distributed, layout)
        parts.append(np.asarray(replicas.local_results(gathered)[0]))
    return np.concatenate(parts)


def _process_rows_of_chunk(replicas, start: int, end: int) -> tuple[int, int]:
    """This process's rows of the chunk [start, end), as absolute indices."""
    first, last = replicas.process_rows(end - start)
    return start + first, start + last
