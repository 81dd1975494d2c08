"""Class centres of a proxy loss, sharded by class over the replicas (Partial FC).

Replica r holds the centres of classes [a_r, b_r) (`slice_bounds` over the classes) and
their optimizer slots, on its own device; nothing else of them exists anywhere. Each
step, every replica computes its block's logits for the gathered global batch, and the
loss's softmax (or Proxy-Anchor's sums) combines over replicas through all-reduces of
per-example vectors (losses.proxies.proxy_loss_block). A centre's gradient never leaves
its replica: the shard is updated where it lives, by TensorFlow's fused optimizer
kernels (Keras' optimizers sum gradients over replicas, which a shard must not do).

Checkpoints hold the whole matrix, in class order, so a job resumes on any replica
count. Each process writes its own rows (slices of the whole matrix) and the chief merges
the parts' indexes, so no host holds more than its rows; each replica reads back only its
rows (a sliced restore), from whichever parts overlap them. The files sit beside the
checkpoint they belong to. An elastic job re-shards from the whole matrices it keeps at
each commit (`reshard`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil

import numpy as np
import tensorflow as tf

from data.errors import InputError
from losses.proxies import initial_centres
from trainer.backends.replicas import Replicas, applied_if, slice_bounds

SLOTS = {"adam": ("m", "v"), "adamw": ("m", "v"), "sgd": ()}
ADAM_DEFAULTS = (0.9, 0.999, 1e-7)  # Keras' beta_1, beta_2, epsilon (the trainer's Adam)
SAVED = ("centres", "m", "v")


class _Shard:
    """One replica's rows of the centres, with their optimizer slots and step count."""

    def __init__(self, values, optimizer: str, name: str):
        self.centres = tf.Variable(values, name=f"{name}_centres")
        self.slots = {
            slot: tf.Variable(tf.zeros_like(values), trainable=False, name=f"{name}_{slot}")
            for slot in SLOTS[optimizer]
        }
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{name}_steps")


