"""Run under horovodrun -np 2: row 20 of 24 (rank 1's slice) makes a NaN gradient while
the loss stays finite; every rank prints whether its weights and step counter stayed."""

import keras
import numpy as np

import losses
from tests.cross_replica_case import global_batch
from tests.test_numerics import gated_model
from trainer.backends.replicas import make_replicas
from trainer.step.train_step import TrainStep

replicas = make_replicas("horovod")
x, labels = global_batch()
x[20, 0] = 0.0
model = gated_model()
optimizer = keras.optimizers.Adam(0.1)
step = TrainStep(model, optimizer, losses.TripletSemiHardLoss(margin=0.5), replicas)
before = [v.numpy().copy() for v in model.variables]
metrics = step(x, labels)
unchanged = all(np.array_equal(v.numpy(), b) for v, b in zip(model.variables, before, strict=True))
print(
    f"RANK {replicas.rank} finite_gradients={metrics['finite_gradients']} "
    f"unchanged={unchanged} iterations={int(optimizer.iterations.numpy())}",
    flush=True,
)
