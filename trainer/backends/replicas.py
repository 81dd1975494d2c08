"""One replica abstraction over single device, MirroredStrategy, MultiWorkerMirrored and Horovod.

Everything the trainer needs from the backend goes through `Replicas`: who am I (rank,
size, chief), how the global batch is split (contiguous slices, replica r takes rows
[start_r, end_r)), running a step on every replica, and the collectives used inside a
step: a differentiable all-gather whose backward pass *sums* the incoming gradients over
replicas before slicing out the caller's rows (so each embedding's owner receives the
gradient of the whole global loss), a summing all-reduce, gradient application, and the
broadcast of initial weights. Nothing else in the trainer branches on the backend.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle

import gin
import keras
import numpy as np
import tensorflow as tf

from data.errors import InputError
from trainer.backends import collective_timeout
from trainer.backends.placement import place

STRATEGIES = ("auto", "single", "mirrored", "multi_worker", "horovod")


def configure_cpu_replicas(count: int) -> list[str]:
    """Splits the CPU into `count` logical devices (MirroredStrategy without GPUs).

    Must run before TensorFlow initializes its devices; if it already has, the existing
    logical CPUs are used when there are enough, else a clear error is raised.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError:
        pass  # already initialized: checked below
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) < count:
        raise InputError(
            f"distribute.cpu_replicas={count} but TensorFlow was initialized with "
            f"{len(devices)} logical CPU(s); set it before any TensorFlow op runs."
        )
    return devices[:count]


def slice_bounds(global_size: int, num_replicas: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) rows of each replica; the first `B % N` get one more."""
    base, extra = divmod(global_size, num_replicas)
    bounds, start = [], 0
    for r in range(num_replicas):
        end = start + base + (1 if r < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


class Replicas:
    """Base class: the single-device backend (one replica, collectives are identities)."""

    name = "single"
    timeout_seconds = collective_timeout.DEFAULT_SECONDS  # distribute.timeout_seconds
    elastic = (
        False  # whether workers can leave and join during the job (trainer/backends/elastic.py)
    )

    @property
    def size(self) -> int:
        """Number of replicas in the job (all workers, all devices)."""
        return 1

    @property
    def rank(self) -> int:
        """This process's worker index (0 on the chief)."""
        return 0

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def scope(self):
        """Context in which the model and optimizer variables are created."""
        return contextlib.nullcontext()

    # --- outside the step ---------------------------------------------------------
    @property
    def local_replicas(self) -> int:
        """Replicas driven by this process."""
        return 1

    @property
    def first_local_replica(self) -> int:
        return self.rank * self.local_replicas

    @property
    def processes(self) -> int:
        return self.size // self.local_replicas

    def local_replica_index(self) -> int:
        """Inside `run`: which of this process's replicas is running (a Python int)."""
        return 0

    def gather_process_rows(self, array) -> np.ndarray:
        """Every process's numpy `array` (same trailing shape) stacked in process order,
        on every process."""
        return np.asarray(array)

    def process_rows(self, global_size: int) -> tuple[int, int]:
        """The contiguous rows [start, end) of a global batch that this process reads."""
        bounds = slice_bounds(global_size, self.size)
        first = self.first_local_replica
        return bounds[first][0], bounds[first + self.local_replicas - 1][1]

    def distribute(self, *local_arrays, global_size: int):
        """This process's rows (`process_rows(global_size)`) split among its local
        replicas, ready for `run`: on each replica's device (the copy is issued now, so
        staged while an earlier step runs it overlaps that step)."""
        gpu = _default_gpu()
        if gpu is None:  # nothing to copy: the step reads host memory
            return tuple(tf.convert_to_tensor(a) for a in local_arrays)
        with tf.device(gpu):
            return tuple(tf.identity(tf.convert_to_tensor(a)) for a in local_arrays)

    def split(self, *global_arrays):
        """Each replica's contiguous slice of the global batch, ready for `run`."""
        start, end = self.process_rows(len(global_arrays[0]))
        local = (np.asarray(a)[start:end] for a in global_arrays)
        return self.distribute(*local, global_size=len(global_arrays[0]))

    def run(self, fn, args=(), kwargs=None):
        """Runs `fn(*args, **kwargs)` once per local replica (args come from `distribute`)."""
        return fn(*args, **(kwargs or {}))

    def local_results(self, value) -> list:
        """A `run` result as one value per local replica."""
        return [value]

    def broadcast_variables(self, variables) -> None:
        """Makes every replica start from the chief's weights."""

    def agree(self, value):
        """The chief's `value` (a picklable object) on every process."""
        return value

    def sum_over_processes(self, array) -> np.ndarray:
        """The element-wise sum of every process's float64 `array` (same shape on all)."""
        return np.asarray(array, np.float64)

    def local_devices(self) -> list:
        """The devices of this process's replicas (None: the default device)."""
        return [None]

    # --- inside the step ------------------------------------------------------------
    def replica_index(self) -> tf.Tensor:
        """This replica's global index, which is also its slice of the global batch."""
        return tf.constant(0)

    def replica_rows(self, global_size: int) -> tuple[int, ...]:
        """Rows of a global batch held by each replica, in replica order."""
        return tuple(end - start for start, end in slice_bounds(global_size, self.size))

    def rows_from_static_shape(self, rows: int | None) -> tuple[int, ...] | None:
        """Every replica's row count, if this replica's static batch size `rows` implies
        it (inside a step of Keras' fit), else None: the gather then exchanges them.
        A distributed dataset gives every replica the same element spec."""
        return None if rows is None else (rows,) * self.size

    def all_gather(self, value, replica_rows=None):
        """Concatenates every replica's `value` along axis 0, in replica order.

        Differentiable: the backward pass sums the incoming gradients over replicas and
        returns each replica its own rows. `replica_rows` (each replica's row count,
        when the caller knows it) saves the backend a collective.
        """
        return value

    def all_reduce_sum(self, value):
        return value

    def apply_gradients(self, optimizer, grads, variables, only_if=None) -> None:
        """Applies this replica's gradients; they are summed over replicas first.

        `only_if`: a boolean tensor, the same on every replica; when False nothing is
        applied (no weight, slot or step counter changes)."""
        applied_if(only_if, lambda: optimizer.apply(grads, variables))

    def sum_gradients(self, grads):
        """This replica's gradients summed over all replicas (for checks and logging)."""
        return grads


