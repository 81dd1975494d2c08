"""`GlobalMiningModel.fit` on fixed global batches: one device vs replicas.

Shared by the in-process MirroredStrategy tests and the worker script that runs under
horovodrun or as a MultiWorkerMirroredStrategy worker (tests/fit_worker.py).
"""

import contextlib
import functools

import keras
import numpy as np
import tensorflow as tf

import losses
from trainer.fit import GlobalMiningModel

GLOBAL_BATCH, STEPS, DIM = 32, 3, 6
MINED_LOSSES = {
    "semihard": lambda: losses.TripletSemiHardLoss(margin=0.5),
    "hard": lambda: losses.TripletHardLoss(margin=0.5),
    "batch_all": lambda: losses.TripletBatchAllLoss(margin=0.5),
    # A loss of two means: its normalizers are summed over replicas before the backward pass.
    "contrastive": lambda: losses.ContrastiveLoss(pos_margin=0.1, neg_margin=1.5),
}


@functools.cache
def mirrored_strategy(count):
    """A plain MirroredStrategy over `count` logical CPUs, as a user builds one; one per
    count for the session, each with its own collective keys (see cross_replica_case)."""
    tf.distribute.MirroredStrategy._collective_key_base = 1000 * count + 500
    devices = [d.name for d in tf.config.list_logical_devices("CPU")[:count]]
    return tf.distribute.MirroredStrategy(devices)


def batches(seed=0):
    """STEPS global batches of GLOBAL_BATCH rows, 8 classes of 4 per batch: x, y (int)."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([rng.permutation(np.arange(GLOBAL_BATCH) % 8) for _ in range(STEPS)])
    x = rng.normal(size=(STEPS * GLOBAL_BATCH, DIM)).astype(np.float32) + labels[:, None] % 3
    return x, labels.astype(np.int64)


def worker_slice(array, worker, workers):
    """This worker's contiguous rows of every global batch (what each Horovod worker feeds)."""
    per = GLOBAL_BATCH // workers
    steps = array.reshape(STEPS, GLOBAL_BATCH, *array.shape[1:])
    return steps[:, worker * per : (worker + 1) * per].reshape(-1, *array.shape[1:])


def embedding_net(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((DIM,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(8)]
    )


def fitted(
    loss_name,
    strategy=None,
    cross_replica_mining=True,
    seed=0,
    x=None,
    y=None,
    jit="auto",
    embedding_chunk_size=None,
    **fit,
):
    """A GlobalMiningModel (built in `strategy`'s scope, if any) after fit on `x, y`
    (the batches, in order, by default); returns the model and its History."""
    if x is None:
        x, y = batches()
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = GlobalMiningModel(
            embedding_net(seed),
            cross_replica_mining=cross_replica_mining,
            embedding_chunk_size=embedding_chunk_size,
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.5), loss=MINED_LOSSES[loss_name](), jit_compile=jit
        )
    fit = {"batch_size": GLOBAL_BATCH, "epochs": 1, "shuffle": False, "verbose": 0, **fit}
    history = model.fit(x, y, **fit)
    return model, history


def relative_difference(a_weights, b_weights) -> float:
    """The largest difference between two lists of weights, relative to the largest
    weight (not per array: the last bias of a triplet-trained net stays near 0, since a
    shift of every embedding leaves all distances unchanged)."""
    a = np.concatenate([np.ravel(w) for w in a_weights])
    b = np.concatenate([np.ravel(w) for w in b_weights])
    return float(np.abs(a - b).max() / np.abs(a).max())
