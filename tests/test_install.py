"""The install: Horovod was built with TensorFlow and Gloo, and its ops run."""

import os
import subprocess
import sys
from pathlib import Path

from tests.jobs import HOROVODRUN_2

BIN = Path(sys.executable).parent


def test_horovodrun_check_build_lists_tensorflow_and_gloo():
    out = subprocess.run(
        [str(BIN / "horovodrun"), "--check-build"], capture_output=True, text=True, check=True
    ).stdout
    lines = [line.strip() for line in out.splitlines()]
    assert "[X] TensorFlow" in lines
    assert "[X] Gloo" in lines
    assert "Horovod v0.28.1:" in lines


def test_horovod_allgather_and_allreduce_across_two_workers(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import tensorflow as tf, horovod.tensorflow as hvd\n"
        "hvd.init()\n"
        "x = tf.fill([hvd.rank() + 1, 2], float(hvd.rank()))\n"
        "g = hvd.allgather(x).numpy()\n"
        "s = hvd.allreduce(tf.constant(float(hvd.rank() + 1)), op=hvd.Sum).numpy()\n"
        "print(f'RESULT rank={hvd.rank()} size={hvd.size()} rows={g.shape[0]} sum={s}')\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [*HOROVODRUN_2, sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in (0, 1):
        assert f"RESULT rank={rank} size=2 rows=3 sum=3.0" in result.stdout


INSTALL_SH = Path(__file__).resolve().parent.parent / "launch" / "install.sh"


def plan(tmp_path, gpus=0, nccl=False, nvcc=True, **env) -> dict:
    """`launch/install.sh --plan` on a machine faked through PATH: an `nvidia-smi` that
    lists `gpus` GPUs, an `nvcc` that runs (or none), NCCL in a folder (or not found).
    Returns its lines as {decision: text}."""
    fake = tmp_path / "bin"
    fake.mkdir(parents=True, exist_ok=True)
    listing = "".join(
        f"echo 'GPU {i}: NVIDIA A100-SXM4-80GB (UUID: GPU-{i})'\n" for i in range(gpus)
    )
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + (listing or "echo 'No devices were found'; exit 6\n"))
    smi.chmod(0o755)
    cuda = tmp_path / "cuda"
    (cuda / "bin").mkdir(parents=True, exist_ok=True)
    if nvcc:
        (cuda / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, 12.4'\n")
        (cuda / "bin" / "nvcc").chmod(0o755)
    nccl_home = tmp_path / "nccl"
    (nccl_home / "include").mkdir(parents=True, exist_ok=True)
    (nccl_home / "lib").mkdir(exist_ok=True)
    if nccl:
        (nccl_home / "include" / "nccl.h").write_text("")
        (nccl_home / "lib" / "libnccl.so.2").write_text("")
    environment = {
        k: v for k, v in os.environ.items() if k not in ("TF_PACKAGE", "HOROVOD_GPU_OPERATIONS")
    }
    environment.update(
        PATH=f"{fake}:/usr/bin:/bin", CUDA_HOME=str(cuda), HOROVOD_NCCL_HOME=str(nccl_home), **env
    )
    done = subprocess.run(
        ["bash", str(INSTALL_SH), "--plan"], capture_output=True, text=True, env=environment
    )
    assert done.returncode == 0, done.stderr
    return dict(line.split(":", 1) for line in done.stdout.splitlines())


def test_plan_on_a_cpu_machine_is_the_cpu_build_without_gpu_operations(tmp_path):
    decided = plan(tmp_path, gpus=0)
    assert decided["machine"].strip() == "no GPU (nvidia-smi lists none)"
    assert decided["tensorflow"].strip() == "tensorflow-cpu==2.21.* (default for this machine)"
    assert decided["gpu operations"].strip().startswith("none (no GPU")
    assert decided["horovod wheel"].strip().endswith("-cpu")
    assert decided["faiss"].strip() == "faiss-cpu==1.15.1 (default for this machine)"


def test_plan_on_a_gpu_machine_with_nccl_is_the_cuda_build_with_nccl(tmp_path):
    decided = plan(tmp_path, gpus=8, nccl=True)
    assert decided["machine"].strip() == "8 GPU(s) listed by nvidia-smi"
    assert decided["tensorflow"].strip().startswith("tensorflow[and-cuda]==2.21.*")
    assert decided["gpu operations"].strip().startswith(f"NCCL (NCCL in {tmp_path / 'nccl'}")
    assert decided["horovod wheel"].strip().endswith("-nccl")
    assert decided["faiss"].strip() == "faiss-gpu-cu12==1.14.1.post1 (default for this machine)"


def test_plan_on_a_gpu_machine_without_nccl_says_so_plainly(tmp_path):
    decided = plan(tmp_path, gpus=2, nccl=False)
    assert decided["tensorflow"].strip().startswith("tensorflow[and-cuda]")
    ops = decided["gpu operations"].strip()
    assert ops.startswith("none (NOT NCCL: NCCL") and "host memory" in ops
    decided = plan(tmp_path / "no-nvcc", gpus=2, nccl=True, nvcc=False)
    assert "the CUDA toolkit's nvcc (set CUDA_HOME)" in decided["gpu operations"]


def test_plan_takes_the_users_tensorflow_package(tmp_path):
    decided = plan(tmp_path, gpus=4, nccl=True, TF_PACKAGE="tensorflow-cpu==2.21.*")
    assert decided["tensorflow"].strip() == "tensorflow-cpu==2.21.* (from TF_PACKAGE)"
    # A wheel built against one TensorFlow package is never reused for the other.
    assert "/horovod-0.28.1-tensorflow-cpu-2.21" in decided["horovod wheel"]
    cuda = plan(tmp_path, gpus=4, nccl=True, TF_PACKAGE="tensorflow[and-cuda]==2.21.*")
    assert "/horovod-0.28.1-tensorflow-2.21" in cuda["horovod wheel"]


def test_the_stamp_changes_with_the_tensorflow_package_and_gpu_operations(tmp_path):
    """This checkout's venv was installed with the defaults (`make test` installs first):
    the plan says it is up to date, and names what it installed; another TensorFlow
    package or other GPU operations would reinstall."""
    venv = plan(tmp_path)["venv"]
    assert venv.strip().startswith("up to date (TensorFlow 2.21")
    assert "CPU build" in venv and "Horovod 0.28.1 (frameworks TensorFlow;" in venv
    assert "PyTorch" not in venv  # --check-build claims it; torch is not installed
    assert venv.rstrip().endswith("faiss 1.15.1 CPU build; MkDocs 1.6.1 (Material 9.8.2))")
    other_package = plan(tmp_path, TF_PACKAGE="tensorflow[and-cuda]==2.21.*")["venv"]
    other_operations = plan(tmp_path, HOROVOD_GPU_OPERATIONS="NCCL")["venv"]
    for venv in (other_package, other_operations):
        assert venv.strip().startswith("install into the existing"), venv


def test_install_refuses_an_unknown_option():
    done = subprocess.run(["bash", str(INSTALL_SH), "--plam"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage: launch/install.sh [--plan]" in done.stderr