class ShardedCentres:
    """The centres of `loss` (a losses proxy class) split over `replicas` by class."""

    def __init__(
        self,
        loss,
        replicas: Replicas,
        num_classes: int,
        embedding_dim: int,
        optimizer: str,
        schedule,
        weight_decay: float = 0.0,
        adam: tuple = ADAM_DEFAULTS,
    ):
        if optimizer not in SLOTS:
            raise InputError(f"optimizer.name={optimizer!r} has no sharded-centre update")
        self.loss, self.replicas = loss, replicas
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.rows_per_class = loss.rows_per_class
        self.optimizer, self.schedule, self.weight_decay = optimizer, schedule, weight_decay
        self.adam = tuple(float(v) for v in adam)  # beta_1, beta_2, epsilon
        self.restored_from = None  # the checkpoint prefix the shards were read from
        self._build(lambda first, end: initial_centres(
            first, end, self.rows_per_class, embedding_dim, loss.seed))  # fmt: skip

    def _build(self, rows_of) -> None:
        """One shard per local replica for the current replica count, its centres
        `rows_of(first_class, end_class)`. Plain variables on each replica's device,
        outside the strategy's scope: a shard is never mirrored, broadcast or summed."""
        replicas = self.replicas
        self.bounds = slice_bounds(self.num_classes, replicas.size)
        self.shards = []
        with tf.init_scope():
            for index, device in enumerate(replicas.local_devices()):
                first, end = self.bounds[replicas.first_local_replica + index]
                with tf.device(device) if device else contextlib.nullcontext():
                    self.shards.append(
                        _Shard(rows_of(first, end), self.optimizer, f"replica_{index}")
                    )

    def reshard(self, whole: dict) -> None:
        """New shards for the current replica count from the whole matrices (`whole()`
        or `gathered()` plus "iterations"): an elastic job whose workers changed."""
        k = self.rows_per_class
        self._build(lambda first, end: whole["centres"][first * k : end * k])
        for index, shard in enumerate(self.shards):
            first, end = self.bounds[self.replicas.first_local_replica + index]
            for name, slot in shard.slots.items():
                slot.assign(whole[name][first * k : end * k])
            shard.iterations.assign(int(whole["iterations"]))

    def whole(self) -> dict:
        """The whole matrices in host memory without a collective: as restored from the
        checkpoint, or as initialized (the same on every worker)."""
        shape = (self.num_classes * self.rows_per_class, self.embedding_dim)
        if self.restored_from is not None:
            reader = tf.train.load_checkpoint(self.restored_from)
            names = [n for n in SAVED if n == "centres" or n in self.shards[0].slots]
            return {
                **{n: reader.get_tensor(n) for n in names},
                "iterations": int(reader.get_tensor("iterations")),
            }
        centres = initial_centres(0, self.num_classes, self.rows_per_class,
                                  self.embedding_dim, self.loss.seed).numpy()  # fmt: skip
        slots = {n: np.zeros(shape, np.float32) for n in self.shards[0].slots}
        return {"centres": centres, **slots, "iterations": 0}

    # --- inside a step --------------------------------------------------------------
    def _local(self) -> tuple[_Shard, int, int]:
        index = self.replicas.local_replica_index()
        first, end = self.bounds[self.replicas.first_local_replica + index]
        return self.shards[index], first, end

    def variable(self) -> tf.Variable:
        """This replica's centres (inside `Replicas.run`)."""
        return self._local()[0].centres

    def block(self, embeddings, labels, step):
        """The loss of the gathered global batch for this replica's block of classes
        (a losses.proxies.ProxyBlock): per-example sums over the replicas' blocks."""
        shard, first, end = self._local()
        replicas = self.replicas

        def reduce_max(value):
            rows = replicas.all_gather(tf.stop_gradient(value)[None], (1,) * replicas.size)
            return tf.reduce_max(rows, axis=0)

        return self.loss.block(
            embeddings,
            labels,
            shard.centres,
            first,
            end,
            step,
            reduce_sum=replicas.all_reduce_sum,
            reduce_max=reduce_max,
        )

    def apply(self, gradient, only_if=None) -> None:
        """Updates this replica's shard with its own gradient (when `only_if`)."""
        shard = self._local()[0]

        def update():
            learning_rate = tf.cast(self.schedule(shard.iterations), tf.float32)
            grad = tf.convert_to_tensor(gradient)  # Partial FC: dense, as the slots are
            if self.optimizer == "adamw" and self.weight_decay:
                shard.centres.assign_sub(shard.centres * self.weight_decay * learning_rate)
            if self.optimizer == "sgd":
                tf.raw_ops.ResourceApplyGradientDescent(
                    var=shard.centres.handle, alpha=learning_rate, delta=grad
                )
            else:
                t = tf.cast(shard.iterations + 1, tf.float32)
                beta_1, beta_2, epsilon = self.adam
                tf.raw_ops.ResourceApplyAdam(
                    var=shard.centres.handle,
                    m=shard.slots["m"].handle,
                    v=shard.slots["v"].handle,
                    beta1_power=beta_1**t,
                    beta2_power=beta_2**t,
                    lr=learning_rate,
                    beta1=beta_1,
                    beta2=beta_2,
                    epsilon=epsilon,
                    grad=grad,
                )
            shard.iterations.assign_add(1)

        applied_if(only_if, update)

    # --- outside the steps ------------------------------------------------------------
    def local_bytes(self) -> int:
        """Bytes of this process's centres and slots."""
        return sum(
            int(np.prod(v.shape)) * v.dtype.size
            for s in self.shards
            for v in (s.centres, *s.slots.values())
        )

    def gathered(self) -> dict:
        """The whole matrices in class order (numpy), on every process (a collective)."""
        result = {}
        for name in SAVED:
            local = [_saved(s, name) for s in self.shards]
            if any(v is None for v in local):
                continue
            result[name] = self.replicas.gather_process_rows(np.concatenate(local, axis=0))
        return result

    def save(self, directory: str, step: int) -> None:
        """Writes checkpoint `step`'s centres and slots where they live: every process
        writes its own shards' rows (slices of the whole matrices) into a part file, and
        the chief merges the parts' indexes into `centres-<step>`, renaming their data
        files. Nothing is gathered: no host holds more than its own rows. Every process
        must call, and every worker must see the workdir (as on restore)."""
        try:
            wrote, failure = self.write_part(directory, step, self.part()), None
        except (tf.errors.OpError, OSError) as error:
            wrote, failure = False, error
        outcome = self.replicas.sum_over_processes(self.outcome(wrote, failure))
        self.merge_parts(directory, step, outcome, failure)

    def part(self) -> list[tuple[str, str, object]]:
        """This process's rows of every saved matrix, as (name, slice of the whole, value);
        the chief adds the step count. The values are reads of the variables, which are
        snapshots: TensorFlow copies a variable's buffer before updating it while a read
        of it is held (copy on write), so a thread can write them while the steps go on,
        and the copy is paid only then, once, by the next update."""
        k, rows = self.rows_per_class, self.num_classes * self.rows_per_class
        entries = []
        for index, shard in enumerate(self.shards):
            first, end = self.bounds[self.replicas.first_local_replica + index]
            if end == first:  # more replicas than classes: an empty shard
                continue
            spec = f"{rows} {self.embedding_dim} {first * k},{(end - first) * k}:-"
            for name in SAVED:
                value = _saved(shard, name, variable=True)
                if value is not None:
                    entries.append((name, spec, value.read_value()))
        if self.replicas.is_chief:
            steps = np.array(self.shards[0].iterations.numpy(), np.int64)
            entries.append(("iterations", "", steps))
        return entries

    def write_part(self, directory: str, step: int, entries) -> bool:
        """Writes `entries` (from `part`) as this process's part of checkpoint `step`;
        False when there is nothing to write. May run in a thread: no collective."""
        if not entries:
            return False
        parts = parts_directory(directory, step)
        os.makedirs(parts, exist_ok=True)
        names, slices, values = zip(*entries, strict=True)
        tf.raw_ops.SaveV2(
            prefix=os.path.join(parts, f"process-{self.replicas.rank}"),
            tensor_names=list(names),
            shape_and_slices=list(slices),
            tensors=list(values),
        )
        return True

    def outcome(self, wrote: bool, failure: BaseException | None) -> np.ndarray:
        """This process's [wrote, failed] flags in its place of a vector over processes;
        their sum over processes is what `merge_parts` reads."""
        flags = np.zeros(2 * self.replicas.processes)
        flags[2 * self.replicas.rank + (failure is not None)] = float(wrote or failure is not None)
        return flags

    def merge_parts(self, directory: str, step: int, outcome, failure=None) -> None:
        """After every process wrote its part (`outcome`: the summed flags): raises this
        process's own `failure` (a full disk, with its path) or names the processes that
        failed; else the chief merges the parts into `centres-<step>`. A collective."""
        if failure is not None:
            raise failure
        flags = np.asarray(outcome).reshape(-1, 2)
        failed = [rank for rank, (_, bad) in enumerate(flags) if bad]
        if failed:
            raise OSError(
                f"process(es) {failed} could not write their class centres for checkpoint "
                f"{step} (their own log says why); checkpoint {step} does not count"
            )
        merged = None
        if self.replicas.is_chief:
            merged = _merge(parts_directory(directory, step),
                            [r for r, (wrote, _) in enumerate(flags) if wrote],
                            centres_prefix(directory, step))  # fmt: skip
        problem = self.replicas.agree(merged)
        if problem:
            raise OSError(f"the class centres of checkpoint {step} were not merged: {problem}")

    def restore(self, directory: str, step: int) -> None:
        """Reads this replica's rows of checkpoint `step`'s centres and slots (any
        replica count may have written them)."""
        prefix = centres_prefix(directory, step)
        try:
            reader = tf.train.load_checkpoint(prefix)
        except (tf.errors.OpError, ValueError) as error:
            raise InputError(
                f"checkpoint {step} has no class centres readable here ({prefix}: "
                f"{str(error).splitlines()[0][:200]}); the centres are sharded, so every "
                "worker must see the workdir's checkpoints"
            ) from error
        shapes = reader.get_variable_to_shape_map()
        expected = [self.num_classes * self.rows_per_class, self.embedding_dim]
        if shapes.get("centres") != expected:
            raise InputError(
                f"checkpoint {step} holds centres of shape {shapes.get('centres')}, this job "
                f"{expected} (num_classes × rows per class, embedding width); resume with "
                "the configuration that wrote it"
            )
        iterations = reader.get_tensor("iterations")
        for index, shard in enumerate(self.shards):
            first, end = self.bounds[self.replicas.first_local_replica + index]
            k = self.rows_per_class
            for name in SAVED:
                target = _saved(shard, name, variable=True)
                if target is None:
                    continue
                if name not in shapes:
                    raise InputError(f"checkpoint {step} has no centre slot {name!r}")
                spec = f"{expected[0]} {expected[1]} {first * k},{(end - first) * k}:-"
                (value,) = tf.raw_ops.RestoreV2(
                    prefix=prefix, tensor_names=[name], shape_and_slices=[spec], dtypes=[tf.float32]
                )
                target.assign(value)
            shard.iterations.assign(iterations)
        self.restored_from = prefix

    @staticmethod
    def forget(directory: str, keep_steps) -> None:
        """Deletes the centre files of checkpoints no longer kept."""
        keep = {int(s) for s in keep_steps}
        for index in glob.glob(os.path.join(directory, "centres-*.index")):
            match = re.search(r"centres-(\d+)\.index$", index)
            if match and int(match.group(1)) not in keep:
                for path in glob.glob(index[: -len(".index")] + ".*"):
                    os.remove(path)


