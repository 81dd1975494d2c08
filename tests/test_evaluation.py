"""Retrieval metrics against a loop written from the definitions; sharded embedding."""

import keras
import numpy as np
import pytest

from data.sources import digits
from tests.cross_replica_case import mirrored
from tests.reference import average_precision_at_r
from trainer.backends.replicas import Replicas
from trainer.evaluation import embed_source, embedding_function, eval_chunks, retrieval_metrics


def reference_metrics(embeddings, labels, ks, distance="cosine"):
    """Recall@k and MAP@R by plain loops (cosine or squared Euclidean distance, ties
    broken by index)."""
    x = np.asarray(embeddings, np.float64)
    if distance == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        between = lambda a, b: 1.0 - float(a @ b)  # noqa: E731
    else:
        between = lambda a, b: float(((a - b) ** 2).sum())  # noqa: E731
    n = len(labels)
    recall = {k: 0.0 for k in ks}
    average_precisions = []
    for q in range(n):
        others = [i for i in range(n) if i != q]
        distance_to = {i: between(x[q], x[i]) for i in others}
        ranked = sorted(others, key=lambda i: (distance_to[i], i))
        relevant = [labels[i] == labels[q] for i in ranked]
        for k in ks:
            recall[k] += any(relevant[:k]) / n
        r = sum(relevant)
        if r:
            average_precisions.append(average_precision_at_r(relevant, r))
    return {**{f"recall@{k}": recall[k] for k in ks}, "map@r": float(np.mean(average_precisions))}


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_equal_the_definition(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, size=60)
    embeddings = rng.normal(size=(60, 4)) + labels[:, None] * 0.4  # partly clustered
    labels[0] = 99  # a class of one: no relevant item, left out of MAP@R
    got = retrieval_metrics(embeddings, labels, ks=(1, 4, 8), chunk=16)
    expected = reference_metrics(embeddings, labels, (1, 4, 8))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert 0.0 < got["map@r"] < 1.0


def test_perfect_clusters_score_one_and_a_shuffle_scores_low():
    labels = np.repeat(np.arange(4), 10)
    centres = np.eye(4)[labels] + 1e-3 * np.random.default_rng(0).normal(size=(40, 4))
    assert retrieval_metrics(centres, labels, ks=(1,))["map@r"] == pytest.approx(1.0)
    shuffled = retrieval_metrics(centres, np.random.default_rng(1).permutation(labels))
    assert shuffled["map@r"] < 0.5


@pytest.mark.parametrize(
    "n, chunk, replicas", [(714, 512, 2), (714, 100, 4), (9, 4, 4), (5, 512, 3)]
)
def test_eval_chunks_cover_every_row_once_and_give_every_replica_rows(n, chunk, replicas):
    chunks = eval_chunks(n, chunk, replicas)
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(chunks[:-1], chunks[1:], strict=True))
    assert all(end - start >= replicas for start, end in chunks)


def test_sharded_embedding_over_replicas_equals_one_device():
    source = digits(classes=(6, 10))
    keras.utils.set_random_seed(0)
    replicas = mirrored(4)
    with replicas.scope():
        model = keras.Sequential(
            [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(5)]
        )
    expected = model(source.items).numpy()
    sharded, unread = embed_source(
        embedding_function(model, replicas), replicas, source, chunk_size=100
    )
    np.testing.assert_allclose(sharded, expected, atol=1e-5)
    assert len(unread) == 0
    single, _ = embed_source(embedding_function(model, Replicas()), Replicas(), source, 256)
    np.testing.assert_allclose(single, expected, atol=1e-5)
