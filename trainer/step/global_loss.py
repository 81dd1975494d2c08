"""The loss of the global batch, computed by each replica for its own anchors.

With N replicas each holding b examples, every replica gathers the N·b embeddings and
labels of the step (the keys), mines its own b anchors against them (b × N·b work), and
takes the gradient of its own loss *sum*. The gather's backward pass sums each key's
gradient over replicas and hands it to the replica that owns the embedding (see
`Replicas.all_gather`); the same summing pass brings back the global normalizer
(positive pairs, anchors or non-zero triplets) and the step's metrics, which ride in
extra "carrier" columns of the gather. Each replica then divides its gradients by the
normalizer. Summed over replicas (the optimizer does that) this is exactly the gradient
of the loss one device computes on the concatenated batch. Global mining thus costs one
collective each way and nothing more: dividing after the backward pass, and carrying
the statistics on it, saves the separate all-reduces.

With `cross_replica_mining=False` each replica mines only its own slice and the global
loss is the mean of the replicas' losses (the usual data-parallel average); the
statistics then take one all-reduce.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from losses.mining import class_ids
from losses.tiles import tile_rows, tiled_terms
from trainer.backends.replicas import Replicas
from trainer.step.grad_cache import EmbeddingPass

# The mining's (anchors × keys) arrays of one replica are computed in anchor tiles that
# fit this (train.mining_memory_mb; see losses/tiles.py).
MINING_BUDGET_BYTES = 256 * 2**20

# Summed over replicas each step (in the gather's backward pass, or one all-reduce).
STATS = (
    "loss_sum",  # sum of the loss terms (global mining)
    "count",  # the normalizer's part of this replica
    "replica_mean",  # this replica's own normalized loss / N (local mining)
    "active",  # terms with a positive loss
    "terms",  # all terms
    "remote_negatives",  # chosen negatives owned by another replica
    "chosen_negatives",  # terms that chose a negative
    "memory_negatives",  # chosen negatives from the cross-batch memory
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
    replica_rows=None,
    memory=None,
    embedding_pass: EmbeddingPass | None = None,
    mining_budget_bytes: int = MINING_BUDGET_BYTES,
) -> StepResult:
    """Runs inside `Replicas.run`: embeds this replica's slice, mines, differentiates.

    `loss` is one of the Keras loss classes of `losses` (it provides `terms`); `embed`
    maps inputs to embeddings (the model in training mode). `scale_loss` (mixed float16:
    the loss-scale optimizer's) scales what is differentiated; the optimizer unscales.
    `replica_rows` (rows held by each replica, in order; a Python tuple) lets the
    backend gather without first exchanging the row counts. `memory` (a
    trainer.step.key_memory.KeyMemory) adds past global batches to the keys, and takes this one.
    `embedding_pass` (trainer.step.grad_cache) embeds the slice whole (the default) or in
    chunks, and takes the gradient through it. `mining_budget_bytes` bounds the
    mining's arrays: it runs in anchor tiles that fit (losses/tiles.py).
    """
    passes = embedding_pass or EmbeddingPass()
    with tf.GradientTape() as tape:
        embeddings = passes.embeddings(embed, tape, inputs)  # float32: so is the mining
        carrier = None
        if cross_replica_mining:
            carrier = tf.zeros([tf.shape(embeddings)[0], len(STATS)])
            tape.watch(carrier)
        mined = _mine(
            loss, replicas, embeddings, labels, carrier, replica_rows, memory, mining_budget_bytes
        )
        terms = _parts_normalized(mined, replicas, cross_replica_mining)
        local = tf.stop_gradient(_local_stats(terms, mined, embeddings, replicas.size))
        target = terms.loss_sum if scale_loss is None else scale_loss(terms.loss_sum)
        if mined.carrier is not None:
            # The gathered carrier columns are zeros, so this adds nothing to the value;
            # their gradient is `local` in every row, which the gather's backward
            # all-reduce sums over replicas: the global statistics arrive with the key
            # gradients, without a collective of their own.
            target += tf.reduce_sum(mined.carrier_keys * local)
    if mined.carrier is None:
        summed = replicas.all_reduce_sum(local)
        # Collectives must run in the same order on every replica, and nothing else
        # orders this one before the optimizer's all-reduce of the gradients.
        grads = passes.gradient(tape, target, variables)
        with tf.control_dependencies([summed]):
            grads = [None if g is None else tf.identity(g) for g in grads]
    else:
        *grads, carrier_grad = passes.gradient(tape, target, variables, [mined.carrier])
        summed = carrier_grad[0]
    stats = dict(zip(STATS, tf.unstack(summed), strict=True))
    value = _loss_value(stats, cross_replica_mining)
    normalizer = stats["count"] if cross_replica_mining else terms.count * replicas.size
    # A zero normalizer means every term is 0, and so is every gradient: divide by 1.
    normalizer = tf.maximum(normalizer, 1.0)
    grads = [None if g is None else g / tf.cast(normalizer, g.dtype) for g in grads]
    return StepResult(grads=grads, loss=value, stats=stats, terms=terms)


def loss_and_statistics(
    loss, replicas: Replicas, embeddings, labels, cross_replica_mining=True, replica_rows=None
):
    """The forward half of `loss_and_gradients`, for evaluation: the global loss of
    these embeddings and the summed STATS (one gather and one all-reduce)."""
    embeddings = tf.cast(embeddings, tf.float32)
    # No statistics ride on the gather when nothing flows back: a zero-width carrier.
    carrier = tf.zeros([tf.shape(embeddings)[0], 0]) if cross_replica_mining else None
    mined = _mine(loss, replicas, embeddings, labels, carrier, replica_rows)
    terms = _parts_normalized(mined, replicas, cross_replica_mining)
    local = _local_stats(terms, mined, embeddings, replicas.size)
    stats = dict(zip(STATS, tf.unstack(replicas.all_reduce_sum(local)), strict=True))
    return _loss_value(stats, cross_replica_mining), stats


def _loss_value(stats: dict, cross_replica_mining: bool) -> tf.Tensor:
    """The global loss from the summed STATS: the loss sum over the global normalizer,
    or with per-replica mining the mean of the replicas' own losses."""
    if cross_replica_mining:
        return tf.math.divide_no_nan(stats["loss_sum"], stats["count"])
    return stats["replica_mean"]


class Mined(NamedTuple):
    terms: object  # losses.TripletTerms of this replica's anchors
    owner: tf.Tensor  # (keys,) int32: the replica that owns each key (-1: the memory)
    me: tf.Tensor  # this replica's index
    carrier: tf.Tensor | None  # (rows, len(STATS)) zeros this replica sent along
    carrier_keys: tf.Tensor | None  # (keys, len(STATS)) the gathered carrier columns


def _parts_normalized(mined: Mined, replicas: Replicas, cross_replica_mining: bool):
    """The terms of a loss made of several means (their own normalizers, such as the
    contrastive loss's positive and negative pairs), normalized before differentiating.

    The parts' counts are summed over replicas first (one small all-reduce, only for
    such losses), then loss_sum is this replica's share of the global loss itself, and
    the global normalizer is 1: held by replica 0 alone, so that it sums to 1. With
    per-replica mining each replica normalizes by its own counts. Other losses pass.
    """
    terms = mined.terms
    if terms.part_sums is None:
        return terms
    counts = terms.part_counts
    if cross_replica_mining:
        counts = replicas.all_reduce_sum(counts)
    # A part with no non-zero term has a zero sum: dividing it by 1 keeps it 0.
    loss_sum = tf.reduce_sum(terms.part_sums / tf.maximum(counts, 1.0))
    count = tf.cast(tf.equal(mined.me, 0), tf.float32) if cross_replica_mining else 1.0
    return terms._replace(loss_sum=loss_sum, count=tf.convert_to_tensor(count))


def _local_stats(terms, mined: Mined, embeddings, num_replicas) -> tf.Tensor:
    """This replica's share of every entry of STATS, as one vector."""
    chosen = terms.negative_index[terms.negative_index >= 0]
    chosen_owner = tf.gather(mined.owner, chosen)
    remote = tf.cast((chosen_owner != mined.me) & (chosen_owner >= 0), tf.float32)
    local = {
        "loss_sum": terms.loss_sum,
        "count": terms.count,
        "replica_mean": tf.math.divide_no_nan(terms.loss_sum, terms.count) / num_replicas,
        "active": terms.num_active,
        "terms": terms.num_terms,
        "remote_negatives": tf.reduce_sum(remote),
        "chosen_negatives": tf.cast(tf.size(chosen), tf.float32),
        "memory_negatives": tf.reduce_sum(tf.cast(chosen_owner < 0, tf.float32)),
        "norm_sum": tf.reduce_sum(tf.norm(embeddings, axis=1)),
        "rows": tf.cast(tf.shape(embeddings)[0], tf.float32),
        "positive_distance_sum": tf.reduce_sum(terms.positive_distances),
        "positive_pairs": tf.cast(tf.size(terms.positive_distances), tf.float32),
        "negative_distance_sum": tf.reduce_sum(terms.negative_distances),
        "negative_pairs": tf.cast(tf.size(terms.negative_distances), tf.float32),
    }
    return tf.stack([tf.cast(local[k], tf.float32) for k in STATS])


def _mine(
    loss,
    replicas: Replicas,
    embeddings,
    labels,
    carrier,
    replica_rows,
    memory=None,
    budget_bytes=MINING_BUDGET_BYTES,
):
    """This replica's anchors against the keys: all replicas' rows (gathered with the
    `carrier` columns) then the memory's, or with `carrier=None` its own rows only; in
    anchor tiles whose arrays fit `budget_bytes`."""

    def terms(positions, keys, key_labels):
        rows = tile_rows(keys.shape[0], budget_bytes)
        return tiled_terms(loss.terms, embeddings, labels, positions, keys, key_labels, rows)

    labels = tf.cast(class_ids(labels), tf.int32)  # fit may hand over float labels
    local_rows = tf.shape(embeddings)[0]
    me = tf.cast(replicas.replica_index(), tf.int32)
    if carrier is None:
        mined = terms(tf.range(local_rows), embeddings, labels)
        return Mined(mined, tf.fill([local_rows], me), me, None, None)
    keys, key_labels, owner, carrier_keys = gather_keys(
        replicas, embeddings, labels, me, carrier, replica_rows
    )
    # Replicas may hold different row counts (a short last batch): our first row among
    # the keys is the number of rows owned by lower-indexed replicas.
    first = tf.reduce_sum(tf.cast(owner < me, tf.int32))
    positions = first + tf.range(local_rows)
    if memory is not None:
        past, past_labels = memory.keys()  # read before this batch is pushed
        memory.push(keys, key_labels)
        keys = tf.concat([keys, past], axis=0)
        key_labels = tf.concat([key_labels, past_labels], axis=0)
        owner = tf.concat([owner, -tf.ones_like(past_labels)], axis=0)
    return Mined(terms(positions, keys, key_labels), owner, me, carrier, carrier_keys)


def gather_keys(replicas: Replicas, embeddings, labels, me, carrier, replica_rows):
    """All replicas' embeddings, labels, owners and carrier columns, in one all-gather.

    Labels and the owner's replica index ride along as three float32 columns (the
    label's high and low 16 bits, and the owner), exact as floats and unchanged by a
    sum with zeros, which is how some backends gather: one collective instead of three.
    The carrier columns bring the step's statistics back in the backward pass.
    """
    bits = tf.bitcast(labels, tf.uint32)
    owner = tf.cast(tf.fill(tf.shape(labels), me), tf.uint32)
    meta = tf.cast(tf.stack([bits // 65536, bits % 65536, owner], axis=1), tf.float32)
    widths = [embeddings.shape[-1], 3, carrier.shape[-1]]
    gathered = replicas.all_gather(tf.concat([embeddings, meta, carrier], axis=1), replica_rows)
    # A split, not column slices: its gradient is one concat, where each slice's would
    # scatter into a zero tensor of the whole width (a tenth of a millisecond each on CPU).
    keys, key_meta, carrier_keys = tf.split(gathered, widths, axis=1)
    key_meta = tf.cast(tf.stop_gradient(key_meta), tf.uint32)
    key_labels = tf.bitcast(key_meta[:, 0] * 65536 + key_meta[:, 1], tf.int32)
    owners = tf.cast(key_meta[:, 2], tf.int32)
    return keys, key_labels, owners, carrier_keys
