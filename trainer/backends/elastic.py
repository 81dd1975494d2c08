"""Elastic Horovod (`horovodrun --min-np/--max-np`): the job goes on when workers leave or join.

Between commits, the training state (model and optimizer variables, the step) is kept in
host memory through Horovod's elastic `State`. When a worker dies, the others get an error
from their next collective, restore the last commit, re-form the ring without it and carry
on; a worker that joins receives the chief's state at the next commit. The global batch
of step s depends on (seed, s) alone and the loss does not depend on the replica count,
so a job that changes size continues exactly as it would have without the change.

Only this module touches Horovod's elastic API; the loop gives it an `attempt(state)` that
trains from `state.step`, calls `state.commit()` now and then, and returns the results.
Imported only by elastic jobs.
"""

from __future__ import annotations

import contextlib

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf
from horovod.common.elastic import ObjectState, run_fn
from horovod.common.exceptions import HorovodInternalError

from trainer.backends import heartbeat


class TrainingState(ObjectState):
    """Variables (copied to host memory at each commit) plus the step, as Horovod state.

    Horovod's own TensorFlowState does not broadcast variables in eager mode, and its
    Keras state expects Keras 2 optimizers; this one syncs through `Replicas`.
    """

    def __init__(self, replicas, variables, step: int, centres=None):
        self._replicas, self._variables = replicas, list(variables)
        self._values = self._read()
        # A proxy loss's centres are sharded by worker: the whole matrices are kept at
        # each commit (host memory, every worker), so that any new set of workers can
        # re-shard them (trainer/step/class_centres.py).
        self._centres = centres
        self._whole_centres = centres.whole() if centres is not None else None
        super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank, step=step)

    def _read(self) -> list[np.ndarray]:
        return [np.array(v.numpy()) for v in self._variables]

    def commit(self) -> None:
        """Saves only once every worker has reached the commit. Horovod saves first and
        syncs after: a worker that died just before the commit (the chief before it flushed
        the steps' TensorBoard events) would leave the others resuming after steps whose
        record it took with it."""
        with _peer_failures_as_horovod_errors():
            self._replicas.sum_over_processes([0.0])
        super().commit()

    def save(self) -> None:
        if self._centres is not None:  # first: a collective that may fail changes nothing
            whole = self._centres.gathered()
            whole["iterations"] = int(self._centres.shards[0].iterations.numpy())
            self._whole_centres = whole
        self._values = self._read()
        super().save()

    def restore(self) -> None:
        """Back to the last commit: the steps after it are trained again."""
        for variable, value in zip(self._variables, self._values, strict=True):
            variable.assign(value)
        super().restore()  # the centres: re-sharded from the commit in `sync`

    def reset(self) -> None:
        """After the workers changed (Horovod skips `sync` when some only left): the
        centres re-sharded over the new workers from the last commit."""
        if self._centres is not None:
            self._centres.reshard(self._whole_centres)

    def sync(self) -> None:
        """Everyone takes the chief's state (a worker that joined has only its own)."""
        with _peer_failures_as_horovod_errors():
            self._replicas.broadcast_variables(self._variables)
            self._values = self._read()
            if self._centres is not None:
                whole = self._whole_centres
                whole = {
                    name: hvd.broadcast(tf.constant(value), root_rank=0).numpy()
                    for name, value in whole.items()
                }
                self._whole_centres = whole
                self._centres.reshard(whole)  # this worker's rows of the new layout
            super().sync()


@contextlib.contextmanager
def _peer_failures_as_horovod_errors():
    """A collective that fails because a peer died raises a TensorFlow error naming a
    Horovod op; Horovod's elastic loop restores the last commit on `HorovodInternalError`.
    (Horovod's own decorator recognizes only some op names, not grouped allreduce, and
    not in `sync`.)"""
    try:
        yield
    except tf.errors.OpError as error:
        if "Horovod" not in str(error.message):
            raise
        raise HorovodInternalError(error) from error


def run(attempt, state: TrainingState, workdir: str):
    """`attempt(state)` until it returns, re-forming the workers after each change."""

    def attempt_with_horovod_errors(state):
        with _peer_failures_as_horovod_errors():
            return attempt(state)

    def reset() -> None:
        # A worker silent since then is ended by its guard (elastic_guard.py), so the
        # rendezvous does not wait for it.
        heartbeat.mark_reset(workdir)
        hvd.shutdown()
        hvd.init()

    return run_fn(attempt_with_horovod_errors, reset)(state)
