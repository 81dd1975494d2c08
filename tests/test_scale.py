"""What makes the trainer hold at millions of images, tested at small sizes: the sampler's
O(N log N) construction draws today's batches, sharded evaluation equals brute force,
TFRecords are read by offset, and the start-up image check runs once per data set."""

import os

import numpy as np
import pytest
import tensorflow as tf

from data import cached_work
from data.errors import InputError
from data.pipeline import (
    ImagePreprocessing,
    eval_batches,
    substitutes,
    train_batches,
    verify_images,
)
from data.records import encode_example
from data.sampler import PKSampler
from data.sources import image_folder, tfrecord
from tests.cross_replica_case import mirrored
from tests.jobs import ROOT, job_env
from tests.test_evaluation import reference_metrics
from trainer.evaluation import retrieval_metrics, sharded_retrieval_metrics


def per_class_scan_batch(labels, p, k, seed, step):
    """The sampler as it was built before: one `labels == c` scan per class (O(N·C))."""
    classes, counts = np.unique(labels, return_counts=True)
    members = [np.flatnonzero(labels == c) for c in classes[counts >= k]]
    rng = np.random.default_rng([seed, step])
    picked = rng.choice(len(members), p, replace=False)
    return np.concatenate([rng.choice(members[c], k, replace=False) for c in picked])


@pytest.mark.parametrize("seed", [0, 7])
def test_sampler_draws_the_batches_of_the_per_class_scan(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 300, size=5000) * 7 - 50  # unsorted, sparse, negative ids
    labels[:3] = 10_000  # a class too small for K: left out by both
    sampler = PKSampler(labels, 8, 4, seed)
    for step in (0, 1, 17, 10_000):
        np.testing.assert_array_equal(
            sampler.global_batch(step), per_class_scan_batch(labels, 8, 4, seed, step)
        )
    assert sampler.skipped_classes == 1 + int((np.bincount(labels[3:] + 50)[::7] < 4).sum())


