"""The evaluation protocols in the job: a gallery, verification with a pairs file
(gin/faces.gin), approximate search, and their settings' mistakes."""

import json

import numpy as np
import pytest
import tensorflow as tf

from tests.jobs import HOROVOD_2, read_events, run_job, scalars

QUICK = (
    "train.steps=2",
    "train.log_every=1",
    "export.enabled=False",
)


def test_a_gallery_job_ranks_queries_against_the_gallery_and_counts_absent_classes(tmp_path):
    """Queries digits 6-9 against a gallery of digits 6-8: each query's own image is in
    the gallery (recall@1 = 1, it is not all against all), and the queries of class 9,
    absent from the gallery, are left out and counted. On two Horovod workers the
    figures equal one process's."""
    from data.sources import digits

    params = (
        *QUICK,
        "evaluation.gallery=@gallery_split/digits",
        "gallery_split/digits.classes=(6, 9)",
    )
    single = run_job(tmp_path / "single", (*params, "distribute.strategy='single'"))
    results = json.loads((tmp_path / "single" / "results.json").read_text())
    nines = int((digits(classes=(6, 10)).labels == 9).sum())
    assert results["queries_left_out"] == nines
    assert results["recall@1"] == 1.0
    assert 0.0 < results["map@r"] < 1.0
    assert f"{nines} of 714 queries have no class in the gallery" in single.stdout
    gallery = len(digits(classes=(6, 9)))
    assert f"gallery digits(6, 9): {gallery} examples, 3 classes" in single.stdout
    assert set(scalars(tmp_path / "single", "eval/queries_left_out")) == {2}

    run_job(tmp_path / "horovod", params, HOROVOD_2)
    on_two = json.loads((tmp_path / "horovod" / "results.json").read_text())
    assert on_two["queries_left_out"] == nines and on_two["recall@1"] == 1.0
    assert on_two["map@r"] == pytest.approx(
        results["map@r"], abs=0.02
    )  # two workers train in another summation order


def write_faces(root, identities=8, per_identity=4):
    """A folder per identity of small PNG "faces" (an identity's colour and noise), and
    LFW's pairs.txt naming them."""
    from PIL import Image

    rng = np.random.default_rng(0)
    names = [f"Person_{chr(65 + i)}" for i in range(identities)]
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for n in range(1, per_identity + 1):
            base = np.array([30 * i % 255, 255 - 25 * i, 90 + 15 * i], np.float64)
            pixels = np.clip(base + rng.normal(0, 40, size=(20, 20, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{name}_{n:04d}.png")
    lines = ["1\t20"]
    for i in range(10):
        lines.append(f"{names[i % identities]}\t1\t{2 + i % 3}")
    for i in range(10):
        first, second = names[i % identities], names[(i + 3) % identities]
        lines.append(f"{first}\t{1 + i % 4}\t{second}\t{1 + (i + 1) % 4}")
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root


def test_the_faces_config_reports_verification_and_the_roc_curve(tmp_path):
    root = write_faces(tmp_path / "faces")
    params = (
        f"FACES_ROOT='{root}'",
        f"LFW_ROOT='{root}'",
        f"LFW_PAIRS='{root / 'pairs.txt'}'",
        "images.size=32",
        "train.model=@small_convnet",
        "small_convnet.image_size=32",
        "small_convnet.embedding_dim=16",
        "precision.policy=None",
        "train.global_batch_size=8",
        "train.examples_per_class=4",
        "distribute.strategy='single'",
        *QUICK,
    )
    workdir = tmp_path / "job"
    done = run_job(workdir, params, extra=("--gin_file=faces",), timeout=600)
    results = json.loads((workdir / "results.json").read_text())
    # 10 impostor pairs support FAR 1e-1 only.
    assert set(results) == {
        "recall@1", "recall@10", "map@r", "tar@far=1e-1", "roc_auc", "eer", "accuracy"
    }  # fmt: skip
    assert 0.0 <= results["eer"] <= 1.0 and 0.0 <= results["accuracy"] <= 1.0
    assert "tar@far=1e-1" in done.stdout and "roc_auc" in done.stdout
    assert set(scalars(workdir, "eval/roc_auc")) == {2}
    roc = read_events(workdir).Tensors("eval/roc")[-1]
    png = tf.make_ndarray(roc.tensor_proto)[2]  # (width, height, PNG) as tf.summary.image writes
    height, width, channels = tf.io.decode_png(png).shape
    assert channels == 3 and width > 200 and height > 200


def test_an_approximate_search_job_reports_its_recall_of_exact(tmp_path):
    workdir = tmp_path / "hnsw"
    run_job(workdir, (*QUICK, "distribute.strategy='single'", "evaluation.search='hnsw'"))
    results = json.loads((workdir / "results.json").read_text())
    assert results["search_recall_of_exact"] >= 0.95
    assert set(scalars(workdir, "eval/search_recall_of_exact")) == {2}


def test_an_empty_gallery_split_is_named(tmp_path):
    from tests.test_data import write_inshop

    root = write_inshop(tmp_path / "inshop")
    params = (
        f"INSHOP_ROOT='{root}'",
        "gallery_split/list_file.keep_values=('nothing',)",
        "distribute.strategy='single'",
    )
    done = run_job(tmp_path / "job", params, extra=("--gin_file=inshop",), check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "list_eval_partition.txt lists no image (after the filters)" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_gallery_left_empty_by_skipped_images_is_named(tmp_path):
    (tmp_path / "gallery" / "6").mkdir(parents=True)
    (tmp_path / "gallery" / "6" / "broken.png").write_bytes(b"not an image")
    params = (
        "evaluation.gallery=@gallery_split/image_folder",
        f"gallery_split/image_folder.root='{tmp_path / 'gallery'}'",
        "verify_images.on_corrupt='skip'",
        "distribute.strategy='single'",
    )
    done = run_job(tmp_path / "job", params, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"evaluation.gallery: image_folder({tmp_path / 'gallery'}) holds no examples" in (
        done.stderr
    )


@pytest.mark.parametrize(
    "param, message",
    [
        ("evaluation.search='annoy'", "Unknown evaluation.search 'annoy'"),
        ("evaluation.recall_k=0", "evaluation.recall_k must be a whole number >= 1"),
        ("evaluation.recall_k=(1, 'ten')", "evaluation.recall_k must be a whole number >= 1"),
        ("evaluation.chunk_size=0", "evaluation.chunk_size must be a whole number >= 1"),
        ("evaluation.hnsw_ef_search=0", "evaluation.hnsw_ef_search must be >= 1"),
        ("evaluation.pairs='/nowhere/pairs.txt'", "evaluation.pairs '/nowhere/pairs.txt'"),
        ("train.recall_k=8", "train.recall_k is now evaluation.recall_k"),
        ("train.eval_chunk_size=8", "train.eval_chunk_size is now evaluation.chunk_size"),
    ],
)
def test_evaluation_mistakes_exit_2_naming_the_setting(tmp_path, param, message):
    done = run_job(tmp_path / "bad", ("distribute.strategy='single'", param), check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "bad").exists()  # found before anything was written
