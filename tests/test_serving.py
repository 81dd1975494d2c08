"""The exported model serves: `serving_default` takes encoded images (any size, JPEG or
PNG) and gives the evaluated embeddings, in a process that cannot import this project."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data.pipeline import ImagePreprocessing, eval_batches
from data.sources import image_folder
from tests.jobs import run_job

# Run with `python -I` from another folder, the project's packages made unimportable:
# what a server has is TensorFlow and the SavedModel.
SERVER = """
import json, sys
for package in ("trainer", "losses", "data", "launch", "bench", "tests"):
    sys.modules[package] = None  # an import of the project fails
import numpy as np
import tensorflow as tf

model_dir, paths_file, out = sys.argv[1:]
paths = json.load(open(paths_file))
model = tf.saved_model.load(model_dir)
encoded = [open(p, "rb").read() for p in paths]
served = model.signatures["serving_default"](images=tf.constant(encoded))["embeddings"]
decoded = [tf.io.decode_image(e, channels=3, expand_animations=False) for e in encoded]
embedded = [model.signatures["embed"](images=image[None])["embeddings"] for image in decoded]
np.savez(out, served=served.numpy(), embedded=np.concatenate(embedded))
"""


def _images(root, rng):
    """4 classes × 3 images of different sizes, JPEG and PNG (one grayscale)."""
    for c in range(4):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(3):
            height, width = rng.integers(24, 70, size=2)
            pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
            if i == 0:
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
            elif i == 1:
                Image.fromarray(pixels).save(folder / f"{i}.png")
            else:
                Image.fromarray(pixels[..., 0]).save(folder / f"{i}.png")  # grayscale


def job_params(root) -> tuple:
    """The image-folder job: 2 classes to train, 2 to evaluate (6 images)."""
    return (
        f"image_folder.root='{root}'",  # unscoped: gin applies it in both splits' scopes
        "train_split/image_folder.classes=(0, 2)",
        "eval_split/image_folder.classes=(2, 4)",
        "train.train_data=@train_split/image_folder",
        "train.eval_data=@eval_split/image_folder",
        "train.model=@small_convnet",
        "images.size=32",
        "train.steps=2",
        "train.global_batch_size=6",
        "train.examples_per_class=3",
        "distribute.strategy='single'",
    )


@pytest.fixture(scope="module")
def image_job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    root = tmp / "images"
    _images(root, np.random.default_rng(0))
    params = job_params(root)
    workdir = tmp / "job"
    run_job(workdir, params, timeout=600)
    return root, workdir


def test_serving_default_gives_the_evaluated_embeddings_without_the_project(image_job, tmp_path):
    root, workdir = image_job
    model_dir = str(workdir / "saved_model")
    source = image_folder(str(root), classes=(2, 4))
    rows = len(source.labels)
    images, _, _ = next(iter(eval_batches(source, [(0, rows)], ImagePreprocessing(size=32))))
    exported = tf.saved_model.load(model_dir)  # held: its variables live as long as it does
    evaluated = exported.serve(tf.cast(images, tf.float32)).numpy()
    paths = tmp_path / "paths.json"
    paths.write_text(json.dumps([str(p) for p in source.items]))
    out = tmp_path / "served.npz"
    done = subprocess.run(
        [sys.executable, "-I", "-c", SERVER, model_dir, str(paths), str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(out)
    assert got["served"].shape == (rows, evaluated.shape[1])
    np.testing.assert_allclose(got["served"], evaluated, atol=1e-5)
    np.testing.assert_allclose(got["embedded"], evaluated, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got["served"], axis=1), 1.0, rtol=1e-5)


def test_the_server_process_really_cannot_import_the_project(tmp_path):
    code = SERVER.split("import numpy")[0] + "import trainer\n"
    done = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, done.stderr[-500:]


def test_an_undecodable_image_is_refused_by_name(image_job):
    _, workdir = image_job
    model = tf.saved_model.load(str(workdir / "saved_model"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="(?i)image"):
        model.signatures["serving_default"](images=tf.constant([b"not an image"]))


def test_an_export_whose_pre_processing_differs_from_the_evaluation_fails_its_check(
    image_job, tmp_path
):
    """Exported with the whole image instead of the evaluation's central crop: the job's
    check names `serving_default` (the skew users would otherwise meet in production)."""
    import types

    from trainer.model import small_convnet
    from trainer.outputs import export
    from trainer.outputs.job_outputs import ExportMismatch, check_export

    root, _ = image_job
    evaluating = ImagePreprocessing(size=32)
    data = types.SimpleNamespace(eval_source=image_folder(str(root), classes=(2, 4)),
                                 eval_preprocessing=evaluating)  # fmt: skip
    model = small_convnet(image_size=32)
    images, _, _ = next(iter(eval_batches(data.eval_source, [(0, 6)], evaluating)))
    evaluated = model(tf.cast(images, tf.float32), training=False).numpy()
    same = export.saved_model(model, str(tmp_path / "same"), evaluating)
    assert check_export(same, evaluated, data) <= 1e-5
    skewed = export.saved_model(
        model, str(tmp_path / "skewed"), ImagePreprocessing(size=32, eval_crop=1.0)
    )
    with pytest.raises(
        ExportMismatch,
        match="through its 'embed' signature|through its 'serving_default' signature",
    ):
        check_export(skewed, evaluated, data)
