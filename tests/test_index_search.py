"""`python -m trainer.index` and `python -m trainer.search` on an image-folder job's
export: the index holds the evaluation images, each image finds itself first and passes
the calibrated threshold, and bad input exits 2 naming the thing, writing nothing."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.jobs import ROOT, job_env, run_horovod_2
from tests.test_serving import image_job, job_params  # noqa: F401  (the fixture)
from trainer.retrieval.calibration import calibrate, distances_of_pairs


def run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=job_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def built(image_job, tmp_path_factory):  # noqa: F811
    root, workdir = image_job
    output = tmp_path_factory.mktemp("index") / "eval-index"
    params = [f"--gin_param={p}" for p in job_params(root)]
    done = run("trainer.index", f"--saved_model={workdir / 'saved_model'}", f"--output={output}",
               "--far=0.1", *params)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return root, workdir, output, done.stdout


def test_the_index_holds_the_evaluation_images_with_a_calibrated_threshold(built):
    root, _, output, stdout = built
    assert sorted(p.name for p in output.iterdir()) == ["index.faiss", "index.json", "rows.npz"]
    rows = np.load(output / "rows.npz", allow_pickle=False)  # no pickle anywhere
    expected = sorted(str(p) for c in ("class2", "class3") for p in (root / c).iterdir())
    assert sorted(rows["paths"]) == expected
    meta = json.loads((output / "index.json").read_text())
    assert (meta["count"], meta["distance"], meta["search"]) == (6, "cosine", "exact")
    assert meta["measured_far"] <= 0.1 and meta["genuine_pairs"] == 6
    assert "embedded 6/6" in stdout and "threshold" in stdout


def test_each_image_finds_itself_first_and_passes_the_threshold(built):
    root, _, output, _ = built
    images = sorted(str(p) for p in (root / "class2").iterdir())
    done = run("trainer.search", str(output), *images, "--k=3", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(done.stdout)
    assert [r["image"] for r in document["results"]] == images
    for result in document["results"]:
        best = result["neighbours"][0]
        assert best["path"] == result["image"] and best["class"] == "class2"
        assert best["distance"] < 1e-5 and result["match"]
        assert len(result["neighbours"]) == 3
        distances = [n["distance"] for n in result["neighbours"]]
        assert distances == sorted(distances)
    text = run("trainer.search", str(output), images[0], "--k=1")
    assert text.returncode == 0 and f"{images[0]}: match (threshold" in text.stdout


def test_the_threshold_is_the_largest_whose_false_accept_rate_is_within_the_target():
    """Against the definition, by brute force over candidate thresholds."""
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(40, 5)).astype(np.float32)
    labels = np.repeat(np.arange(8), 5)
    got = calibrate(embeddings, labels, "cosine", far=0.05)
    i, j = np.triu_indices(40, 1)
    d = distances_of_pairs(embeddings, np.stack([i, j], 1), "cosine")
    impostor, genuine = d[labels[i] != labels[j]], d[labels[i] == labels[j]]
    within = [t for t in np.concatenate([d, d - 1e-12]) if np.mean(impostor <= t) <= 0.05]
    assert got["threshold"] == pytest.approx(max(within), abs=1e-9)
    assert got["tar"] == pytest.approx(np.mean(genuine <= got["threshold"]))


def test_bad_input_exits_2_naming_it_and_writes_nothing(built, tmp_path):
    root, workdir, output, _ = built
    image = str(next((root / "class2").iterdir()))
    missing = run("trainer.search", str(tmp_path / "nowhere"), image)
    assert missing.returncode == 2 and "is not an index written by trainer.index" in missing.stderr
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    junk = run("trainer.search", str(output), str(tmp_path / "junk.jpg"))
    assert junk.returncode == 2 and "junk.jpg' is not a JPEG, PNG" in junk.stderr
    # A SavedModel of another embedding width.
    from trainer.model import small_convnet
    from trainer.outputs import export

    other = export.saved_model(small_convnet(image_size=32, embedding_dim=8), str(tmp_path / "m"))
    wider = run("trainer.search", str(output), image, f"--saved_model={other}")
    assert wider.returncode == 2 and "width 8, the index" in wider.stderr
    # No SavedModel: nothing written.
    target = tmp_path / "never"
    params = [f"--gin_param={p}" for p in job_params(root)]
    bad = run("trainer.index", f"--saved_model={tmp_path / 'none'}", f"--output={target}", *params)
    assert bad.returncode == 2 and "cannot be loaded" in bad.stderr
    assert not target.exists() and not (tmp_path / "never.partial").exists()
    assert "Traceback" not in bad.stderr + wider.stderr + junk.stderr + missing.stderr


def test_the_kind_of_index_follows_the_config_s_evaluation_search(built, tmp_path):
    root, workdir, _, _ = built
    params = [f"--gin_param={p}" for p in job_params(root)]
    output = tmp_path / "hnsw"
    done = run("trainer.index", f"--saved_model={workdir / 'saved_model'}", f"--output={output}",
               "--gin_param=evaluation.search='hnsw'", *params)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((output / "index.json").read_text())["search"] == "hnsw"
    image = str(next((root / "class3").iterdir()))
    found = json.loads(run("trainer.search", str(output), image, "--json").stdout)
    assert found["results"][0]["neighbours"][0]["path"] == image


def _vectors(folder):
    from trainer.retrieval.index_folder import IndexFolder

    read = IndexFolder(str(folder))
    return read.index.reconstruct_n(0, read.index.ntotal), read


@pytest.mark.parametrize("backend", ["mirrored", "horovod"])
def test_sharded_indexing_gives_the_single_process_index(built, tmp_path, backend):
    """Embedding sharded over 2 replicas (MirroredStrategy on logical CPUs) or 2 Horovod
    workers writes the same rows and vectors as one process, and only once."""
    root, workdir, single, _ = built
    output = tmp_path / backend
    args = [f"--saved_model={workdir / 'saved_model'}", f"--output={output}", "--far=0.1",
            "--batch=4", *[f"--gin_param={p}" for p in job_params(root)]]  # fmt: skip
    if backend == "mirrored":
        args += [
            "--gin_param=distribute.strategy='mirrored'",
            "--gin_param=distribute.cpu_replicas=2",
        ]
        done = run("trainer.index", *args)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        done = run_horovod_2("trainer.index", *args, "--gin_param=distribute.strategy='horovod'")
    assert "2 replica(s)" in done.stdout and done.stdout.count("wrote ") == 1
    expected, expected_rows = _vectors(single)
    got, got_rows = _vectors(output)
    assert list(got_rows.paths) == list(expected_rows.paths)
    np.testing.assert_array_equal(got_rows.labels, expected_rows.labels)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got_rows.meta["threshold"] == pytest.approx(expected_rows.meta["threshold"], abs=1e-5)


def test_a_model_trained_for_another_distance_is_refused(built, tmp_path):
    root, workdir, output, _ = built
    facts = json.loads((workdir / "saved_model" / "assets.extra" / "embedding.json").read_text())
    assert facts == {"distance": "cosine", "dim": 1024}  # small_convnet's pooled features
    target = tmp_path / "never"
    params = [f"--gin_param={p}" for p in job_params(root)]
    other = "--gin_param=TripletSemiHardLoss.distance='squared_euclidean'"
    bad = run("trainer.index", f"--saved_model={workdir / 'saved_model'}", f"--output={target}",
              *params, other)  # fmt: skip
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "trained for the cosine distance, the config's train.loss uses squared_euclidean" in (
        bad.stderr
    )
    assert not target.exists() and "Traceback" not in bad.stderr
    # An index whose distance is not the model's: searched with it, refused.
    meta = json.loads((output / "index.json").read_text())
    copy = tmp_path / "euclidean-index"
    import shutil

    shutil.copytree(output, copy)
    (copy / "index.json").write_text(json.dumps({**meta, "distance": "euclidean"}))
    image = str(next((root / "class2").iterdir()))
    refused = run("trainer.search", str(copy), image)
    assert (
        refused.returncode == 2 and "the index" in refused.stderr and "euclidean" in refused.stderr
    )
