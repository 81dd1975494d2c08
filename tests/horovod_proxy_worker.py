"""Run under horovodrun -np 2: tests/proxy_case.py's training with the centres sharded
over the two workers, then GlobalMiningModel.fit with ArcFace (each worker feeding its
slice of every global batch); rank 0 writes the results to OUT.npz."""

import sys

import keras
import numpy as np

import losses
from tests.fit_case import GLOBAL_BATCH, batches, embedding_net, worker_slice
from tests.proxy_case import train
from trainer.backends.replicas import make_replicas
from trainer.fit import GlobalMiningModel

replicas = make_replicas("horovod")
results = {}
for name in ("arcface", "proxy_anchor", "subcenter_arcface", "arcface_partial_fc"):
    done = train(replicas, name)
    weights = done.pop("weights")
    results.update({f"{name}/{k}": v for k, v in done.items()})
    results.update({f"{name}/weight{i}": w for i, w in enumerate(weights)})

x, y = batches()
model = GlobalMiningModel(embedding_net())
model.compile(
    optimizer=keras.optimizers.Adam(0.05), loss=losses.ArcFaceLoss(num_classes=9, scale=16.0)
)
model.fit(
    worker_slice(x, replicas.rank, 2), worker_slice(y, replicas.rank, 2),
    batch_size=GLOBAL_BATCH // 2, shuffle=False, verbose=0,
)  # fmt: skip
results.update({f"fit/{k}": v for k, v in model.centres.gathered().items()})
results.update({f"fit/weight{i}": w for i, w in enumerate(model.get_weights())})
if replicas.rank == 0:
    np.savez(sys.argv[1], **results)
