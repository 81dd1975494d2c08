"""The step's loss for a proxy loss, whose class centres are sharded over the replicas.

Each replica embeds its slice, gathers the global batch (embeddings and labels, one
all-gather whose backward pass returns each embedding's gradient to its owner), and
takes the loss of the whole batch against its own block of centres
(trainer/step/class_centres.py). The block's surrogate has, as gradient, exactly this
block's share of the global loss's gradient: summed over replicas (the optimizer does
that for the model's weights) it is the gradient one device computes, while the
centres' gradient is the owner's alone.
"""

from __future__ import annotations

import tensorflow as tf

from losses.mining import class_ids
from trainer.step.global_loss import STATS, StepResult, gather_keys
from trainer.step.grad_cache import EmbeddingPass


def proxy_loss_and_gradients(
    centres,
    replicas,
    embed,
    variables,
    inputs,
    labels,
    step,
    scale_loss=None,
    replica_rows=None,
    embedding_pass: EmbeddingPass | None = None,
) -> tuple[StepResult, tf.Tensor]:
    """Runs inside `Replicas.run`: (the model's gradients, loss and STATS; this replica's
    centre gradient). `scale_loss` (a loss-scale optimizer's) scales what is
    differentiated; the centre gradient comes back unscaled. `embedding_pass`: as in
    `trainer.step.global_loss.loss_and_gradients`."""
    shard = centres.variable()
    passes = embedding_pass or EmbeddingPass()
    with tf.GradientTape() as tape:
        embeddings = passes.embeddings(embed, tape, inputs)
        keys, key_labels = _global_batch(replicas, embeddings, labels, replica_rows)
        block = centres.block(keys, key_labels, step)
        target = block.surrogate if scale_loss is None else scale_loss(block.surrogate)
    *grads, centre_grad = passes.gradient(tape, target, variables, [shard])
    if scale_loss is not None:
        centre_grad = tf.convert_to_tensor(centre_grad) / scale_loss(tf.constant(1.0))
    stats = _statistics(block.value, keys)
    return StepResult(grads=grads, loss=block.value, stats=stats, terms=None), centre_grad


def proxy_loss_and_statistics(centres, replicas, embeddings, labels, replica_rows=None):
    """The forward half, for evaluation: the global loss of these embeddings (every
    centre takes part, whatever the sample rate) and its STATS."""
    keys, key_labels = _global_batch(replicas, embeddings, labels, replica_rows)
    value = centres.block(keys, key_labels, step=None).value
    return value, _statistics(value, keys)


def _global_batch(replicas, embeddings, labels, replica_rows):
    """Every replica's embeddings (float32) and int32 labels, in replica order (one
    all-gather, which returns each embedding's gradient to its owner)."""
    embeddings = tf.cast(embeddings, tf.float32)
    labels = tf.cast(class_ids(labels), tf.int32)
    me = tf.cast(replicas.replica_index(), tf.int32)
    no_carrier = tf.zeros([tf.shape(embeddings)[0], 0])
    keys, key_labels, _, _ = gather_keys(replicas, embeddings, labels, me, no_carrier, replica_rows)
    return keys, key_labels


def _statistics(value, keys) -> dict:
    """STATS of a proxy loss: its value and the embeddings' norms (no pairs or triplets)."""
    stats = {name: tf.constant(0.0) for name in STATS}
    stats.update(
        loss_sum=value,
        count=tf.constant(1.0),
        norm_sum=tf.reduce_sum(tf.norm(tf.stop_gradient(keys), axis=1)),
        rows=tf.cast(tf.shape(keys)[0], tf.float32),
    )
    return stats
