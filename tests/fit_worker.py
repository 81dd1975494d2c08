"""One worker of a multi-process `GlobalMiningModel.fit`; each writes its final weights.

horovodrun -np N python -m tests.fit_worker OUT horovod          (writes OUT.<rank>.npz)
TF_CONFIG=... python -m tests.fit_worker OUT multi_worker        (one per worker)

Every worker starts from different weights (seed 100 + rank): the backend must start
them all from the chief's (seed 100). Under Horovod each worker feeds its contiguous slice of every
global batch; under MultiWorkerMirroredStrategy Keras splits the global batches.
"""

import sys

import numpy as np
import tensorflow as tf


def main(out: str, backend: str) -> None:
    if backend == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        rank, workers = strategy.cluster_resolver.task_id, strategy.num_replicas_in_sync
    else:
        import horovod.tensorflow as hvd

        hvd.init()
        strategy, rank, workers = None, hvd.rank(), hvd.size()
    from tests.fit_case import GLOBAL_BATCH, MINED_LOSSES, batches, fitted, worker_slice

    x, y = batches()
    if backend == "horovod":
        x, y = worker_slice(x, rank, workers), worker_slice(y, rank, workers)
    results = {"workers": workers}
    rows = GLOBAL_BATCH // workers if backend == "horovod" else GLOBAL_BATCH
    for name in MINED_LOSSES:
        model, history = fitted(name, strategy, seed=100 + rank, x=x, y=y, batch_size=rows)
        for i, w in enumerate(model.embedding_model.get_weights()):
            results[f"{name}/w{i}"] = w
        results[f"{name}/remote"] = history.history["cross_replica_negative_fraction"][-1]
    np.savez(f"{out}.{rank}.npz", **results)


if __name__ == "__main__":
    main(*sys.argv[1:3])
