"""The install: Horovod was built with TensorFlow and Gloo, and its ops run."""

import os
import subprocess
import sys
from pathlib import Path

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
        [
            str(BIN / "horovodrun"),
            "-np",
            "2",
            "--gloo",
            "-H",
            "localhost:2",
            sys.executable,
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in (0, 1):
        assert f"RESULT rank={rank} size=2 rows=3 sum=3.0" in result.stdout