class MirroredReplicas(Replicas):
    """tf.distribute (MirroredStrategy on one node, MultiWorkerMirroredStrategy across)."""

    def __init__(self, strategy: tf.distribute.Strategy, name: str, rank: int = 0):
        self.strategy = strategy
        self.name = name
        self._rank = rank
        self._host_sum = _host_summer(strategy) if name == "mirrored" else None

    @property
    def size(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def rank(self) -> int:
        return self._rank

    def scope(self):
        return self.strategy.scope()

    def broadcast_variables(self, variables) -> None:
        """MultiWorkerMirrored: each worker restored what its own disk holds; the
        chief's values reach all (one host all-reduce of the chief's values and the
        others' zeros; exact, float64 holds every float32 and int32). One process: its
        replicas are mirrored already."""
        if self.processes == 1 or not variables:
            return
        values = [np.asarray(v.numpy()) for v in variables]
        flat = np.concatenate([np.ravel(v).astype(np.float64) for v in values])
        summed = self._chief_array(flat, len(flat))
        start = 0
        for variable, value in zip(variables, values, strict=True):
            variable.assign(
                summed[start : start + value.size].reshape(value.shape).astype(value.dtype)
            )
            start += value.size

    def agree(self, value):
        if self.processes == 1:
            return value
        data = np.frombuffer(pickle.dumps(value), np.uint8) if self.is_chief else None
        size = int(self.sum_over_processes([len(data) if self.is_chief else 0])[0])
        return pickle.loads(self._chief_array(data, size).astype(np.uint8).tobytes())

    def _chief_array(self, array, size: int) -> np.ndarray:
        """The chief's 1-D `array` of `size` on every process: one host all-reduce of it
        and the other processes' zeros (exact in float64)."""
        return self.sum_over_processes(array if self.is_chief else np.zeros(size))

    def sum_over_processes(self, array) -> np.ndarray:
        array = np.asarray(array, np.float64)
        if self.local_replicas == self.size:  # one process: nothing to ask
            return array
        zeros = np.zeros_like(array)  # the first local replica carries the process's value
        value = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(
                array if ctx.replica_id_in_sync_group == self.first_local_replica else zeros
            )
        )
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None).numpy()

    def local_devices(self) -> list:
        return list(self.strategy.extended.worker_devices)

    def local_replica_index(self) -> int:
        # The public replica_id_in_sync_group is a tensor; a shard is picked in Python.
        global_index = tf.distribute.get_replica_context()._replica_id_in_sync_group
        return int(global_index) - self.first_local_replica

    def gather_process_rows(self, array) -> np.ndarray:
        array = np.asarray(array)
        if self.processes == 1:
            return array
        # MultiWorkerMirrored has no host all-gather: a sum of zero-padded copies.
        counts = self.sum_over_processes(np.eye(self.processes)[self.rank] * len(array))
        counts = counts.astype(np.int64)
        start = int(counts[: self.rank].sum())
        padded = np.zeros((int(counts.sum()), *array.shape[1:]))
        padded[start : start + len(array)] = array
        return self.sum_over_processes(padded).astype(array.dtype)

    @property
    def local_replicas(self) -> int:
        return len(self.strategy.extended.worker_devices)

    def distribute(self, *local_arrays, global_size: int):
        local_arrays = [tf.convert_to_tensor(a) for a in local_arrays]
        bounds = slice_bounds(global_size, self.size)
        offset = bounds[self.first_local_replica][0]

        def part(ctx):
            start, end = bounds[ctx.replica_id_in_sync_group]
            return tuple(a[start - offset : end - offset] for a in local_arrays)

        return self.strategy.experimental_distribute_values_from_function(part)

    def run(self, fn, args=(), kwargs=None):
        return self.strategy.run(fn, args=args, kwargs=kwargs)

    def local_results(self, value) -> list:
        return list(self.strategy.experimental_local_results(value))

    def replica_index(self):
        return tf.distribute.get_replica_context().replica_id_in_sync_group

    def all_gather(self, value, replica_rows=None):
        # Each replica places its rows in a zero tensor of the global shape, and a
        # summing all-reduce joins them. Adding zeros is exact, and the backward pass is
        # the summing all-reduce followed by our slice: one collective each way, where
        # ReplicaContext.all_gather takes two forward and two backward. Unknown row
        # counts (Keras' fit) cost one small all-reduce more.
        me = tf.distribute.get_replica_context().replica_id_in_sync_group
        if replica_rows is None:
            mine = tf.one_hot(me, self.size, dtype=tf.int32) * tf.shape(value)[0]
            rows = self.all_reduce_sum(mine)
        else:
            rows = tf.constant(replica_rows, tf.int32)
        start = tf.reduce_sum(rows[:me])
        after = tf.reduce_sum(rows) - start - tf.shape(value)[0]
        padding = tf.concat([[[start, after]], tf.zeros([tf.rank(value) - 1, 2], tf.int32)], 0)
        return self.all_reduce_sum(tf.pad(value, padding))

    def all_reduce_sum(self, value):
        # Differentiable either way: the gradient of a sum over replicas is the same sum.
        if self._host_sum is not None:
            return self._host_sum(value)
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, value)

    def apply_gradients(self, optimizer, grads, variables, only_if=None) -> None:
        # Keras 3's optimizer sums gradients over replicas inside `apply` (replica context).
        if only_if is None:
            optimizer.apply(grads, variables)
            return

        # `apply` synchronizes through a merge_call, which TensorFlow refuses inside a
        # cond of a replica context: decide in the cross-replica context, as Keras'
        # LossScaleOptimizer does.
        def decide(strategy, grads, only_if):
            verdict = strategy.experimental_local_results(only_if)[0]  # the same on all
            tf.cond(
                verdict,
                lambda: strategy.extended.call_for_each_replica(
                    optimizer.apply, args=(grads, variables)
                ),
                lambda: None,
            )

        tf.distribute.get_replica_context().merge_call(decide, args=(grads, only_if))

    def sum_gradients(self, grads):
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)


