"""The loss of the global batch, computed by each replica for its own anchors.

With N replicas each holding b examples, every replica gathers the N·b embeddings and
labels of the step (the keys), mines its own b anchors against them (b × N·b work), and
divides its loss sum by the all-reduced global normalizer. The replicas' shares then
add up to exactly the loss one device would compute on the concatenated batch, and so
do the gradients: the all-gather sends each key's gradient back to the replica that
owns the embedding (see `Replicas.all_gather`), and the optimizer sums over replicas.

With `cross_replica_mining=False` each replica mines only its own slice and the shares
are the per-replica losses divided by N (the usual data-parallel average).
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from losses.triplet import TripletTerms
from trainer.replicas import Replicas


class ReplicaLoss(NamedTuple):
    """What one replica computes in a step."""

    share: tf.Tensor  # differentiable; the sum over replicas is the global loss
    terms: TripletTerms  # this replica's anchors only
    global_count: tf.Tensor  # the normalizer, all-reduced
    cross_replica_negatives: tf.Tensor  # chosen negatives owned by another replica
    chosen_negatives: tf.Tensor  # chosen negatives (terms that chose one)


def replica_loss(
    loss, replicas: Replicas, embeddings, labels, cross_replica_mining: bool = True
) -> ReplicaLoss:
    """This replica's share of the global loss (call inside `Replicas.run`).

    `loss` is one of the Keras loss classes of `losses` (it provides `terms`).
    """
    embeddings = tf.convert_to_tensor(embeddings)
    labels = tf.convert_to_tensor(labels)
    local_rows = tf.shape(embeddings)[0]
    if cross_replica_mining:
        keys = replicas.all_gather(embeddings)
        key_labels = replicas.all_gather(labels)
        # Replicas may hold different row counts (a short last batch): find our offset.
        rows = replicas.all_gather(local_rows[tf.newaxis])
        first = tf.reduce_sum(rows[: replicas.replica_index()])
    else:
        keys, key_labels, first = embeddings, labels, tf.constant(0)
    positions = first + tf.range(local_rows)
    terms = loss.terms(embeddings, labels, positions, keys, key_labels)
    if cross_replica_mining:
        global_count = replicas.all_reduce_sum(terms.count)
        share = tf.math.divide_no_nan(terms.loss_sum, global_count)
    else:
        global_count = terms.count
        share = tf.math.divide_no_nan(terms.loss_sum, terms.count) / replicas.size
    chosen = terms.negative_index[terms.negative_index >= 0]
    remote = (chosen < first) | (chosen >= first + local_rows)
    return ReplicaLoss(
        share=share,
        terms=terms,
        global_count=global_count,
        cross_replica_negatives=tf.reduce_sum(tf.cast(remote, tf.float32)),
        chosen_negatives=tf.cast(tf.size(chosen), tf.float32),
    )
