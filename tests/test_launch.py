"""The launch scripts that the backend tests do not already start: mirrored.sh and
slurm.sbatch (run outside SLURM with a stand-in `scontrol` naming this machine)."""

import os

import pytest

from tests.jobs import HOROVOD_SH, ROOT, run_job, scalars

SHORT = ("train.steps=3", "train.log_every=1", "train.eval_every=1000", "export.enabled=False")


def test_mirrored_script_runs_mirrored_strategy(tmp_path):
    launcher = (os.path.join(ROOT, "launch", "mirrored.sh"),)
    done = run_job(tmp_path, SHORT + ("distribute.cpu_replicas=2",), launcher)
    assert "replicas: 2 (mirrored)" in done.stdout
    assert sorted(scalars(tmp_path, "train/loss")) == [1, 2, 3]


def test_slurm_script_builds_the_hosts_file_and_runs_horovod(tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    scontrol.write_text("#!/bin/sh\necho localhost\n")  # `scontrol show hostnames` of 1 node
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[1]")
    monkeypatch.setenv("SLURM_GPUS_PER_NODE", "gpu:2")
    monkeypatch.setenv("SLURM_SUBMIT_DIR", ROOT)
    launcher = ("bash", os.path.join(ROOT, "launch", "slurm.sbatch"))
    workdir = tmp_path / "run"
    done = run_job(workdir, SHORT, launcher)
    assert "workers: 1 nodes x 2 GPUs" in done.stdout
    assert "replicas: 2 (horovod)" in done.stdout
    assert sorted(scalars(workdir, "train/loss")) == [1, 2, 3]


@pytest.mark.parametrize("script", ["horovod.sh", "multi_worker.sh"])
def test_launch_scripts_explain_their_usage(script):
    import subprocess

    done = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", script)], capture_output=True, text=True
    )
    assert done.returncode == 2 and "usage: launch/" in done.stderr


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--elastic", "2", "1", "/bin/true"], "usage: launch/horovod.sh"),  # MIN > MAX
        (["--elastic", "0", "2", "/bin/true"], "usage: launch/horovod.sh"),
        (["--elastic", "1", "2"], "usage: launch/horovod.sh"),
        (["--elastic", "1", "2", "/no/such/discover.sh"], "is not an executable file"),
    ],
)
def test_elastic_launch_mistakes_are_named(arguments, message):
    import subprocess

    done = subprocess.run(["bash", HOROVOD_SH, *arguments], capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr, done.stderr