def _host_summer(strategy: tf.distribute.Strategy):
    """A sum over replicas that adds on the first device, for a MirroredStrategy whose
    replicas are all CPUs of this process; None for any other strategy.

    Such replicas share one memory, and TensorFlow's collective ops (what
    `MirroredStrategy()` picks there) cost about 0.25 ms of hand-offs between executor
    threads per call: eleven chained sums of 96 × 145 floats took 3.5 ms with them and
    0.5 ms added on one device. The step's own sums (the key gather, both ways, and the
    statistics) take this path; the optimizer's gradient all-reduce stays the strategy's.
    """
    devices = list(strategy.extended.worker_devices)
    on_cpus = all(tf.DeviceSpec.from_string(d).device_type == "CPU" for d in devices)
    if len(devices) < 2 or not on_cpus:
        return None
    reducer = tf.distribute.ReductionToOneDevice(reduce_to_device=devices[0])

    def summed(value):
        @tf.custom_gradient
        def sum_over_replicas(local):
            total = tf.distribute.get_replica_context().merge_call(
                lambda _, per_replica: reducer.reduce(
                    tf.distribute.ReduceOp.SUM, per_replica, destinations=per_replica
                ),
                args=(local,),
            )
            return total, summed

        return sum_over_replicas(value)

    return summed


