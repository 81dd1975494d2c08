"""Run under horovodrun -np N: sharded ArcFace centres saved or restored by the workers
themselves (trainer.step.class_centres), for tests/test_sharded_centres.py.

  save DIR STEP     every replica's rows of `whole()` (below) and its Adam slots, saved
                    at STEP; the test fails if anything is gathered across processes.
  restore DIR STEP  reads STEP back on this worker count, writes this worker's rows to
                    DIR/rows-<rank>.npz, and saves them again at STEP + 1.
"""

import os
import sys

import numpy as np

import losses
from trainer.backends.replicas import make_replicas
from trainer.step.class_centres import ShardedCentres

CLASSES, DIM, ITERATIONS = 11, 6, 17  # 11 classes: uneven shards on 2 and 4 workers


def whole() -> dict:
    """Stand-ins for trained values, different in every entry (bit patterns included)."""
    rng = np.random.default_rng(7)
    shape = (CLASSES, DIM)
    return {name: rng.normal(size=shape).astype(np.float32) for name in ("centres", "m", "v")}


def refuse_gathering(array):
    raise AssertionError("class centres were gathered across processes")


def main(mode: str, directory: str, step: int) -> None:
    replicas = make_replicas("horovod")
    loss = losses.ArcFaceLoss(num_classes=CLASSES)
    centres = ShardedCentres(loss, replicas, CLASSES, DIM, "adam", schedule=lambda _: 1e-3)
    replicas.gather_process_rows = refuse_gathering
    (shard,) = centres.shards
    first, end = centres.bounds[replicas.rank]
    if mode == "save":
        for name, value in whole().items():
            variable = shard.centres if name == "centres" else shard.slots[name]
            variable.assign(value[first:end])
        shard.iterations.assign(ITERATIONS)
        centres.save(directory, step)
        return
    centres.restore(directory, step)
    np.savez(
        os.path.join(directory, f"rows-{replicas.rank}.npz"),
        first=first,
        end=end,
        iterations=shard.iterations.numpy(),
        centres=shard.centres.numpy(),
        **{name: slot.numpy() for name, slot in shard.slots.items()},
    )
    centres.save(directory, step + 1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
