"""A few training steps of a small model with a proxy loss, its centres sharded over the
replicas: shared by the MirroredStrategy tests and the Horovod worker script, so both
are compared with the same single-device run."""

import numpy as np

import losses
from tests.cross_replica_case import build_model, global_batch
from trainer.backends.replicas import Replicas
from trainer.step.class_centres import ShardedCentres
from trainer.step.train_step import TrainStep

CLASSES, STEPS = 7, 3
LOSSES = {
    "proxy_nca": lambda **kw: losses.ProxyNCALoss(softmax_scale=4.0, **kw),
    "proxy_anchor": lambda **kw: losses.ProxyAnchorLoss(**kw),
    "arcface": lambda **kw: losses.ArcFaceLoss(scale=16.0, **kw),
    "cosface": lambda **kw: losses.CosFaceLoss(scale=16.0, **kw),
    "subcenter_arcface": lambda **kw: losses.SubCenterArcFaceLoss(sub_centers=2, scale=16.0, **kw),
    "arcface_partial_fc": lambda **kw: losses.ArcFaceLoss(scale=16.0, sample_rate=0.5, **kw),
}

# A digits job with ArcFace centres sharded over its replicas, for the job-level tests.
PROXY_JOB = (
    "train.loss=@ArcFaceLoss()",
    "ArcFaceLoss.scale=16.0",
    "ArcFaceLoss.num_classes=20",  # 14 classes never in a batch: Partial FC draws among them
    "ArcFaceLoss.sample_rate=0.5",
    "optimizer.learning_rate=0.01",
    "train.steps=12",
    "train.log_every=1",
    "train.checkpoint_every=6",
    "train.eval_every=100",
    "export.enabled=False",
    "distribute.strategy='mirrored'",
)


def batches(steps=STEPS):
    """Global batches of 24 rows over classes 0-5 (class 6 never appears)."""
    return [global_batch(size=24, classes=6, seed=s) for s in range(steps)]


def train(
    replicas: Replicas, loss_name: str, optimizer: str = "adam", steps=STEPS, chunk_size=None
) -> dict:
    """`steps` steps; the losses, the model's weights and the whole centres after them.
    `chunk_size`: the step's train.embedding_chunk_size."""
    import keras

    loss = LOSSES[loss_name](seed=3)
    loss.num_classes = CLASSES
    with replicas.scope():
        model = build_model()
        opt = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}[optimizer](0.05)
    centres = ShardedCentres(loss, replicas, CLASSES, 8, optimizer, schedule=lambda _: 0.05)
    step = TrainStep(model, opt, loss, replicas, centres=centres, embedding_chunk_size=chunk_size)
    values = [step(x, labels)["loss"] for x, labels in batches(steps)]
    return {
        "losses": np.array(values),
        "weights": [np.asarray(w) for w in model.get_weights()],
        **centres.gathered(),
    }
