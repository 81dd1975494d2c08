"""The loss of the global batch, computed by each replica for its own anchors.

With N replicas each holding b examples, every replica gathers the N·b embeddings and
labels of the step (the keys), mines its own b anchors against them (b × N·b work), and
takes the gradient of its own loss *sum*. One all-reduce then gives the global
normalizer (positive pairs, anchors or non-zero triplets) together with the metrics,
and each replica divides its gradients by it. Summed over replicas (the optimizer does
that) this is exactly the gradient of the loss one device computes on the concatenated
batch: the all-gather sends each key's gradient back to the replica that owns the
embedding (see `Replicas.all_gather`). Dividing after the backward pass, rather than
before it, saves a collective per step.

With `cross_replica_mining=False` each replica mines only its own slice and the global
loss is the mean of the replicas' losses (the usual data-parallel average).
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from trainer.replicas import Replicas

# Summed over replicas in the step's one all-reduce.
STATS = (
    "loss_sum",  # sum of the loss terms (global mining)
    "count",  # the normalizer's part of this replica
    "replica_mean",  # this replica's own normalized loss / N (local mining)
    "active",  # terms with a positive loss
    "terms",  # all terms
    "remote_negatives",  # chosen negatives owned by another replica
    "chosen_negatives",  # terms that chose a negative
    "norm_sum",  # sum of embedding L2 norms
    "rows",  # examples
    "positive_distance_sum",  # anchor-positive distances of the terms
    "positive_pairs",
    "negative_distance_sum",  # anchor-negative distances of the chosen negatives
    "negative_pairs",
)


class StepResult(NamedTuple):
    """One replica's gradients (their sum over replicas is the global gradient), the
    global metrics (identical on every replica) and this replica's own terms."""

    grads: list
    loss: tf.Tensor
    stats: dict
    terms: object  # losses.TripletTerms of this replica's anchors


def loss_and_gradients(
    loss,
    replicas: Replicas,
    embed,
    variables,
    inputs,
    labels,
    cross_replica_mining=True,
    scale_loss=None,
) -> StepResult:
    """Runs inside `Replicas.run`: embeds this replica's slice, mines, differentiates.

    `loss` is one of the Keras loss classes of `losses` (it provides `terms`); `embed`
    maps inputs to embeddings (the model in training mode). `scale_loss` (mixed float16:
    the loss-scale optimizer's) scales what is differentiated; the optimizer unscales.
    """
    with tf.GradientTape() as tape:
        embeddings = tf.cast(embed(inputs), tf.float32)  # mining is float32 anyway
        terms, owner, me = _mine(loss, replicas, embeddings, labels, cross_replica_mining)
        target = terms.loss_sum if scale_loss is None else scale_loss(terms.loss_sum)
    grads = tape.gradient(target, variables)
    chosen = terms.negative_index[terms.negative_index >= 0]
    local = {
        "loss_sum": terms.loss_sum,
        "count": terms.count,
        "replica_mean": tf.math.divide_no_nan(terms.loss_sum, terms.count) / replicas.size,
        "active": terms.num_active,
        "terms": terms.num_terms,
        "remote_negatives": tf.reduce_sum(tf.cast(tf.gather(owner, chosen) != me, tf.float32)),
        "chosen_negatives": tf.cast(tf.size(chosen), tf.float32),
        "norm_sum": tf.reduce_sum(tf.norm(embeddings, axis=1)),
        "rows": tf.cast(tf.shape(embeddings)[0], tf.float32),
        "positive_distance_sum": tf.reduce_sum(terms.positive_distances),
        "positive_pairs": tf.cast(tf.size(terms.positive_distances), tf.float32),
        "negative_distance_sum": tf.reduce_sum(terms.negative_distances),
        "negative_pairs": tf.cast(tf.size(terms.negative_distances), tf.float32),
    }
    summed = tf.unstack(replicas.all_reduce_sum(tf.stack([local[k] for k in STATS])))
    stats = dict(zip(STATS, summed, strict=True))
    if cross_replica_mining:
        normalizer, value = stats["count"], tf.math.divide_no_nan(stats["loss_sum"], stats["count"])
    else:
        normalizer, value = terms.count * replicas.size, stats["replica_mean"]
    # A zero normalizer means every term is 0, and so is every gradient: divide by 1.
    normalizer = tf.maximum(normalizer, 1.0)
    grads = [None if g is None else g / tf.cast(normalizer, g.dtype) for g in grads]
    return StepResult(grads=grads, loss=value, stats=stats, terms=terms)


def _mine(loss, replicas: Replicas, embeddings, labels, cross_replica_mining):
    """This replica's anchors against the keys: the terms, each key's owner, our index."""
    labels = tf.cast(labels, tf.int32)
    local_rows = tf.shape(embeddings)[0]
    me = tf.cast(replicas.replica_index(), tf.int32)
    if cross_replica_mining:
        keys, key_labels, owner = _gather_keys(replicas, embeddings, labels, me)
        # Replicas may hold different row counts (a short last batch): our first row
        # among the keys is the number of rows owned by lower-indexed replicas.
        first = tf.reduce_sum(tf.cast(owner < me, tf.int32))
    else:
        keys, key_labels, first = embeddings, labels, tf.constant(0)
        owner = tf.fill([local_rows], me)
    positions = first + tf.range(local_rows)
    return loss.terms(embeddings, labels, positions, keys, key_labels), owner, me


def _gather_keys(replicas: Replicas, embeddings, labels, me):
    """All replicas' embeddings, labels and owner indices, in one all-gather.

    Labels and the owner's replica index ride along as two extra columns, bit-cast to
    float32 (a gather only moves bytes, so any int32 survives): one collective per step
    instead of three. Only the embedding columns receive gradients.
    """
    meta = tf.stack([labels, tf.fill(tf.shape(labels), me)], axis=1)
    packed = tf.concat([embeddings, tf.bitcast(meta, tf.float32)], axis=1)
    gathered = replicas.all_gather(packed)
    key_meta = tf.bitcast(tf.stop_gradient(gathered[:, -2:]), tf.int32)
    return gathered[:, :-2], key_meta[:, 0], key_meta[:, 1]
