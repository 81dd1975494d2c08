"""TensorFlow Addons 0.23's tiled semi-hard and batch-hard formulations, in plain TF.

Addons no longer imports with Keras 3, so its algorithm is restated here from its
published definition: the semi-hard search tiles the (B, B) distance matrix B times,
a (B^2, B) tensor (cubic memory). It serves two purposes: the tests check that our
losses give Addons' numbers, and bench/losses.py uses it as the speed baseline.
"""

import tensorflow as tf


def _pairwise(x, distance):
    if distance == "cosine":
        x = tf.math.l2_normalize(x, axis=1)
        return tf.maximum(1.0 - tf.matmul(x, x, transpose_b=True), 0.0)
    sq = (
        tf.reduce_sum(tf.square(x), 1, keepdims=True)
        + tf.reduce_sum(tf.square(tf.transpose(x)), 0, keepdims=True)
        - 2.0 * tf.matmul(x, x, transpose_b=True)
    )
    sq = tf.maximum(sq, 0.0)
    error = tf.cast(sq <= 0.0, tf.float32)
    d = sq if distance == "squared_euclidean" else tf.sqrt(sq + error * 1e-16)
    d = d * (1.0 - error)
    return d * (1.0 - tf.eye(tf.shape(x)[0]))


def _masked_maximum(data, mask):
    minimums = tf.reduce_min(data, 1, keepdims=True)
    return tf.reduce_max((data - minimums) * mask, 1, keepdims=True) + minimums


def _masked_minimum(data, mask):
    maximums = tf.reduce_max(data, 1, keepdims=True)
    return tf.reduce_min((data - maximums) * mask, 1, keepdims=True) + maximums


def addons_semihard(labels, x, margin=1.0, distance="euclidean"):
    x = tf.cast(x, tf.float32)
    labels = tf.reshape(labels, [-1, 1])
    pdist = _pairwise(x, distance)
    adjacency = tf.equal(labels, tf.transpose(labels))
    adjacency_not = tf.logical_not(adjacency)
    b = tf.size(labels)
    pdist_tile = tf.tile(pdist, [b, 1])
    mask = tf.logical_and(
        tf.tile(adjacency_not, [b, 1]), pdist_tile > tf.reshape(tf.transpose(pdist), [-1, 1])
    )
    mask_final = tf.transpose(
        tf.reshape(tf.reduce_sum(tf.cast(mask, tf.float32), 1, keepdims=True) > 0.0, [b, b])
    )
    adjacency_not = tf.cast(adjacency_not, tf.float32)
    mask = tf.cast(mask, tf.float32)
    outside = tf.transpose(tf.reshape(_masked_minimum(pdist_tile, mask), [b, b]))
    inside = tf.tile(_masked_maximum(pdist, adjacency_not), [1, b])
    semihard = tf.where(mask_final, outside, inside)
    loss_mat = margin + pdist - semihard
    mask_positives = tf.cast(adjacency, tf.float32) - tf.linalg.diag(tf.ones([b]))
    return tf.reduce_sum(tf.maximum(loss_mat * mask_positives, 0.0)) / tf.reduce_sum(mask_positives)


def addons_hard(labels, x, margin=1.0, soft=False, distance="euclidean"):
    x = tf.cast(x, tf.float32)
    labels = tf.reshape(labels, [-1, 1])
    pdist = _pairwise(x, distance)
    adjacency = tf.equal(labels, tf.transpose(labels))
    hard_negatives = _masked_minimum(pdist, tf.cast(tf.logical_not(adjacency), tf.float32))
    mask_positives = tf.cast(adjacency, tf.float32) - tf.linalg.diag(tf.ones([tf.size(labels)]))
    hard_positives = _masked_maximum(pdist, mask_positives)
    if soft:
        loss = tf.math.log1p(tf.exp(hard_positives - hard_negatives))
    else:
        loss = tf.maximum(hard_positives - hard_negatives + margin, 0.0)
    return tf.reduce_mean(loss)
