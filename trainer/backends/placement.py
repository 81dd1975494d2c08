"""Which GPUs each process uses, decided before TensorFlow initializes them.

`horovodrun` starts one process per GPU but sets no `CUDA_VISIBLE_DEVICES`, and
TensorFlow maps nearly all memory of every GPU it sees: left alone, 8 workers each grab
all 8 GPUs (out of memory at start, or everyone on GPU 0). So a Horovod worker sees
only the GPU of its local rank; MirroredStrategy and MultiWorkerMirrored use every
visible GPU of their node. `CUDA_VISIBLE_DEVICES` set by the user or by SLURM is
respected because TensorFlow lists only those GPUs. Memory growth is on for every GPU
used, so a process takes what it needs rather than the whole card.

`choose_gpus` is the decision, a pure function over a device list (tested on CPU);
`place` applies it through `tf.config` (or an injected stand-in).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import tensorflow as tf

from data.errors import InputError


class PlacementError(InputError):
    """The GPUs of this host cannot be given out as the job asks."""


def choose_gpus(
    gpus: list, per_worker: bool, local_rank: int = 0, local_size: int = 1, host: str | None = None
) -> list:
    """The GPUs one process uses, out of the `gpus` it sees.

    `per_worker` (Horovod): the GPU of `local_rank`, and a host with fewer GPUs than its
    `local_size` workers is refused. Otherwise (one process driving every replica of
    the node): all of them. No GPU: an empty list (the CPU).
    """
    gpus = list(gpus)
    if not gpus or not per_worker:
        return gpus
    if local_size > len(gpus):
        raise PlacementError(
            f"{local_size} workers on host {host or socket.gethostname()}, {len(gpus)} GPUs visible"
        )
    if not 0 <= local_rank < local_size:
        raise PlacementError(f"local rank {local_rank} is outside 0..{local_size - 1}")
    return [gpus[local_rank]]


def horovod_local_rank() -> tuple[int, int] | None:
    """(local rank, local size) from the environment horovodrun (Gloo) or mpirun set,
    readable before Horovod starts; None outside them."""
    for rank, size in (
        ("HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ):
        if rank in os.environ and size in os.environ:
            return int(os.environ[rank]), int(os.environ[size])
    return None


def place(per_worker: bool, local_rank: int = 0, local_size: int = 1, config=tf.config) -> list:
    """Makes only the chosen GPUs visible to TensorFlow, with memory growth on; returns them.

    Must run before TensorFlow initializes its GPUs (before any op or model). If they are
    already initialized with exactly the chosen ones visible (a second call), nothing
    changes; any other visible set is an error that says what to call earlier.
    """
    gpus = config.list_physical_devices("GPU")
    chosen = choose_gpus(gpus, per_worker, local_rank, local_size)
    if not gpus:
        return []
    try:
        config.set_visible_devices(chosen, "GPU")
        for gpu in chosen:
            config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as error:  # TensorFlow's GPUs are initialized already
        visible = list(config.get_visible_devices("GPU"))
        if [d.name for d in visible] != [d.name for d in chosen]:
            raise PlacementError(
                f"this process must use {[d.name for d in chosen]} but TensorFlow already "
                f"initialized {[d.name for d in visible]} ({error}). Call "
                "trainer.backends.placement.place_worker() (or import trainer.fit) before building "
                "any model or running any TensorFlow op."
            ) from error
    return chosen


def place_worker(config=tf.config) -> list:
    """The placement of this process: one GPU per worker under horovodrun, else all."""
    local = horovod_local_rank()
    if local is None:
        return place(per_worker=False, config=config)
    return place(True, *local, config=config)


def nvidia_smi_gpus() -> list[str]:
    """The GPUs `nvidia-smi -L` lists (the driver's view, whatever TensorFlow was built
    for); empty when there is no nvidia-smi or it fails."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listed = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]


def cpu_only_warning(driver_gpus: list[str], tensorflow_gpus: list) -> str | None:
    """Why a machine with GPUs would train on its CPU, or None: the driver lists GPUs
    but this TensorFlow sees none (a CPU build, or CUDA libraries missing)."""
    if not driver_gpus or tensorflow_gpus:
        return None
    build = tf.sysconfig.get_build_info()
    why = (
        "this TensorFlow is a CPU build"
        if not build.get("is_cuda_build")
        else "TensorFlow's CUDA libraries did not load"
    )
    return (
        f"nvidia-smi lists {len(driver_gpus)} GPU(s) but TensorFlow sees none ({why}); the "
        "job runs on the CPU. Run `make install` again on this machine (it picks "
        "tensorflow[and-cuda] where nvidia-smi lists GPUs), then `python -m trainer.doctor`."
    )
