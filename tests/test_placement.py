"""GPU placement (trainer/backends/placement.py) over injected device lists: what each process
makes visible to TensorFlow. No GPU has run this here; the logic is the function the
trainer, `GlobalMiningModel` and the doctor call, with `tf.config` replaced by a
recorder."""

import dataclasses
import subprocess
import sys

import pytest

from trainer.backends import placement
from trainer.backends.placement import PlacementError, choose_gpus, place, place_worker


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    device_type: str = "GPU"


class FakeConfig:
    """The part of `tf.config` that placement uses, on a host with `count` GPUs."""

    def __init__(self, count, initialized_with=None):
        self.gpus = [Device(f"/physical_device:GPU:{i}") for i in range(count)]
        self.visible = None
        self.growth = []
        self.initialized_with = initialized_with  # visible GPUs if already initialized
        self.experimental = self

    def list_physical_devices(self, kind):
        assert kind == "GPU"
        return list(self.gpus)

    def set_visible_devices(self, devices, kind):
        assert kind == "GPU"
        if self.initialized_with is not None:
            raise RuntimeError("Visible devices cannot be modified after being initialized")
        self.visible = list(devices)

    def get_visible_devices(self, kind):
        return list(self.initialized_with if self.initialized_with is not None else self.gpus)

    def set_memory_growth(self, device, enabled):
        assert enabled is True
        self.growth.append(device)


GPUS = [f"GPU:{i}" for i in range(8)]


@pytest.mark.parametrize("rank", range(8))
def test_each_horovod_worker_gets_the_gpu_of_its_local_rank(rank):
    assert choose_gpus(GPUS, per_worker=True, local_rank=rank, local_size=8) == [GPUS[rank]]


def test_one_process_of_mirrored_or_multi_worker_uses_every_visible_gpu():
    assert choose_gpus(GPUS, per_worker=False) == GPUS
    assert choose_gpus(GPUS[:3], per_worker=False) == GPUS[:3]


def test_no_gpu_means_the_cpu_for_every_backend():
    assert choose_gpus([], per_worker=True, local_rank=5, local_size=8) == []
    assert choose_gpus([], per_worker=False) == []


def test_a_host_with_fewer_gpus_than_workers_is_refused_in_one_line():
    with pytest.raises(PlacementError) as raised:
        choose_gpus(GPUS[:4], per_worker=True, local_rank=0, local_size=8, host="node3")
    assert str(raised.value) == "8 workers on host node3, 4 GPUs visible"


def test_cuda_visible_devices_is_respected_through_the_listed_gpus():
    # CUDA_VISIBLE_DEVICES=4,5 (SLURM's share of the node): TensorFlow lists two GPUs,
    # and local ranks 0 and 1 take them in order.
    shared = ["GPU:0", "GPU:1"]  # TensorFlow renumbers the visible ones
    assert choose_gpus(shared, True, local_rank=1, local_size=2) == ["GPU:1"]


def test_place_makes_one_gpu_visible_with_memory_growth_on():
    config = FakeConfig(8)
    chosen = place(True, local_rank=3, local_size=8, config=config)
    assert [d.name for d in chosen] == ["/physical_device:GPU:3"]
    assert config.visible == chosen and config.growth == chosen


def test_place_for_mirrored_keeps_every_gpu_with_memory_growth_on():
    config = FakeConfig(4)
    chosen = place(False, config=config)
    assert config.visible == config.gpus == chosen and config.growth == config.gpus


def test_place_on_a_cpu_machine_changes_nothing():
    config = FakeConfig(0)
    assert place(True, local_rank=1, local_size=2, config=config) == []
    assert config.visible is None and config.growth == []


def test_place_again_after_initialization_is_fine_when_nothing_would_change():
    config = FakeConfig(8)
    first = place(True, local_rank=2, local_size=8, config=config)
    config.initialized_with = first
    assert place(True, local_rank=2, local_size=8, config=config) == first


def test_place_after_tensorflow_took_every_gpu_says_what_to_call_earlier():
    config = FakeConfig(8, initialized_with=[Device(f"/physical_device:GPU:{i}") for i in range(8)])
    with pytest.raises(PlacementError, match=r"place_worker\(\) \(or import trainer.fit\) before"):
        place(True, local_rank=2, local_size=8, config=config)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"HOROVOD_LOCAL_RANK": "5", "HOROVOD_LOCAL_SIZE": "8"}, "/physical_device:GPU:5"),
        ({"OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, None),
        ({}, None),
    ],
)
def test_place_worker_reads_the_local_rank_horovodrun_or_mpirun_set(monkeypatch, env, expected):
    for name in (
        "HOROVOD_LOCAL_RANK",
        "HOROVOD_LOCAL_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = FakeConfig(8)
    chosen = [d.name for d in place_worker(config)]
    if expected:
        assert chosen == [expected]
    elif env:  # mpirun, local rank 1 of 2
        assert chosen == ["/physical_device:GPU:1"]
    else:  # no launcher: one process, every GPU
        assert len(chosen) == 8


def test_a_cpu_build_on_a_gpu_machine_is_named(monkeypatch):
    monkeypatch.setattr(placement.tf.sysconfig, "get_build_info", lambda: {"is_cuda_build": False})
    warning = placement.cpu_only_warning(["GPU 0: A100", "GPU 1: A100"], [])
    assert "nvidia-smi lists 2 GPU(s) but TensorFlow sees none" in warning
    assert "CPU build" in warning and "make install" in warning
    assert placement.cpu_only_warning(["GPU 0: A100"], ["GPU:0"]) is None
    assert placement.cpu_only_warning([], []) is None


def test_nvidia_smi_gpus_reads_the_listing(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA A100 (UUID: GPU-1)'\necho 'GPU 1: A100'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert len(placement.nvidia_smi_gpus()) == 2


def test_the_trainer_and_fit_place_workers_through_this_module():
    """Under horovodrun, importing trainer.fit places the worker before any model is
    built; the trainer's Horovod backend does it after hvd.init (checked here on the
    CPU, where there is no GPU to give out: the call must still succeed)."""
    code = (
        "import os; os.environ.update(HOROVOD_RANK='0', HOROVOD_LOCAL_RANK='0', "
        "HOROVOD_LOCAL_SIZE='1')\n"
        "import trainer.backends.placement as p\n"
        "calls = []\n"
        "original = p.place\n"
        "p.place = lambda *a, **k: calls.append((a, k)) or original(*a, **k)\n"
        "import trainer.fit\n"
        "print('PLACED', calls)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "PLACED [((True, 0, 1), {'config':" in done.stdout, done.stderr[-2000:]