def clustered(n, classes, dim, seed):
    """Small integer points around class centres: many exact ties in squared Euclidean
    distance, computed exactly in float32, which must be broken by index."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    x = rng.integers(-1, 2, size=(n, dim)) + 2 * rng.integers(-2, 3, size=(classes, dim))[labels]
    labels[0] = classes + 5  # a singleton: no relevant item
    return x.astype(np.float32), labels


@pytest.mark.parametrize("num_replicas", [1, 2, 4])
def test_sharded_retrieval_on_replicas_equals_brute_force(num_replicas):
    x, labels = clustered(150, 12, 3, seed=num_replicas)
    expected = reference_metrics(x, labels, (1, 4, 8), "squared_euclidean")
    replicas = mirrored(num_replicas)
    got = sharded_retrieval_metrics(x, labels, (1, 4, 8), "squared_euclidean", replicas, 16)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    one_process = retrieval_metrics(x, labels, (1, 4, 8), "squared_euclidean", chunk=7)
    assert got == pytest.approx(one_process, abs=1e-12)
    assert 0.05 < got["map@r"] < 0.95


def test_ranking_depth_covers_the_largest_class_and_k():
    labels = np.array([0] * 30 + [1] * 3)  # R = 29 for class 0
    x = np.random.default_rng(0).normal(size=(33, 3)).astype(np.float32)
    got = retrieval_metrics(x, labels, (1, 2), chunk=5)
    assert got == pytest.approx(reference_metrics(x, labels, (1, 2)), abs=1e-9)


def test_sharded_retrieval_under_horovodrun_equals_brute_force(tmp_path):
    import subprocess
    import sys

    x, labels = clustered(90, 7, 3, seed=3)
    np.savez(tmp_path / "case.npz", x=x, labels=labels)
    command = [
        os.path.join(os.path.dirname(sys.executable), "horovodrun"),
        "-np", "2", "-H", "localhost:2", "--gloo",
        sys.executable, "-m", "tests.horovod_eval_worker", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected = reference_metrics(x, labels, (1, 4), "squared_euclidean")
    for rank in (0, 1):
        got = dict(np.load(tmp_path / f"metrics{rank}.npz"))
        assert int(got.pop("workers")) == 2
        assert int(got.pop("queries")) == 45  # each worker ranked half of the queries
        for key, value in expected.items():
            assert float(got[key]) == pytest.approx(value, abs=1e-9), key


def _png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    return tf.io.encode_png(rng.integers(0, 255, size=(12, 10, 3), dtype=np.uint8)).numpy()


def same_images_as_folder_and_records(root, classes=4, per_class=5, files=3):
    """The same PNGs as an image folder and as `files` TFRecord files, in the same order."""
    records = []
    for c in range(classes):
        (root / "folder" / str(c)).mkdir(parents=True)
        for i in range(per_class):
            png = _png(c * 100 + i)
            (root / "folder" / str(c) / f"{i}.png").write_bytes(png)
            records.append(encode_example(png, c))
    (root / "records").mkdir()
    for f, part in enumerate(np.array_split(np.arange(len(records)), files)):
        with tf.io.TFRecordWriter(str(root / "records" / f"part-{f}.tfrecord")) as writer:
            for r in part:
                writer.write(records[r])
    return image_folder(str(root / "folder")), str(root / "records" / "*.tfrecord")


def test_tfrecords_read_by_offset_give_the_batches_of_the_same_images_as_files(tmp_path):
    folder, pattern = same_images_as_folder_and_records(tmp_path)
    with cached_work.using(cached_work.SharedWork(str(tmp_path / "cache"))):
        records = tfrecord(pattern)
        again = tfrecord(pattern)  # the index read back from the cache
    np.testing.assert_array_equal(records.labels, folder.labels)
    np.testing.assert_array_equal(again.reader.offsets, records.reader.offsets)
    assert len(os.listdir(tmp_path / "cache")) == 1
    sampler = PKSampler(folder.labels, 2, 3, seed=0)
    prep = ImagePreprocessing(size=8)
    for rows in ((0, 6), (0, 3), (3, 6)):
        for a, b in zip(
            train_batches(folder, sampler, rows, 0, 4, prep),
            train_batches(records, sampler, rows, 0, 4, prep),
            strict=True,
        ):
            for x, y in zip(a, b, strict=True):
                np.testing.assert_array_equal(x, y)
    for a, b in zip(
        eval_batches(folder, [(0, 7), (7, 20)], prep),
        eval_batches(records, [(0, 7), (7, 20)], prep),
        strict=True,
    ):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_tfrecord_mistakes_name_the_file_or_key(tmp_path):
    _, pattern = same_images_as_folder_and_records(tmp_path, files=1)
    with pytest.raises(InputError, match="no feature 'jpeg'.*tfrecord.image_key"):
        tfrecord(pattern, image_key="jpeg")
    with pytest.raises(InputError, match="part-0.tfrecord' cannot be indexed.*'label'"):
        tfrecord(pattern, label_key="label")
    with tf.io.TFRecordWriter(
        str(tmp_path / "zipped.tfrecord"), tf.io.TFRecordOptions(compression_type="GZIP")
    ) as writer:
        writer.write(encode_example(_png(0), 0))
    with pytest.raises(InputError, match="zipped.tfrecord"):
        tfrecord(str(tmp_path / "zipped.tfrecord"))


def _folder(root, classes=3, per_class=4):
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            (root / str(c) / f"{i}.png").write_bytes(_png(c * 10 + i))
    return root


def test_the_image_check_runs_once_per_data_set_and_a_changed_file_is_checked_again(
    tmp_path, monkeypatch
):
    import data.pipeline

    root = _folder(tmp_path / "images")
    calls = []
    real = data.pipeline._decodable
    monkeypatch.setattr(
        data.pipeline, "_decodable", lambda *a, **k: calls.append(a[1:3]) or real(*a, **k)
    )
    with cached_work.using(cached_work.SharedWork(str(tmp_path / "cache"))):
        kept, bad = verify_images(image_folder(str(root)))
        assert (len(kept), bad, len(calls)) == (12, [], 1)
        kept, bad = verify_images(image_folder(str(root)))  # a restart: read back
        assert (len(kept), bad, len(calls)) == (12, [], 1)
        (root / "1" / "2.png").write_bytes(b"no longer a png")  # size and mtime change
        with pytest.raises(InputError, match=r"1 image\(s\) .*1/2.png"):
            verify_images(image_folder(str(root)))
        assert len(calls) == 2


def test_substitutes_stay_within_the_class_and_cycle():
    labels = np.array([3, 1, 3, 3, 1, 9])
    np.testing.assert_array_equal(substitutes(labels), [2, 4, 3, 0, 1, 5])


def test_an_image_unreadable_after_the_check_is_replaced_within_its_class_and_flagged(tmp_path):
    root = _folder(tmp_path / "images", classes=2, per_class=3)
    source, _ = verify_images(image_folder(str(root)))
    (root / "1" / "0.png").write_bytes(b"broken later")  # index 3: its substitute is 4
    prep = ImagePreprocessing(size=8, augment=False)
    images, labels, ok = next(iter(eval_batches(source, [(0, 6)], prep)))
    np.testing.assert_array_equal(ok, [True, True, True, False, True, True])
    np.testing.assert_array_equal(labels, source.labels)
    np.testing.assert_array_equal(images[3], images[4])
    sampler = PKSampler(source.labels, 2, 3, seed=0)
    for images, _, ok in train_batches(source, sampler, (0, 6), 0, 3, prep):
        assert images.shape == (6, 8, 8, 3)  # no row dropped
        assert (~ok).sum() == 1


# --- the job over image data: once per data set, unreadable later, every backend ---------

SMALL_IMAGE_JOB = (
    "train.model=@backbone_embedding",
    "backbone_embedding.backbone='MobileNetV3Small'",
    "backbone_embedding.image_size=32",
    "backbone_embedding.embedding_dim=8",
    "backbone_embedding.weights=None",
    "batchnorm.synchronized=True",  # MobileNetV3 has BatchNorm
    "images.size=32",
    "train.global_batch_size=12",
    "train.examples_per_class=3",
    "train.log_every=1",
    "train.eval_every=1000",
    "export.enabled=False",
)


def folder_job(root):
    return SMALL_IMAGE_JOB + (
        "train.train_data=@train_split/image_folder",
        "train.eval_data=@eval_split/image_folder",
        f"train_split/image_folder.root='{root}'",
        f"eval_split/image_folder.root='{root}'",
    )


def test_an_image_unreadable_at_run_time_stops_the_job_by_name_or_is_counted(tmp_path):
    from tests.jobs import run_job

    root = _folder(tmp_path / "images", classes=4, per_class=3)  # every batch holds all 12
    params = folder_job(root) + ("distribute.strategy='single'",)
    first = run_job(tmp_path / "stop", params + ("train.steps=2",), timeout=600)
    assert "checking the 12 images" in first.stdout
    broken = root / "2" / "1.png"
    stat = broken.stat()
    broken.write_bytes(b"x" * stat.st_size)  # same size, same time: the cached verdict holds
    os.utime(broken, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    stopped = run_job(tmp_path / "stop", params + ("train.steps=4",), check=False, timeout=600)
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert "checking the" not in stopped.stdout  # read back from the cache
    assert f"cannot be read at step 3, although they passed the start-up check: {broken}" in (
        stopped.stderr
    )
    assert "Traceback" not in stopped.stderr
    skipping = params + ("train.steps=4", "verify_images.on_corrupt='skip'")
    done = run_job(tmp_path / "stop", skipping, timeout=600)
    assert f"step 3: unreadable image(s) {broken} replaced by others of their class" in (
        done.stdout
    )
    assert f"eval at step 4: unreadable image(s) {broken} replaced" in done.stdout


def _tfrecords(root, classes=4, per_class=6):
    (root).mkdir()
    for f in range(2):
        with tf.io.TFRecordWriter(str(root / f"part-{f}.tfrecord")) as writer:
            for c in range(classes):
                for i in range(per_class // 2):
                    writer.write(encode_example(_png(c * 100 + f * 10 + i), c))
    return str(root / "*.tfrecord")


def test_a_tfrecord_job_gives_the_same_losses_on_every_backend(tmp_path):
    """One process reads every row (single, MirroredStrategy: the same data path); Horovod
    workers read their halves by offset."""
    from tests.jobs import HOROVOD_2, run_job, series

    pattern = _tfrecords(tmp_path / "records")
    params = SMALL_IMAGE_JOB + (
        "train.steps=3",
        "train.train_data=@train_split/tfrecord",
        "train.eval_data=@eval_split/tfrecord",
        f"train_split/tfrecord.pattern='{pattern}'",
        f"eval_split/tfrecord.pattern='{pattern}'",
    )
    single = run_job(tmp_path / "single", params + ("distribute.strategy='single'",), timeout=600)
    assert "checking the 24 images" in single.stdout
    # A fresh cache: the two workers index a file each and check half the images each.
    horovod = params + ("distribute.strategy='horovod'", f"data_cache.directory='{tmp_path}/c'")
    two = run_job(tmp_path / "horovod", horovod, HOROVOD_2, timeout=600)
    assert "checking the 24 images of tfrecord" in two.stdout and "this worker: 12" in two.stdout
    np.testing.assert_allclose(
        series(tmp_path / "horovod", "train/loss"),
        series(tmp_path / "single", "train/loss"),
        rtol=1e-4,
    )
    assert len(os.listdir(tmp_path / "c")) == 2  # the index and the check's verdict


def test_the_projector_export_keeps_an_even_sample_of_a_large_eval_set(tmp_path):
    from data.sources import Source
    from trainer.outputs.export import projector

    labels = np.arange(25, dtype=np.int32) % 5
    source = Source("s", np.zeros(25), labels, "pixels", tuple("abcde"))
    embeddings = np.arange(50, dtype=np.float32).reshape(25, 2)
    folder = projector(str(tmp_path), embeddings, source, max_points=10)
    written = np.loadtxt(os.path.join(folder, "embeddings.tsv"), delimiter="\t")
    assert written.shape == (10, 2) and written[0, 0] == 0 and written[-1, 0] == 48
    metadata = open(os.path.join(folder, "metadata.tsv")).read().splitlines()[1:]
    assert metadata == [f"{int(x) // 2 % 5}\t{'abcde'[int(x) // 2 % 5]}" for x in written[:, 0]]


def _break_class(root, label: str) -> list:
    """Every image of class `label` unreadable, with the same size and time (the start-up
    check's cached verdict still holds)."""
    broken = []
    for path in sorted((root / label).iterdir()):
        stat = path.stat()
        path.write_bytes(b"x" * stat.st_size)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        broken.append(str(path))
    return broken


@pytest.mark.parametrize("rows", [(0, 4), (0, 8)])
def test_a_slice_with_no_readable_row_keeps_every_later_label_and_image_in_place(tmp_path, rows):
    """Classes 0 and 1 break after the check. A process's slice of some steps (the first
    class of the step on (0, 4); both classes on (0, 8)) then has no readable row: that
    step is substituted and flagged, and every other row has its own image and label."""
    root = _folder(tmp_path / "images", classes=4, per_class=4)
    source, _ = verify_images(image_folder(str(root)))
    prep = ImagePreprocessing(size=8, augment=False)
    sampler = PKSampler(source.labels, 2, 4, seed=1)
    start, end = rows
    want = {}  # the rows' images before anything breaks
    for step, (images, _, ok) in enumerate(train_batches(source, sampler, rows, 0, 12, prep)):
        assert ok.all()
        want[step] = images.numpy()
    _break_class(root, "0")
    _break_class(root, "1")
    broken_labels = {0, 1}
    emptied = 0
    got = list(train_batches(source, sampler, rows, 0, 12, prep))
    assert len(got) == 12
    for step, (images, labels, ok) in enumerate(got):
        expected = source.labels[sampler.global_batch(step)[start:end]]
        np.testing.assert_array_equal(labels, expected, err_msg=f"step {step}")
        np.testing.assert_array_equal(ok, ~np.isin(expected, list(broken_labels)))
        np.testing.assert_array_equal(images.numpy()[ok], want[step][ok], err_msg=f"step {step}")
        emptied += not ok.any()
    assert emptied >= 1  # steps whose whole slice was unreadable happened, and were kept


@pytest.mark.parametrize("backend", ["horovod2", "mirrored4"])
def test_a_job_whose_slice_has_no_readable_row_goes_on_with_its_labels(tmp_path, backend):
    """Classes 0 and 1 break after the start-up check: on 2 Horovod workers the first
    worker's whole slice of some steps is unreadable, on 4 mirrored replicas (one process)
    the whole batch of some. The job reports exactly the steps whose global batch holds
    a broken class, and trains to the end."""
    import re

    from tests.jobs import HOROVOD_2, run_job

    root = _folder(tmp_path / "images", classes=4, per_class=4)
    launcher, extra = {
        "horovod2": (HOROVOD_2, ("distribute.strategy='horovod'",)),
        "mirrored4": ((), ("distribute.strategy='mirrored'", "distribute.cpu_replicas=4")),
    }[backend]
    params = (
        "train.model=@small_convnet",
        "small_convnet.image_size=28",
        "small_convnet.widths=(8,)",
        "images.size=28",
        "train.global_batch_size=8",
        "train.examples_per_class=4",
        "train.steps=12",
        "train.log_every=1",
        "train.eval_every=1000",
        "export.enabled=False",
        "verify_images.on_corrupt='skip'",
        "train.train_data=@train_split/image_folder",
        "train.eval_data=@eval_split/image_folder",
        f"train_split/image_folder.root='{root}'",
        f"eval_split/image_folder.root='{root}'",
        *extra,
    )
    workdir = tmp_path / "job"
    run_job(workdir, (*params, "train.stop_after_steps=1"), launcher, timeout=600)
    _break_class(root, "0")
    _break_class(root, "1")
    done = run_job(workdir, params, launcher, timeout=600)
    reported = {int(s) for s in re.findall(r"step (\d+): unreadable image\(s\)", done.stdout)}
    labels = image_folder(str(root)).labels
    sampler = PKSampler(labels, 2, 4, seed=0)
    expected = {
        s for s in range(2, 13) if np.isin(labels[sampler.global_batch(s - 1)], [0, 1]).any()
    }
    assert reported == expected, done.stdout[-3000:]
    assert "done in" in done.stdout


def test_open_shards_are_bounded_and_a_shard_being_read_is_never_closed(tmp_path):
    from data.records import OpenFiles

    paths = []
    for f in range(10):
        path = tmp_path / f"shard-{f}"
        path.write_bytes(bytes([f]) * 8)
        paths.append(str(path))
    files = OpenFiles(paths, limit=3)
    for f in list(range(10)) * 2:
        with files.descriptor(f) as descriptor:
            assert os.pread(descriptor, 1, 0) == bytes([f])
        assert len(files) <= 3
    with files.descriptor(0) as a, files.descriptor(1) as b, files.descriptor(2) as c:
        with files.descriptor(3) as d:  # all 3 busy: a 4th opens beyond the limit
            assert len(files) == 4
            assert [os.pread(x, 1, 0) for x in (a, b, c, d)] == [bytes([i]) for i in range(4)]
    with files.descriptor(4):
        assert len(files) == 3  # the idle ones, oldest first, closed again
    with pytest.raises(InputError, match="tfrecord.max_open_files must be a whole number >= 1"):
        OpenFiles(paths, 0)


def test_a_job_over_2000_shards_trains_and_evaluates_under_ulimit_256(tmp_path):
    """Thousands of shards, a descriptor limit of 256: at most tfrecord.max_open_files
    (64) are open at once, so neither the indexing, the image check, training nor the
    evaluation runs out of descriptors."""
    import shlex
    import subprocess

    from tests.jobs import job_command

    root = tmp_path / "shards"
    root.mkdir()
    for f in range(2000):
        with tf.io.TFRecordWriter(str(root / f"part-{f:05d}.tfrecord")) as writer:
            writer.write(encode_example(_png(f), f % 4))
    pattern = str(root / "*.tfrecord")
    params = (
        "distribute.strategy='single'",
        "train.model=@small_convnet",
        "small_convnet.image_size=28",
        "small_convnet.widths=(8,)",
        "images.size=28",
        "train.global_batch_size=16",
        "train.examples_per_class=4",
        "train.steps=3",
        "export.enabled=False",
        "train.train_data=@train_split/tfrecord",
        "train.eval_data=@eval_split/tfrecord",
        f"train_split/tfrecord.pattern='{pattern}'",
        f"eval_split/tfrecord.pattern='{pattern}'",
    )
    command = shlex.join(map(str, job_command(tmp_path / "job", params)))
    done = subprocess.run(
        ["bash", "-c", f"ulimit -n 256 && exec {command}"],
        cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "2000 examples, 4 classes" in done.stdout
    assert "done in" in done.stdout and "recall@1" in done.stdout


class _FlakyDisk:
    """Python reads of one path fail with EIO `failures` times, then give `content`."""

    def __init__(self, monkeypatch, path, content: bytes, failures: int):
        from data import reading

        self.content, self.failures = content, failures
        self.attempts, self.sleeps = 0, []
        real = reading._read_file

        def read(p):
            if p != str(path):
                return real(p)
            self.attempts += 1
            if self.attempts <= self.failures:
                raise OSError(5, "Input/output error", p)
            return self.content

        monkeypatch.setattr(reading, "_read_file", read)
        monkeypatch.setattr(reading.time, "sleep", self.sleeps.append)


def test_a_read_that_fails_twice_then_succeeds_gives_the_image_not_a_substitute(
    tmp_path, monkeypatch
):
    """tf.data cannot read the file (it vanished for a moment); read again in Python it
    fails twice with EIO, then succeeds: the row is its own image, flagged ok, after
    backoffs of 0.5 and 1 s; not a corrupt image and not a substitute."""
    root = _folder(tmp_path / "images", classes=2, per_class=3)
    source, _ = verify_images(image_folder(str(root)))
    flaky = root / "1" / "0.png"  # index 3
    png = flaky.read_bytes()
    flaky.unlink()  # the fast path fails
    disk = _FlakyDisk(monkeypatch, flaky, png, failures=2)
    prep = ImagePreprocessing(size=8, augment=False)
    images, labels, ok = next(iter(eval_batches(source, [(0, 6)], prep)))
    assert ok.all() and disk.attempts == 3 and disk.sleeps == [0.5, 1.0]
    want = prep.eval(ImagePreprocessing.decode(tf.constant(png))).numpy()
    np.testing.assert_array_equal(images[3], want)
    sampler = PKSampler(source.labels, 2, 3, seed=0)
    for _, _, ok in train_batches(source, sampler, (0, 6), 0, 2, prep):
        assert ok.all()


def test_a_persistent_io_error_stops_by_name_and_is_never_cached_as_corrupt(tmp_path, monkeypatch):
    from data.reading import DataIOError

    root = _folder(tmp_path / "images", classes=2, per_class=3)
    flaky = root / "1" / "0.png"
    png = flaky.read_bytes()
    flaky.unlink()
    flaky.mkdir()  # stat works (the fingerprint), tf.data's read fails
    disk = _FlakyDisk(monkeypatch, flaky, png, failures=100)
    with cached_work.using(cached_work.SharedWork(str(tmp_path / "cache"))):
        with pytest.raises(
            DataIOError, match=rf"cannot read {flaky}: Input/output error \(errno 5\), 4 attempts"
        ):
            verify_images(image_folder(str(root)), on_corrupt="skip")
        assert disk.sleeps == [0.5, 1.0, 2.0]
        assert not list((tmp_path / "cache").glob("image-check-*"))  # nothing cached
        disk.failures = 0  # the storage is back: the same check passes, and is cached
        kept, bad = verify_images(image_folder(str(root)), on_corrupt="skip")
        assert (len(kept), bad) == (6, [])
        assert list((tmp_path / "cache").glob("image-check-*"))


def test_bytes_that_read_but_do_not_decode_are_corrupt_not_retried(tmp_path, monkeypatch):
    root = _folder(tmp_path / "images", classes=2, per_class=3)
    broken = root / "1" / "0.png"
    broken.write_bytes(b"not an image")
    disk = _FlakyDisk(monkeypatch, root / "none", b"", failures=0)
    kept, bad = verify_images(image_folder(str(root)), on_corrupt="skip")
    assert bad == [str(broken)] and len(kept) == 5 and disk.sleeps == []


def test_data_io_settings_are_read_and_checked_by_the_job(tmp_path):
    from tests.jobs import run_job

    done = run_job(tmp_path / "job", ("data_io.retries=-1",), check=False)
    assert done.returncode == 2
    assert "data_io.retries must be a whole number >= 0, got -1." in done.stderr
    done = run_job(tmp_path / "job2", ("data_io.retries=5", "train.steps=1",
                                       "export.enabled=False"))  # fmt: skip
    assert "done in" in done.stdout  # a binding the job reads, not refused as unused
