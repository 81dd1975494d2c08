"""Checkpoints of the model, optimizer and step (the sampler's position), via CheckpointManager.

Only the chief writes. On start every worker restores the latest checkpoint it can see,
then the chief's values are broadcast to all (`Replicas.broadcast_variables`: Horovod's
broadcast, MultiWorkerMirrored's host all-reduce), so workers without the shared
workdir still resume with the same weights. A proxy loss's sharded centres are read by
every worker from the checkpoint (trainer/class_centres.py). TensorFlow
writes a checkpoint's files first and the `checkpoint` index last (atomically), so a
run killed mid-save resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import os

import tensorflow as tf

from data.errors import InputError


class Checkpoints:
    def __init__(self, directory: str, replicas, keep: int, centres=None, **trackables):
        self.replicas = replicas
        self.centres = centres  # trainer.class_centres.ShardedCentres: saved beside
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.checkpoint = tf.train.Checkpoint(step=self.step, **trackables)
        self.directory = directory
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=keep)

    def restore(self, variables, broadcast: bool = True) -> int:
        """Restores the latest checkpoint (if any) everywhere; returns the step to start at.

        `variables` (model and optimizer) are then broadcast from the chief, with the step;
        not in an elastic job, whose state is synced when the training starts (a worker
        that joins later must not call a collective the others are not in).
        """
        latest = self.manager.latest_checkpoint
        if latest is not None:
            try:
                self.checkpoint.restore(latest).assert_existing_objects_matched()
            except (AssertionError, ValueError, tf.errors.OpError) as error:
                first_line = str(error).strip().splitlines()[0][:300]
                raise InputError(
                    f"The checkpoint {latest} was written by an incompatible configuration "
                    f"({first_line}). Resume with the configuration that wrote it (its "
                    "operative_config.gin is in the workdir), or start in a new --workdir."
                ) from error
        if broadcast:
            self.replicas.broadcast_variables([*variables, self.step])
        step = int(self.step.numpy())
        if self.centres is not None and step:
            self.centres.restore(self.directory, step)  # this replica's rows, any layout
        return step

    @property
    def latest(self) -> str | None:
        return self.manager.latest_checkpoint

    def save(self, step: int) -> str | None:
        """Writes a checkpoint at `step` (chief only); returns its path."""
        self.step.assign(step)
        if self.replicas.is_chief:
            os.makedirs(self.directory, exist_ok=True)
        if self.centres is not None:
            # Gathered from every process; written before the checkpoint, whose index
            # (written last) is what makes either of them count.
            self.centres.save(self.directory, step)
        if not self.replicas.is_chief:
            return None
        path = self.manager.save(checkpoint_number=step)
        if self.centres is not None:
            self.centres.forget(
                self.directory, [p.rsplit("-", 1)[1] for p in self.manager.checkpoints]
            )
        return path
