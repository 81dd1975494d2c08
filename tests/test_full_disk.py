"""A full disk mid-run: one line naming the path, the error and the last complete
checkpoint, exit status 4, nothing half-written; after freeing space the same command
resumes and ends exactly as an uninterrupted run. The workdir is a small tmpfs."""

import contextlib
import errno
import os
import subprocess

import numpy as np
import tensorflow as tf

from tests.jobs import run_job, scalars
from trainer.outputs import disk_space

JOB = (
    "distribute.strategy='single'",
    "train.steps=30",
    "train.checkpoint_every=5",
    "train.log_every=1",
    "train.eval_every=1000",
    "export.enabled=False",
)


@contextlib.contextmanager
def small_tmpfs(path, size):
    """A tmpfs of `size` mounted at `path` (this machine's tests run as root)."""
    os.makedirs(path)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    assert mounted.returncode == 0, f"cannot mount a tmpfs (root is needed): {mounted.stderr}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_errors_out_of_space_are_recognised_through_their_causes():
    def raised_from(cause):
        try:
            try:
                raise cause
            except Exception as error:
                raise RuntimeError("while saving") from error
        except RuntimeError as outer:
            return outer

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/w/cache/x.npy")
    assert disk_space.out_of_space(raised_from(full)) == ("/w/cache/x.npy", os.strerror(28))
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/w/events")
    assert disk_space.out_of_space(quota) == ("/w/events", os.strerror(errno.EDQUOT))
    op = tf.errors.ResourceExhaustedError(
        None,
        None,
        "{{function_node __wrapped__SaveV2}} /w/checkpoints/ckpt-15_temp/part-00000-of-00001"
        ".data-00000-of-00001.tempstate181; No space left on device [Op:SaveV2]",
    )
    assert disk_space.out_of_space(op) == ("/w/checkpoints/ckpt-15", "No space left on device")
    unnamed = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # numpy.savetxt's
    assert disk_space.out_of_space(unnamed) == (None, os.strerror(errno.ENOSPC))
    assert "writing a file under /w:" in disk_space.message(None, os.strerror(28), "/w")
    assert disk_space.out_of_space(OSError(errno.EIO, "I/O error", "/w/x")) is None
    assert disk_space.out_of_space(tf.errors.ResourceExhaustedError(None, None, "OOM")) is None


def test_a_full_disk_is_said_plainly_and_a_rerun_after_freeing_space_resumes_exactly(tmp_path):
    straight = tmp_path / "straight"
    run_job(straight, JOB)
    with small_tmpfs(tmp_path / "small", "5m") as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\1" * 3584 * 1024)  # leaves room for about three checkpoints
        workdir = disk / "job"
        failed = run_job(workdir, JOB, check=False)
        assert failed.returncode == disk_space.EXIT_STATUS, failed.stderr[-3000:]
        assert "Traceback" not in failed.stderr
        last_line = failed.stderr.strip().splitlines()[-1]
        checkpoints = workdir / "checkpoints"
        last = tf.train.latest_checkpoint(str(checkpoints))
        assert last is not None
        assert last_line.startswith("error: No space left on device writing ")
        assert str(workdir) in last_line
        assert f"the last complete checkpoint is {last}" in last_line
        assert "run the same command: it resumes from there" in last_line
        # Nothing half-written: only complete checkpoints' files and the index.
        for name in os.listdir(checkpoints):
            assert name == "checkpoint" or name.split(".")[0] in {
                os.path.basename(p)
                for p in tf.train.get_checkpoint_state(checkpoints).all_model_checkpoint_paths
            }, name
        stopped_at = int(last.rsplit("-", 1)[1])
        assert stopped_at < 30

        filler.unlink()
        resumed = run_job(workdir, JOB)
        assert f"at step {stopped_at}" in resumed.stdout
        got, expected = scalars(workdir, "train/loss"), scalars(straight, "train/loss")
    assert sorted(got) == list(range(1, 31))
    for step in range(stopped_at + 1, 31):
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-4)
