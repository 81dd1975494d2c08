"""One step of a small model on a fixed global batch: single device vs replicas.

Shared by the MirroredStrategy tests (in-process) and the Horovod worker script (run
under horovodrun), so both compare against the same single-device numbers.
"""

import functools

import keras
import numpy as np
import tensorflow as tf

import losses
from trainer.backends.replicas import make_replicas
from trainer.step.global_loss import loss_and_gradients
from trainer.step.grad_cache import embedding_pass


@functools.cache
def mirrored(count):
    """One MirroredStrategy per replica count for the whole test session.

    A process normally holds one strategy. Tests hold several, whose collectives would
    reuse the same group keys with different group sizes; TensorFlow's own tests give
    each strategy its own key range through `_collective_key_base`, and so do we.
    """
    tf.distribute.MirroredStrategy._collective_key_base = 1000 * count
    replicas = make_replicas("mirrored", cpu_replicas=count)
    assert replicas.size == count
    return replicas


LOSSES = {
    "semihard": lambda: losses.TripletSemiHardLoss(margin=0.5),
    "hard": lambda: losses.TripletHardLoss(margin=0.5),
    "soft_hard": lambda: losses.TripletHardLoss(soft=True),
    "batch_all_nonzero": lambda: losses.TripletBatchAllLoss(margin=0.5, reduction="nonzero"),
    "batch_all_all": lambda: losses.TripletBatchAllLoss(margin=0.5, reduction="all"),
    "contrastive": lambda: losses.ContrastiveLoss(pos_margin=0.1, neg_margin=2.0),
    "multi_similarity": lambda: losses.MultiSimilarityLoss(epsilon=0.1),
    "supcon": lambda: losses.SupConLoss(temperature=0.2),
    "ntxent": lambda: losses.NTXentLoss(),
}
PAIR_LOSSES = ("contrastive", "multi_similarity", "supcon", "ntxent")


def row_modes(loss_name) -> tuple:
    """known_rows values to test: the row exchange does not depend on the loss, so the
    triplet losses try both paths and the pair-based ones the trainer's (rows known),
    which keeps the suite's time down."""
    return (True,) if loss_name in PAIR_LOSSES else (False, True)


def global_batch(size=24, classes=6, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(size) % classes).astype(np.int64)
    x = rng.normal(size=(size, dim)).astype(np.float32)
    return x, labels


def build_model(dim=6, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((dim,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(8)]
    )


def single_device_step(loss, weights, x, labels):
    model = build_model(x.shape[1])
    model.set_weights(weights)
    with tf.GradientTape() as tape:
        value = loss(labels, model(x))
    grads = tape.gradient(value, model.trainable_variables)
    return float(value), [g.numpy() for g in grads]


def replicated_step(
    replicas,
    loss,
    weights,
    x,
    labels,
    cross_replica_mining=True,
    known_rows=False,
    embedding_chunk_size=None,
    mining_budget_bytes=None,
):
    """Global loss and the gradients summed over replicas, plus the share of chosen
    negatives that came from another replica. `known_rows` passes each replica's row
    count to the gather (the trainer's path); without it the backend exchanges them.
    `embedding_chunk_size`: each replica embeds that many rows at a time (GradCache).
    `mining_budget_bytes`: the mining's anchor tiles fit it (None: the trainer's default)."""
    replica_rows = replicas.replica_rows(len(labels)) if known_rows else None
    with replicas.scope():
        model = build_model(x.shape[1])
    model.set_weights(weights)
    replicas.broadcast_variables(model.variables)

    @tf.function
    def step(local_x, local_labels):
        result = loss_and_gradients(
            loss,
            replicas,
            model,
            model.trainable_variables,
            local_x,
            local_labels,
            cross_replica_mining,
            replica_rows=replica_rows,
            embedding_pass=embedding_pass(model, embedding_chunk_size),
            **({} if mining_budget_bytes is None else {"mining_budget_bytes": mining_budget_bytes}),
        )
        remote = tf.math.divide_no_nan(
            result.stats["remote_negatives"], result.stats["chosen_negatives"]
        )
        return result.loss, replicas.sum_gradients(result.grads), remote

    value, grads, remote = replicas.run(step, replicas.split(x, labels))
    first = lambda v: replicas.local_results(v)[0]  # noqa: E731 (every replica holds the sum)
    return float(first(value)), [first(g).numpy() for g in grads], float(first(remote))
