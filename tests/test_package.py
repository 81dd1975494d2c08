"""The project as an installed package: the wheel holds losses, data, trainer and the
shipped job configs, and installed into a fresh virtual environment it runs the default
job and the README's `fit` example from a folder that is not the checkout."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from tests.doc_blocks import ROOT, python_blocks

PACKAGES = ("losses", "data", "trainer")


def build_wheel(tmp_path) -> Path:
    """The wheel of a copy of the project's files (a build writes into its source tree)."""
    source = tmp_path / "source"
    for name in (*PACKAGES, "gin"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         str(source), "-w", str(tmp_path / "dist")],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("metric_trainer-*.whl")
    return wheel


def fresh_venv_reusing_tensorflow(tmp_path) -> Path:
    """A new virtual environment that sees this one's installed packages (TensorFlow,
    Horovod, ...) through a .pth line, but not its editable install of the project."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    ask = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", ask], check=True, capture_output=True, text=True
    )
    site = Path(site.stdout.strip())
    (site / "reuse_tensorflow.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def fit_example() -> str:
    (block,) = [b for b in python_blocks(ROOT / "README.md") if "GlobalMiningModel(" in b.code]
    return block.code


def test_the_wheel_installed_in_a_fresh_venv_runs_the_job_and_the_fit_example(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for package in PACKAGES:
        assert f"{package}/__init__.py" in names
    for config in ("base", "digits", "sop", "cub200", "inshop", "faces"):
        assert f"trainer/configs/{config}.gin" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "gin/"))]

    venv = fresh_venv_reusing_tensorflow(tmp_path)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"

    def run(*args, timeout=300):
        done = subprocess.run(
            [python, *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    where = run("-c", "import losses, trainer; from trainer.job_config import resolve_gin_file;"
                      "print(losses.__file__); print(resolve_gin_file('sop'))")  # fmt: skip
    site = str(venv / "lib")
    assert all(line.startswith(site) for line in where.split()), where  # not the checkout's
    assert where.split()[1].endswith("trainer/configs/sop.gin")

    run("-m", "trainer.main", "--gin_param=train.steps=2", "--workdir=job")
    assert (work / "job" / "results.json").is_file()
    assert (work / "job" / "saved_model" / "saved_model.pb").is_file()

    (work / "fit_example.py").write_text(fit_example())
    printed = run("fit_example.py")
    assert "[" in printed  # the example prints the logged fractions, one per epoch
    assert (work / "embedding_net.keras").is_file()
