"""A checkpoint torn after it was complete: the newest one that reads whole is used, the
torn ones are named and moved aside (never deleted), and none readable is exit 2."""

import os

import numpy as np
import pytest
import tensorflow as tf

from data import cached_work
from data.errors import InputError
from tests.jobs import run_job, scalars
from trainer.backends.replicas import make_replicas
from trainer.outputs.checkpoints import TORN, Checkpoints, unreadable


def _truncate(prefix):
    data = f"{prefix}.data-00000-of-00001"
    os.truncate(data, os.path.getsize(data) // 2)


def _zero_a_block(prefix):
    with open(f"{prefix}.data-00000-of-00001", "r+b") as f:
        f.seek(512)
        f.write(b"\0" * 4096)


def _remove_index(prefix):
    os.remove(f"{prefix}.index")


CORRUPTIONS = {"truncated": _truncate, "zeroed block": _zero_a_block, "no index": _remove_index}


def _checkpoints(directory, value):
    weights = tf.Variable(tf.fill([2000], value))  # 8 kB: the zeroed block falls inside it
    return Checkpoints(str(directory), make_replicas("single"), keep=3, weights=weights), weights


def _two_saved(directory):
    """ckpt-1 holding 1.0 everywhere and ckpt-2 holding 2.0."""
    for step in (1, 2):
        checkpoints, _ = _checkpoints(directory, float(step))
        checkpoints.save(step)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_the_newest_readable_checkpoint_is_restored_and_the_torn_one_moved_aside(
    tmp_path, capsys, corruption
):
    _two_saved(tmp_path)
    CORRUPTIONS[corruption](str(tmp_path / "ckpt-2"))
    assert unreadable(str(tmp_path / "ckpt-2")) is not None
    assert unreadable(str(tmp_path / "ckpt-1")) is None

    checkpoints, weights = _checkpoints(tmp_path, 0.0)
    assert checkpoints.restore([weights]) == 1
    np.testing.assert_array_equal(weights.numpy(), np.ones(2000, np.float32))
    warning = capsys.readouterr().err
    assert "checkpoint" in warning and "ckpt-2 cannot be read" in warning
    assert "resuming from ckpt-1" in warning
    # Moved, not deleted: every file that was there is in torn/.
    aside = sorted(os.listdir(tmp_path / TORN))
    assert aside and all(name.startswith("ckpt-2.") for name in aside)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("ckpt-2.")]
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-1")
    # The job goes on: the next save at step 2 is the newest again and reads.
    checkpoints.save(2)
    assert checkpoints.manager.checkpoints[-1].endswith("ckpt-2")
    assert unreadable(checkpoints.latest) is None


def test_an_index_naming_only_the_latest_checkpoint_resumes_from_it(tmp_path):
    """A hand-written `checkpoint` file (model_checkpoint_path alone) still counts."""
    _two_saved(tmp_path)
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-2"\n')
    checkpoints, weights = _checkpoints(tmp_path, 0.0)
    assert checkpoints.restore([weights]) == 2
    np.testing.assert_array_equal(weights.numpy(), np.full(2000, 2.0, np.float32))


def test_no_readable_checkpoint_is_an_error_naming_them_and_moves_nothing(tmp_path):
    _two_saved(tmp_path)
    _truncate(str(tmp_path / "ckpt-2"))
    _remove_index(str(tmp_path / "ckpt-1"))
    before = sorted(os.listdir(tmp_path))
    checkpoints, weights = _checkpoints(tmp_path, 0.0)
    with pytest.raises(InputError, match=r"no checkpoint in .* can be read: ckpt-2 \(.*ckpt-1"):
        checkpoints.restore([weights])
    assert sorted(os.listdir(tmp_path)) == before