class HorovodReplicas(Replicas):
    """One replica per `horovodrun` process; collectives through Horovod (Gloo or MPI)."""

    name = "horovod"

    def __init__(self, timeout_seconds: float = collective_timeout.DEFAULT_SECONDS):
        import horovod.tensorflow as hvd

        self.hvd = hvd
        # horovodrun with a host-discovery script: ranks and size change during the job.
        self.elastic = os.environ.get("HOROVOD_ELASTIC") == "1"
        if self.elastic:
            # An elastic job keeps Gloo's 30 s for its collectives: after a peer died, a
            # worker whose partner in the ring already went to the rendezvous waits on it
            # until Gloo gives up (with 600 s the job stalled 600 s: test_elastic, killing
            # a worker of a 3-worker job). A silent worker is then waited for at the
            # rendezvous for `timeout_seconds` before its guard ends it (elastic_guard.py),
            # so a shorter pause is survived there: the job goes back to its last commit.
            self.timeout_seconds = collective_timeout.ELASTIC_SECONDS
            self.wait_for_silent_seconds = timeout_seconds
        else:
            self.timeout_seconds = timeout_seconds
            collective_timeout.set_horovod_environment(timeout_seconds)
        hvd.init()
        place(per_worker=True, local_rank=hvd.local_rank(), local_size=hvd.local_size())

    @property
    def size(self) -> int:
        return self.hvd.size()

    @property
    def rank(self) -> int:
        return self.hvd.rank()

    def broadcast_variables(self, variables) -> None:
        # Keras 3 variables lack `.ref()`; Horovod needs the underlying tf.Variables.
        plain = [v.value if isinstance(v, keras.Variable) else v for v in variables]
        self.hvd.broadcast_variables(plain, root_rank=0)

    def agree(self, value):
        return self.hvd.broadcast_object(value, root_rank=0)

    def gather_process_rows(self, array) -> np.ndarray:
        return self.hvd.allgather(tf.convert_to_tensor(array)).numpy()

    def sum_over_processes(self, array) -> np.ndarray:
        array = tf.constant(np.asarray(array, np.float64))
        return self.hvd.allreduce(array, op=self.hvd.Sum).numpy()

    def replica_index(self):
        return tf.constant(self.rank)

    def rows_from_static_shape(self, rows: int | None) -> None:
        return None  # each worker feeds its own batches, perhaps of other sizes

    def all_gather(self, value, replica_rows=None):
        hvd = self.hvd
        if not value.dtype.is_floating:
            return hvd.allgather(value)

        @tf.custom_gradient
        def gather(local):
            # Horovod's own allgather gradient *averages* over workers, which leaves the
            # key-side gradient N times too small: sum, then take this worker's rows.
            rows = tf.shape(local)[:1]
            if replica_rows is None:
                start = tf.reduce_sum(hvd.allgather(rows)[: hvd.rank()])
            else:
                start = tf.constant(sum(replica_rows[: hvd.rank()]), tf.int32)

            def grad(upstream):
                total = hvd.allreduce(upstream, op=hvd.Sum)
                return total[start : start + rows[0]]

            return hvd.allgather(local), grad

        return gather(value)

    def all_reduce_sum(self, value):
        return self.hvd.allreduce(value, op=self.hvd.Sum)

    def apply_gradients(self, optimizer, grads, variables, only_if=None) -> None:
        summed = self.sum_gradients(grads)  # on every worker, whatever the verdict
        applied_if(only_if, lambda: optimizer.apply(summed, variables))

    def sum_gradients(self, grads):
        return self.hvd.grouped_allreduce(list(grads), op=self.hvd.Sum)