def centres_prefix(directory: str, step: int) -> str:
    return os.path.join(directory, f"centres-{step}")


def parts_directory(directory: str, step: int) -> str:
    """Where the processes write their parts of `step`'s centres before the merge (the
    `<prefix>_temp` of TensorFlow's own sharded saves, so a failed save is cleared alike)."""
    return centres_prefix(directory, step) + "_temp"


def _merge(parts: str, ranks, prefix: str) -> str | None:
    """Merges the part files of processes `ranks` into checkpoint `prefix`; None, or
    why not (a part missing: a worker that does not see the workdir)."""
    prefixes = [os.path.join(parts, f"process-{rank}") for rank in ranks]
    missing = [p for p in prefixes if not os.path.exists(p + ".index")]
    if missing:
        return (
            f"{', '.join(missing)} not found: every worker of a job with sharded centres "
            "must write into the same workdir (a shared file system)"
        )
    try:
        tf.raw_ops.MergeV2Checkpoints(
            checkpoint_prefixes=prefixes, destination_prefix=prefix, delete_old_dirs=False
        )
    except (tf.errors.OpError, OSError) as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    finally:
        shutil.rmtree(parts, ignore_errors=True)  # and any stale part of an earlier run
    return None


def _saved(shard: _Shard, name: str, variable: bool = False):
    value = shard.centres if name == "centres" else shard.slots.get(name)
    if value is None or variable:
        return value
    return value.numpy()


def centres_for_optimizer(loss, replicas, num_classes: int, embedding_dim: int, optimizer):
    """Sharded centres updated like a Keras `optimizer` would (Adam, AdamW, or SGD
    without momentum), at its learning rate: for `GlobalMiningModel`."""
    import keras

    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if isinstance(inner, keras.optimizers.AdamW):
        kind, decay = "adamw", float(inner.weight_decay or 0.0)
    elif isinstance(inner, keras.optimizers.Adam):
        kind, decay = "adam", 0.0
    elif isinstance(inner, keras.optimizers.SGD) and not inner.momentum:
        kind, decay = "sgd", 0.0
    else:
        raise ValueError(
            f"the centres of {type(loss).__name__} are updated by Adam, AdamW or SGD without "
            f"momentum; got {type(inner).__name__}"
        )
    adam = (inner.beta_1, inner.beta_2, inner.epsilon) if kind != "sgd" else ADAM_DEFAULTS
    return ShardedCentres(
        loss, replicas, num_classes, embedding_dim, kind, lambda _: inner.learning_rate,
        decay, adam,
    )  # fmt: skip
