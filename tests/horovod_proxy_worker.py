"""Run under horovodrun -np 2: tests/proxy_case.py's training with the centres sharded
over the two workers; rank 0 writes the results to OUT.npz."""

import sys

import numpy as np

from tests.proxy_case import train
from trainer.replicas import make_replicas

replicas = make_replicas("horovod")
results = {}
for name in ("arcface", "proxy_anchor", "subcenter_arcface", "arcface_partial_fc"):
    done = train(replicas, name)
    weights = done.pop("weights")
    results.update({f"{name}/{k}": v for k, v in done.items()})
    results.update({f"{name}/weight{i}": w for i, w in enumerate(weights)})
if replicas.rank == 0:
    np.savez(sys.argv[1], **results)
