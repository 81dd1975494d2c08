"""Checkpoints of the model, optimizer and step (the sampler's position), via CheckpointManager.

Only the chief writes. On start every worker restores the latest checkpoint it can see,
then the chief's values are broadcast to all (`Replicas.broadcast_variables`: Horovod's
broadcast, MultiWorkerMirrored's host all-reduce), so workers without the shared
workdir still resume with the same weights. A proxy loss's sharded centres are read by
every worker from the checkpoint (trainer/class_centres.py). TensorFlow
writes a checkpoint's files first and the `checkpoint` index last (atomically), so a
run killed mid-save resumes from the previous complete checkpoint.

A checkpoint can still be torn after it was complete (a copy cut short, a shared file
system losing a block). On restart every tensor of the newest one is read first, its
class centres too (TensorFlow checks each tensor's checksum); one that does not read is
named, moved aside into `checkpoints/torn/` (never deleted) and the one before is tried.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

import tensorflow as tf

from data.errors import InputError
from trainer.class_centres import centres_prefix

TORN = "torn"  # where unreadable checkpoints are moved, inside the checkpoint directory


def last_complete(workdir: str) -> str | None:
    """The newest checkpoint of `workdir` that its index names, or None: what a failure's
    last line tells the user a rerun resumes from."""
    directory = os.path.join(workdir, "checkpoints")
    return tf.train.latest_checkpoint(directory) if os.path.isdir(directory) else None


def unreadable(prefix: str) -> str | None:
    """Why the checkpoint at `prefix` cannot be read whole, or None when it can.

    Every tensor is read: a short data file, a zeroed block (a checksum that does not
    match) or a missing or damaged index each fail here, before any variable changes."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except (IndexError, ValueError, OSError, tf.errors.OpError) as error:
        lines = str(error).strip().splitlines() or [""]
        detail = next((line for line in lines if "{{function_node" not in line), lines[0])
        return f"{type(error).__name__}: {detail[:200]}"
    return None


class Checkpoints:
    def __init__(self, directory: str, replicas, keep: int, centres=None, **trackables):
        self.replicas = replicas
        self.centres = centres  # trainer.class_centres.ShardedCentres: saved beside
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.checkpoint = tf.train.Checkpoint(step=self.step, **trackables)
        self.directory = directory
        self.keep = keep
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=keep)

    def restore(self, variables, broadcast: bool = True) -> int:
        """Restores the latest checkpoint (if any) everywhere; returns the step to start at.

        `variables` (model and optimizer) are then broadcast from the chief, with the step;
        not in an elastic job, whose state is synced when the training starts (a worker
        that joins later must not call a collective the others are not in).
        """
        latest = self._newest_readable()
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

    def _problem(self, path: str) -> str | None:
        """Why checkpoint `path` (with its centres, if the job has them) cannot be read."""
        problem = unreadable(path)
        if problem is None and self.centres is not None:
            centres = centres_prefix(self.directory, int(path.rsplit("-", 1)[1]))
            problem = unreadable(centres)
            if problem is not None:
                problem = f"its centres {os.path.basename(centres)}: {problem}"
        return problem

    def _newest_readable(self) -> str | None:
        """The newest checkpoint that reads whole; the newer, torn ones are moved aside.
        None for a new job; an error naming them all if none reads."""
        candidates = list(self.manager.checkpoints)
        latest = self.manager.latest_checkpoint  # an index may name only this one
        if latest is not None and latest not in candidates:
            candidates.append(latest)
        torn = []
        for path in reversed(candidates):
            problem = self._problem(path)
            if problem is None:
                break
            torn.append((path, problem))
        else:
            if torn:  # nothing is moved: the user decides what to do with them
                named = "; ".join(f"{os.path.basename(p)} ({why})" for p, why in torn)
                raise InputError(
                    f"no checkpoint in {self.directory} can be read: {named}. Nothing was "
                    "moved or deleted. Restore them from a copy, or start in a new --workdir."
                )
            return None
        if torn:
            self._set_aside(torn, candidates, resume_from=path)
        return path

    def _set_aside(self, torn, candidates, resume_from: str) -> None:
        """Moves the torn checkpoints' files into checkpoints/torn/ and drops them from the
        `checkpoint` index (the chief; every worker then forgets them)."""
        if self.replicas.is_chief:
            aside = os.path.join(self.directory, TORN)
            os.makedirs(aside, exist_ok=True)
            for path, problem in torn:
                step = path.rsplit("-", 1)[1]
                files = glob.glob(glob.escape(path) + ".*")
                files += glob.glob(glob.escape(centres_prefix(self.directory, int(step))) + ".*")
                for name in files:
                    target = os.path.join(aside, os.path.basename(name))
                    if os.path.exists(target):  # torn again at the same step
                        target += f".{len(glob.glob(glob.escape(target) + '*'))}"
                    shutil.move(name, target)
                print(
                    f"warning: checkpoint {path} cannot be read ({problem}); moved aside "
                    f"to {aside}/, resuming from {os.path.basename(resume_from)}",
                    file=sys.stderr,
                    flush=True,
                )
            kept = [p for p in candidates if p not in dict(torn)]
            tf.compat.v1.train.update_checkpoint_state(
                self.directory, resume_from, all_model_checkpoint_paths=kept
            )
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self.directory, max_to_keep=self.keep
        )

    def _remove_partial(self, step: int) -> None:
        """The temporary files of a save of `step` that did not complete."""
        for pattern in (f"*-{step}_temp", f"*-{step}.*tempstate*"):
            for name in glob.glob(os.path.join(self.directory, pattern)):
                if os.path.isdir(name):
                    shutil.rmtree(name, ignore_errors=True)
                else:
                    os.remove(name)

    @property
    def latest(self) -> str | None:
        return self.manager.latest_checkpoint

    def save(self, step: int) -> str | None:
        """Writes a checkpoint at `step` (chief only); returns its path."""
        self.step.assign(step)
        if self.replicas.is_chief:
            os.makedirs(self.directory, exist_ok=True)
        try:
            if self.centres is not None:
                # Gathered from every process; written before the checkpoint, whose index
                # (written last) is what makes either of them count.
                self.centres.save(self.directory, step)
            if not self.replicas.is_chief:
                return None
            path = self.manager.save(checkpoint_number=step)
        except BaseException:  # a full disk, a kill: no half-written files of this step left
            if self.replicas.is_chief:
                self._remove_partial(step)
            raise
        if self.centres is not None:
            self.centres.forget(
                self.directory, [p.rsplit("-", 1)[1] for p in self.manager.checkpoints]
            )
        return path
