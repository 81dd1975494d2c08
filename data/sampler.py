"""The class-balanced P×K sampler: P classes, K examples of each, per global batch.

The global batch of step s depends on (seed, s) alone: it is drawn from a generator
seeded with both, so it is the same set of examples, in the same order, whatever the
number of replicas or the backend (each replica then takes its contiguous slice), and
a job resumed at step s draws exactly the batch it would have drawn. The sampler's
position is therefore the step counter, which the checkpoint holds.

Built in O(N log N) from one stable argsort of the labels (millions of examples of
hundreds of thousands of classes): each class's members are a run of that order, in
ascending index, so the draws are those of a per-class index list.
"""

from __future__ import annotations

import numpy as np

from data.errors import InputError


class PKSampler:
    """Draws global batches of `classes_per_batch` × `examples_per_class` indices.

    Classes with fewer than K examples are left out (they cannot fill K distinct
    slots); a batch is laid out class by class, K consecutive rows each.
    """

    def __init__(self, labels, classes_per_batch: int, examples_per_class: int, seed: int):
        labels = np.asarray(labels)
        if classes_per_batch < 1 or examples_per_class < 1:
            raise InputError(
                f"A P×K batch needs P >= 1 and K >= 1, got P={classes_per_batch}, "
                f"K={examples_per_class}."
            )
        # Stable: within a class, members keep ascending index order.
        order = np.argsort(labels, kind="stable")
        classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        eligible = counts >= examples_per_class
        if eligible.sum() < classes_per_batch:
            raise InputError(
                f"The P×K batch needs {classes_per_batch} classes with at least "
                f"{examples_per_class} examples each, but the training data has "
                f"{eligible.sum()} such classes ({len(classes)} classes, the smallest with "
                f"{counts.min()} examples). Lower train.global_batch_size or "
                "train.examples_per_class."
            )
        self.classes_per_batch = classes_per_batch
        self.examples_per_class = examples_per_class
        self.seed = seed
        self.skipped_classes = int(len(classes) - eligible.sum())
        self._order = order.astype(np.int64)
        self._starts = starts[eligible]
        self._counts = counts[eligible]

    @property
    def global_batch_size(self) -> int:
        return self.classes_per_batch * self.examples_per_class

    def global_batch(self, step: int) -> np.ndarray:
        """Indices (int64, P·K) of the examples of global batch `step`."""
        rng = np.random.default_rng([self.seed, step])
        picked = rng.choice(len(self._starts), self.classes_per_batch, replace=False)
        k = self.examples_per_class
        # rng.choice(members, K) draws rng.choice(len(members), K) and indexes with it.
        return np.concatenate(
            [
                self._order[self._starts[c] + rng.choice(self._counts[c], k, replace=False)]
                for c in picked
            ]
        )
