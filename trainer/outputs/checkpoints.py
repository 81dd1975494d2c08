"""Checkpoints of the model, optimizer and step (the sampler's position), via CheckpointManager.

Only the chief writes. On start every worker restores the latest checkpoint it can see,
then the chief's values are broadcast to all (`Replicas.broadcast_variables`: Horovod's
broadcast, MultiWorkerMirrored's host all-reduce), so workers without the shared
workdir still resume with the same weights. A proxy loss's sharded centres are read by
every worker from the checkpoint (trainer/step/class_centres.py). TensorFlow
writes a checkpoint's files first and the `checkpoint` index last (atomically), so a
run killed mid-save resumes from the previous complete checkpoint.

With `checkpoints.asynchronous` (gin; on by default), a proxy loss's class centres, the
part that grows with the classes (1.5 GiB at 1M × 128 with Adam), are written by a
thread while the steps go on, from reads of the variables that TensorFlow keeps intact
(it copies a variable's buffer before updating it while a read is held); the model and
optimizer are written at once. The checkpoint counts only when every process's centres
are on disk: at the next step where the processes agree anyway (log, checkpoint,
evaluation), the chief merges them and writes the index, last. A kill before leaves the
previous checkpoint the newest complete one.

A checkpoint can still be torn after it was complete (a copy cut short, a shared file
system losing a block). On restart every tensor of the newest one is read first, its
class centres too (TensorFlow checks each tensor's checksum); one that does not read is
named, moved aside into `checkpoints/torn/` (never deleted) and the one before is tried.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import sys
import threading
import time

import gin
import numpy as np
import tensorflow as tf

# CheckpointManager's own writer of the index: the public one (tf.compat.v1) is deprecated.
from tensorflow.python.checkpoint.checkpoint_management import update_checkpoint_state_internal

from data.errors import InputError
from trainer.settings import check, check_types
from trainer.step.class_centres import centres_prefix

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


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """How many checkpoints are kept, and whether a proxy loss's centres are written while
    the steps go on (the gin configurable `checkpoints`; gin/base.gin documents each)."""

    keep: int = 3
    asynchronous: bool = True


@gin.configurable("checkpoints")
def checkpoint_settings(keep: int = 3, asynchronous: bool = True) -> CheckpointSettings:
    check_types("checkpoints", checkpoint_settings, dict(locals()))
    check(keep >= 1, f"checkpoints.keep must be >= 1, got {keep}.")
    return CheckpointSettings(keep, asynchronous)


def step_of(path: str) -> int:
    """The step of checkpoint prefix `path` (".../ckpt-120" -> 120)."""
    return int(path.rsplit("-", 1)[1])


class _PendingSave:
    """A checkpoint whose model part is on disk and whose centres a thread is writing."""

    def __init__(self, step: int, path: str | None, write):
        self.step, self.path = step, path  # path: the model part's prefix (chief)
        self.wrote, self.failure = False, None
        self.finished = threading.Event()
        threading.Thread(
            target=self._run, args=(write,), daemon=True, name=f"checkpoint-{step}"
        ).start()

    def _run(self, write) -> None:
        try:
            self.wrote = write()
        except BaseException as error:  # raised in the main thread when the save settles
            self.failure = error
        finally:
            self.finished.set()


class Checkpoints:
    def __init__(
        self, directory: str, replicas, keep: int, centres=None, asynchronous=False, **trackables
    ):
        self.replicas = replicas
        # Only a proxy loss's centres are written in the background (see the docstring).
        self.asynchronous = asynchronous and centres is not None
        self._pending: _PendingSave | None = None
        self.centres = centres  # trainer.step.class_centres.ShardedCentres: saved beside
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
            centres = centres_prefix(self.directory, step_of(path))
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
                files = glob.glob(glob.escape(path) + ".*")
                files += glob.glob(
                    glob.escape(centres_prefix(self.directory, step_of(path))) + ".*"
                )
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
            self._write_index(resume_from, [p for p in candidates if p not in dict(torn)])
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

    def save(self, step: int, wait: bool = True) -> str | None:
        """Writes a checkpoint at `step` (every process calls); returns its path on the
        chief once it counts. With `wait=False` on an asynchronous job, the centres are
        left to a thread and the checkpoint counts at a later `settle` (None now)."""
        self.finish()  # the one before counts (or fails) first
        self.step.assign(step)
        if self.replicas.is_chief:
            os.makedirs(self.directory, exist_ok=True)
        if wait or not self.asynchronous:
            return self._save_now(step)
        try:
            entries = self.centres.part()  # what step `step` holds (copied on write)
            path = None
            if self.replicas.is_chief:  # the model part now; the index only when it counts
                self.checkpoint.save_counter.assign_add(1)  # as CheckpointManager.save does
                path = self.checkpoint.write(os.path.join(self.directory, f"ckpt-{step}"))
        except BaseException:
            if self.replicas.is_chief:
                self._remove_partial(step)
            raise
        self._pending = _PendingSave(
            step, path, lambda: self.centres.write_part(self.directory, step, entries)
        )
        return None

    def _save_now(self, step: int) -> str | None:
        try:
            if self.centres is not None:
                # Written by every process before the checkpoint, whose index (written
                # last) is what makes either of them count.
                self.centres.save(self.directory, step)
            if not self.replicas.is_chief:
                return None
            path = self.manager.save(checkpoint_number=step)
        except BaseException:  # a full disk, a kill: no half-written files of this step left
            if self.replicas.is_chief:
                self._remove_partial(step)
            raise
        self._forget_centres()
        return path

    def _forget_centres(self) -> None:
        if self.centres is not None and self.replicas.is_chief:
            self.centres.forget(self.directory, [step_of(p) for p in self.manager.checkpoints])

    # --- an asynchronous save: agreed on at the steps where the processes meet anyway ---
    def progress(self) -> list[float]:
        """This process's share of the agreement on the pending save (summed over the
        processes and handed to `settle`): [finished, its wrote/failed flags]."""
        size = 1 + 2 * self.replicas.processes if self.asynchronous else 0
        pending = self._pending
        if pending is None or not pending.finished.is_set():
            return [0.0] * size
        return [1.0, *self.centres.outcome(pending.wrote, pending.failure)]

    def settle(self, summed) -> str | None:
        """Makes the pending save count once every process has written its centres
        (`summed`: `progress` summed over the processes); raises if a process failed.
        Returns the checkpoint's path on the chief when it counted."""
        pending = self._pending
        if pending is None or not len(summed) or summed[0] < self.replicas.processes:
            return None
        self._pending = None
        try:
            self.centres.merge_parts(self.directory, pending.step, summed[1:], pending.failure)
            if not self.replicas.is_chief:
                return None
            self._record(pending.path)
        except BaseException:  # nothing of this step is left, its model part included
            if self.replicas.is_chief:
                self._remove_partial(pending.step)
                for name in glob.glob(glob.escape(pending.path) + ".*"):
                    os.remove(name)
            raise
        self._forget_centres()
        return pending.path

    def finish(self) -> str | None:
        """Waits for the pending save and makes it count (every process, at one step)."""
        if self._pending is None:
            return None
        self._pending.finished.wait()
        return self.settle(np.asarray(self.replicas.sum_over_processes(self.progress())))

    def _record(self, path: str) -> None:
        """Names `path` in the index (last) and drops the checkpoints beyond `keep`."""
        kept = [p for p in self.manager.checkpoints if p != path] + [path]
        for old in kept[: -self.keep]:
            for name in glob.glob(glob.escape(old) + ".*"):
                os.remove(name)
        self._write_index(path, kept[-self.keep :])

    def _write_index(self, latest: str, kept: list[str]) -> None:
        """Rewrites the `checkpoint` index (atomically) to name `latest` and `kept`, as
        CheckpointManager does: with save times, without which a new manager would take
        them for ones to keep for ever (and never delete them or count their centres)."""
        now = time.time()
        update_checkpoint_state_internal(
            self.directory,
            model_checkpoint_path=latest,
            all_model_checkpoint_paths=kept,
            all_model_checkpoint_timestamps=[now] * len(kept),
            last_preserved_timestamp=now - 1,
            save_relative_paths=True,
        )
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self.directory, max_to_keep=self.keep
        )
