"""Run under horovodrun: one replicated step per loss; rank 0 writes the numbers.

horovodrun -np N python -m tests.horovod_worker OUT.npz [LOSS,LOSS,...] [CHUNK]
(default: every loss of tests.cross_replica_case.LOSSES; CHUNK: the rows each worker
embeds at a time, GradCache)
"""

import sys

import numpy as np

from tests.cross_replica_case import LOSSES, build_model, global_batch, replicated_step, row_modes
from trainer.backends.replicas import make_replicas


def main(out, names=None, chunk=None):
    replicas = make_replicas("horovod")
    x, labels = global_batch()
    weights = build_model(x.shape[1]).get_weights()
    if replicas.rank != 0:  # start from different weights: broadcast must fix them
        weights = [w + 1.0 for w in weights]
    results = {}
    for name in names.split(",") if names else LOSSES:
        make_loss = LOSSES[name]
        for known_rows in row_modes(name):  # row counts exchanged, or given by the trainer
            loss_value, grads, _ = replicated_step(
                replicas,
                make_loss(),
                weights,
                x,
                labels,
                known_rows=known_rows,
                embedding_chunk_size=int(chunk) if chunk else None,
            )
            key = f"{name}/{'known' if known_rows else 'exchanged'}"
            results[f"{key}/loss"] = np.array(loss_value)
            for i, g in enumerate(grads):
                results[f"{key}/grad{i}"] = g
    if replicas.rank == 0:
        np.savez(out, size=replicas.size, **results)
        print(f"wrote {out} from {replicas.size} workers")


if __name__ == "__main__":
    main(*sys.argv[1:])
