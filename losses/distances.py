"""Pairwise distances between query and key embeddings, always in float32.

Every loss in this package works in query/key form: a set of anchors (queries) is
compared with a set of keys. On one device keys == queries; across replicas the keys
are the gathered global batch. Distances are computed in float32 even under mixed
precision, and their gradients stay finite where two embeddings coincide (common in
P×K batches) and for zero vectors under the cosine distance.
"""

from __future__ import annotations

import tensorflow as tf

EUCLIDEAN = "euclidean"
SQUARED_EUCLIDEAN = "squared_euclidean"
COSINE = "cosine"
DISTANCES = (EUCLIDEAN, SQUARED_EUCLIDEAN, COSINE)
# TensorFlow Addons' names, accepted so that Addons configs keep working.
ALIASES = {"L2": EUCLIDEAN, "squared-L2": SQUARED_EUCLIDEAN, "angular": COSINE}


def canonical_distance(name) -> str:
    """Returns the canonical name of a distance, resolving Addons' aliases."""
    if isinstance(name, str):
        if name in DISTANCES:
            return name
        if name in ALIASES:
            return ALIASES[name]
    valid = ", ".join(repr(n) for n in DISTANCES + tuple(ALIASES))
    raise ValueError(f"Unknown distance {name!r}; valid names are {valid}.")


def as_float32_embeddings(embeddings, name: str = "embeddings") -> tf.Tensor:
    """Converts embeddings to a float32 (B, D) tensor, with a clear error otherwise."""
    embeddings = tf.convert_to_tensor(embeddings)
    if not embeddings.dtype.is_floating:
        raise TypeError(f"`{name}` must be floating point, got dtype {embeddings.dtype.name}.")
    if embeddings.shape.rank is not None and embeddings.shape.rank != 2:
        raise ValueError(f"`{name}` must be 2-D (batch, dim), got shape {embeddings.shape}.")
    return tf.cast(embeddings, tf.float32)


def _safe_sqrt(squared: tf.Tensor) -> tf.Tensor:
    """sqrt that is 0 with a 0 gradient where the argument is <= 0 (coinciding points)."""
    positive = squared > 0.0
    return tf.where(positive, tf.sqrt(tf.where(positive, squared, 1.0)), 0.0)


def pairwise_distances(queries, keys, distance: str = EUCLIDEAN) -> tf.Tensor:
    """(Q, D) x (K, D) -> (Q, K) float32 matrix of distances between every query and key."""
    distance = canonical_distance(distance)
    queries = as_float32_embeddings(queries, "queries")
    keys = as_float32_embeddings(keys, "keys")
    if distance == COSINE:
        similarity = tf.matmul(
            tf.math.l2_normalize(queries, axis=1),
            tf.math.l2_normalize(keys, axis=1),
            transpose_b=True,
        )
        return tf.maximum(1.0 - similarity, 0.0)
    squared = (
        tf.reduce_sum(tf.square(queries), axis=1, keepdims=True)
        + tf.reduce_sum(tf.square(keys), axis=1)[tf.newaxis, :]
        - 2.0 * tf.matmul(queries, keys, transpose_b=True)
    )
    squared = tf.maximum(squared, 0.0)
    if distance == SQUARED_EUCLIDEAN:
        return squared
    return _safe_sqrt(squared)


def paired_distances(a, b, distance: str = EUCLIDEAN) -> tf.Tensor:
    """Row-wise distances between a (..., D) and b (..., D), broadcasting leading axes."""
    distance = canonical_distance(distance)
    a = tf.cast(a, tf.float32)
    b = tf.cast(b, tf.float32)
    if distance == COSINE:
        similarity = tf.reduce_sum(
            tf.math.l2_normalize(a, axis=-1) * tf.math.l2_normalize(b, axis=-1), axis=-1
        )
        return tf.maximum(1.0 - similarity, 0.0)
    squared = tf.reduce_sum(tf.square(a - b), axis=-1)
    if distance == SQUARED_EUCLIDEAN:
        return squared
    return _safe_sqrt(squared)