def test_a_job_resumes_exactly_from_the_checkpoint_before_a_torn_one(tmp_path):
    params = (
        "distribute.strategy='single'",
        "train.steps=20",
        "train.checkpoint_every=10",
        "train.log_every=1",
        "train.eval_every=1000",
        "export.enabled=False",
    )
    run_job(tmp_path, params)
    first = scalars(tmp_path, "train/loss")
    _truncate(str(tmp_path / "checkpoints" / "ckpt-20"))
    resumed = run_job(tmp_path, params)
    assert "ckpt-10 at step 10" in resumed.stdout, resumed.stdout[-2000:]
    assert "ckpt-20 cannot be read (" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert os.listdir(tmp_path / "checkpoints" / TORN)
    again = scalars(tmp_path, "train/loss")
    for step in range(11, 21):
        np.testing.assert_allclose(again[step], first[step], rtol=1e-4)
    assert unreadable(str(tmp_path / "checkpoints" / "ckpt-20")) is None

    # Every checkpoint torn: exit 2 naming them, no traceback.
    for step in (10, 20):
        _truncate(str(tmp_path / "checkpoints" / f"ckpt-{step}"))
    failed = run_job(tmp_path, params, check=False)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "error: no checkpoint in" in failed.stderr and "ckpt-20 (" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_a_torn_class_centre_file_sends_the_job_back_to_the_checkpoint_before(tmp_path):
    """A proxy loss's centres are saved beside the checkpoint (centres-<step>): torn, the
    whole checkpoint of that step is set aside, centres and all."""
    params = (
        "train.loss=@ArcFaceLoss()",
        "ArcFaceLoss.scale=16.0",
        "ArcFaceLoss.num_classes=20",
        "distribute.strategy='mirrored'",
        "distribute.cpu_replicas=2",
        "train.steps=12",
        "train.checkpoint_every=6",
        "train.log_every=1",
        "train.eval_every=1000",
        "export.enabled=False",
    )
    run_job(tmp_path, params)
    first = scalars(tmp_path, "train/loss")
    checkpoints = tmp_path / "checkpoints"
    _zero_a_block(str(checkpoints / "centres-12"))
    resumed = run_job(tmp_path, params)
    assert "ckpt-6 at step 6" in resumed.stdout, resumed.stdout[-2000:]
    assert "ckpt-12 cannot be read (its centres centres-12: " in resumed.stderr
    moved = sorted(os.listdir(checkpoints / TORN))
    assert any(name.startswith("centres-12.") for name in moved), moved
    assert any(name.startswith("ckpt-12.") for name in moved), moved
    again = scalars(tmp_path, "train/loss")
    for step in range(7, 13):
        np.testing.assert_allclose(again[step], first[step], rtol=1e-4)
    # The checkpoint resumed from is still kept, with its centres, beside the new one.
    index = (checkpoints / "checkpoint").read_text()
    assert 'all_model_checkpoint_paths: "ckpt-6"' in index, index
    assert (checkpoints / "centres-6.index").exists()
    assert (checkpoints / "centres-12.index").exists()


@pytest.mark.parametrize("tear", ["truncated", "zeroed block", "bytes changed"])
def test_a_torn_data_cache_file_is_computed_again_never_trusted(tmp_path, capfd, tear):
    """The data cache (image checks, TFRecord indexes): a torn file is named, computed
    again and rewritten whole."""
    computed = []
    values = np.arange(5000, dtype=np.float64) % 7  # 40 kB, like an image-check vector

    def compute():
        computed.append(1)
        return values

    with cached_work.using(cached_work.SharedWork(str(tmp_path))):
        cached_work.cached("image-check", "key", compute)
        (path,) = tmp_path.glob("image-check-key.*")
        np.testing.assert_array_equal(cached_work.cached("image-check", "key", compute), values)
        assert len(computed) == 1  # read back
        if tear == "truncated":
            os.truncate(path, os.path.getsize(path) // 2)
        else:
            with open(path, "r+b") as f:
                f.seek(8192)
                f.write(b"\0" * 4096 if tear == "zeroed block" else b"\1")
        np.testing.assert_array_equal(cached_work.cached("image-check", "key", compute), values)
        assert len(computed) == 2
        assert f"warning: cache file {path} is torn; computing it again" in capfd.readouterr().err
        np.testing.assert_array_equal(cached_work.cached("image-check", "key", compute), values)
        assert len(computed) == 2  # the rewritten file reads whole