@functools.cache
def _default_gpu() -> str | None:
    """The GPU a one-replica process computes on (a Horovod worker sees only its own,
    see trainer/backends/placement.py), or None on a CPU."""
    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else None


def applied_if(condition, apply) -> None:
    """`apply()` when `condition` (a boolean tensor, or None for always)."""
    if condition is None:
        apply()
    else:
        tf.cond(condition, apply, lambda: None)


def launched_by_horovodrun() -> bool:
    return "HOROVOD_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


def from_context() -> Replicas:
    """The backend of a Keras model built now (see trainer/fit.py): the tf.distribute
    strategy whose scope is open, Horovod under horovodrun, else one device."""
    if tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return MirroredReplicas(strategy, "multi_worker", strategy.cluster_resolver.task_id)
        if isinstance(strategy, (tf.distribute.MirroredStrategy, tf.distribute.OneDeviceStrategy)):
            return MirroredReplicas(strategy, "mirrored")
        raise InputError(
            f"{type(strategy).__name__} is not supported; use MirroredStrategy, "
            "MultiWorkerMirroredStrategy or OneDeviceStrategy, or Horovod."
        )
    if launched_by_horovodrun():
        return HorovodReplicas()
    return Replicas()


@gin.configurable("distribute")
def make_replicas(
    strategy: str = "auto",
    cpu_replicas: int = 0,
    timeout_seconds: float = collective_timeout.DEFAULT_SECONDS,
) -> Replicas:
    """Builds the backend named by `distribute.strategy`.

    'auto': Horovod when launched by horovodrun, MirroredStrategy when more than one GPU
    (or `cpu_replicas` > 1) is visible, else a single device. A collective between
    processes that waits more than `timeout_seconds` ends the job (see
    trainer/backends/collective_timeout.py).
    """
    timeout_seconds = collective_timeout.checked(timeout_seconds)
    if strategy not in STRATEGIES:
        raise InputError(
            f"Unknown distribute.strategy {strategy!r}; valid values are "
            + ", ".join(repr(s) for s in STRATEGIES)
        )
    if cpu_replicas < 0:
        raise InputError(f"distribute.cpu_replicas must be >= 0, got {cpu_replicas}.")
    cpu_devices = configure_cpu_replicas(cpu_replicas) if cpu_replicas > 0 else None
    if strategy == "auto":
        if launched_by_horovodrun():
            strategy = "horovod"
        elif cpu_replicas > 1 or len(tf.config.list_physical_devices("GPU")) > 1:
            strategy = "mirrored"
        else:
            strategy = "single"
    if strategy == "horovod":
        return HorovodReplicas(timeout_seconds)  # each worker the GPU of its local rank
    place(per_worker=False)  # one process drives every GPU of its node
    if strategy == "single":
        return Replicas()
    if strategy == "mirrored":
        if cpu_devices:
            # Logical CPU devices share one memory: reducing on one device and copying
            # back beats the ring of collective ops (fewer hand-offs between threads).
            cpu_reduce = tf.distribute.ReductionToOneDevice(reduce_to_device=cpu_devices[0])
            return MirroredReplicas(
                tf.distribute.MirroredStrategy(cpu_devices, cross_device_ops=cpu_reduce),
                "mirrored",
            )
        return MirroredReplicas(tf.distribute.MirroredStrategy(), "mirrored")
    if "TF_CONFIG" not in os.environ:
        raise InputError(
            "distribute.strategy='multi_worker' needs the TF_CONFIG environment variable "
            "(the cluster and this worker's task, as MultiWorkerMirroredStrategy reads it)."
        )
    task = json.loads(os.environ["TF_CONFIG"]).get("task", {})
    replicas = MirroredReplicas(
        collective_timeout.multi_worker_strategy(timeout_seconds),
        "multi_worker",
        int(task.get("index", 0)),
    )
    replicas.timeout_seconds = timeout_seconds
    return replicas
