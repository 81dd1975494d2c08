"""Run under horovodrun: sharded retrieval metrics; each rank writes what it got.

horovodrun -np N python -m tests.horovod_eval_worker DIR   (reads DIR/case.npz)
"""

import os
import sys

import numpy as np

from trainer.backends.replicas import make_replicas
from trainer.evaluation import sharded_retrieval_metrics


def main(folder):
    replicas = make_replicas("horovod")
    case = np.load(os.path.join(folder, "case.npz"))
    metrics = sharded_retrieval_metrics(
        case["x"], case["labels"], (1, 4), "squared_euclidean", replicas, 8
    )
    start, end = replicas.process_rows(len(case["labels"]))
    np.savez(
        os.path.join(folder, f"metrics{replicas.rank}.npz"),
        workers=replicas.size,
        queries=end - start,
        **metrics,
    )


if __name__ == "__main__":
    main(sys.argv[1])
