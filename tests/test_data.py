"""Sources, the P×K sampler and the tf.data pipelines."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data.errors import InputError
from data.pipeline import PixelAugmentation, _regrouped, eval_batches, train_batches
from data.records import encode_example
from data.sampler import PKSampler
from data.sources import digits, image_folder, list_file, tfrecord
from tests.jobs import ROOT
from trainer.backends.replicas import slice_bounds


def test_sampler_batch_depends_on_seed_and_step_only():
    labels = np.repeat(np.arange(10), 20)
    a = PKSampler(labels, 4, 5, seed=3)
    b = PKSampler(labels, 4, 5, seed=3)
    np.testing.assert_array_equal(a.global_batch(7), b.global_batch(7))
    assert not np.array_equal(a.global_batch(7), a.global_batch(8))
    assert not np.array_equal(a.global_batch(7), PKSampler(labels, 4, 5, seed=4).global_batch(7))


def test_sampler_draws_p_classes_of_k_distinct_examples_class_by_class():
    labels = np.repeat(np.arange(10), 20)
    sampler = PKSampler(labels, 4, 5, seed=0)
    for step in range(20):
        batch = sampler.global_batch(step)
        assert batch.shape == (20,)
        blocks = labels[batch].reshape(4, 5)
        assert np.all(blocks == blocks[:, :1])  # K consecutive rows share a class
        assert len(set(blocks[:, 0])) == 4  # P distinct classes
        assert len(set(batch.tolist())) == 20  # no example twice


def test_sampler_leaves_out_small_classes_and_refuses_an_impossible_batch():
    labels = np.array([0] * 8 + [1] * 8 + [2] * 3)
    sampler = PKSampler(labels, 2, 4, seed=0)
    assert sampler.skipped_classes == 1
    for step in range(10):
        assert 2 not in labels[sampler.global_batch(step)]
    with pytest.raises(InputError, match="needs 3 classes with at least 4 examples"):
        PKSampler(labels, 3, 4, seed=0)


def _process_rows(dataset_fn, global_size, processes):
    """What `processes` workers read, concatenated per step in worker order."""
    per_worker = [list(dataset_fn(bounds)) for bounds in slice_bounds(global_size, processes)]
    return [
        tuple(np.concatenate([w[step][i].numpy() for w in per_worker]) for i in range(2))
        for step in range(len(per_worker[0]))
    ]


@pytest.fixture(scope="module")
def digit_source():
    return digits(classes=(0, 6))


def test_global_batch_with_augmentation_is_the_same_for_any_number_of_workers(digit_source):
    sampler = PKSampler(digit_source.labels, 6, 4, seed=1)
    make = lambda rows: train_batches(digit_source, sampler, rows, 5, 8)  # noqa: E731
    one = _process_rows(make, 24, 1)
    assert len(one) == 3
    for processes in (2, 3, 4):
        for (images, labels), (ref_images, ref_labels) in zip(
            _process_rows(make, 24, processes), one, strict=True
        ):
            np.testing.assert_array_equal(labels, ref_labels)
            np.testing.assert_array_equal(images, ref_images)
    # Labels are those the sampler chose; images are augmented, not copies.
    batch = sampler.global_batch(5)
    np.testing.assert_array_equal(one[0][1], digit_source.labels[batch])
    assert not np.allclose(one[0][0], digit_source.items[batch])


def test_pipeline_resumes_mid_job_with_the_same_batches(digit_source):
    sampler = PKSampler(digit_source.labels, 6, 4, seed=1)
    full = list(train_batches(digit_source, sampler, (0, 24), 0, 6))
    resumed = list(train_batches(digit_source, sampler, (0, 24), 4, 6))
    for (a, la, _), (b, lb, _) in zip(full[4:], resumed, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_array_equal(la.numpy(), lb.numpy())


def test_pixel_augmentation_is_a_small_warp_and_the_identity_when_off():
    image = tf.constant(digits(classes=(0, 1)).items[0])
    warped = PixelAugmentation().train(image, tf.constant([0, 1], tf.int64))
    assert warped.shape == image.shape
    assert 0 < float(tf.reduce_mean(tf.abs(warped - image))) < 0.3
    off = PixelAugmentation(rotation=0.0, scale=0.0, shear=0.0, shift=0.0)
    np.testing.assert_allclose(off.train(image, tf.constant([0, 1], tf.int64)), image, atol=1e-6)


def _write_folder(root, classes, per_class, size=(20, 16)):
    rng = np.random.default_rng(0)
    for c in classes:
        folder = root / c
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_image_folder_selects_sorted_class_positions(tmp_path):
    root = _write_folder(tmp_path / "images", ["003.c", "001.a", "002.b", "004.d"], 3)
    source = image_folder(str(root), classes=(1, 3))
    assert source.class_names == ("001.a", "002.b", "003.c", "004.d")
    assert sorted(set(source.labels.tolist())) == [1, 2]
    assert all("/002.b/" in p or "/003.c/" in p for p in source.items)
    assert len(image_folder(str(root)).labels) == 12


def test_image_pipeline_decodes_crops_and_is_worker_count_invariant(tmp_path):
    root = _write_folder(tmp_path / "images", ["a", "b", "c"], 4)
    source = image_folder(str(root))
    sampler = PKSampler(source.labels, 2, 2, seed=0)
    from data.pipeline import ImagePreprocessing

    prep = ImagePreprocessing(size=12)
    make = lambda rows: train_batches(source, sampler, rows, 0, 2, prep)  # noqa: E731
    one = _process_rows(make, 4, 1)
    assert one[0][0].shape == (4, 12, 12, 3)
    assert 0 <= one[0][0].min() and one[0][0].max() <= 255
    two = _process_rows(make, 4, 2)
    for (a, la), (b, lb) in zip(one, two, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
        np.testing.assert_array_equal(la, lb)
    images, labels, ok = next(iter(eval_batches(source, [(0, 5)], prep)))
    assert ok.all()
    assert images.shape == (5, 12, 12, 3)
    np.testing.assert_array_equal(labels, source.labels[:5])


def test_image_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(InputError, match="missing"):
        image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no class subfolders"):
        image_folder(str(tmp_path / "empty"))
    root = _write_folder(tmp_path / "images", ["a"], 2)
    (root / "b").mkdir()
    with pytest.raises(InputError, match="/b' holds no images"):
        image_folder(str(root))
    with pytest.raises(InputError, match=r"classes=\(0, 5\)"):
        image_folder(str(tmp_path / "images"), classes=(0, 5))


def test_tfrecord_source_reads_images_and_maps_labels_to_positions(tmp_path):
    path = tmp_path / "train.tfrecord"
    encoded = []
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i, label in enumerate([7, 3, 7, 11, 3]):
            png = tf.io.encode_png(tf.fill([4, 4, 3], tf.constant(i * 10, tf.uint8))).numpy()
            encoded.append(png)
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "image/encoded": tf.train.Feature(
                            bytes_list=tf.train.BytesList(value=[png])
                        ),
                        "image/class/label": tf.train.Feature(
                            int64_list=tf.train.Int64List(value=[label])
                        ),
                    }
                )
            )
            writer.write(example.SerializeToString())
            assert encode_example(png, label) == example.SerializeToString()
    source = tfrecord(str(tmp_path / "*.tfrecord"))
    assert source.labels.tolist() == [1, 0, 1, 2, 0]  # positions of 7, 3, 7, 11, 3
    assert source.class_names == ("3", "7", "11")
    assert [source.reader.parse_image(source.reader.read(r)).numpy() for r in source.items] == [
        encoded[i] for i in range(5)
    ]
    second = tfrecord(str(tmp_path / "*.tfrecord"), classes=(1, 3))
    assert second.labels.tolist() == [1, 1, 2]
    with pytest.raises(InputError, match="matches no file"):
        tfrecord(str(tmp_path / "*.nothing"))


def test_corrupt_images_stop_the_job_by_name_or_are_skipped(tmp_path):
    from data.pipeline import verify_images

    root = _write_folder(tmp_path / "images", ["a", "b"], 3)
    (root / "b" / "9.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    source = image_folder(str(root))
    assert len(source) == 7
    with pytest.raises(InputError, match=r"1 image\(s\) .* cannot be decoded: .*/b/9.jpg"):
        verify_images(source)
    kept, skipped = verify_images(source, on_corrupt="skip")
    assert skipped == [str(root / "b" / "9.jpg")]
    assert len(kept) == 6 and str(root / "b" / "9.jpg") not in list(kept.items)
    assert kept.labels.tolist() == [0, 0, 0, 1, 1, 1]
    clean, none = verify_images(digits(classes=(0, 2)))
    assert none == [] and len(clean) == len(digits(classes=(0, 2)))


ENCODERS = {
    "png": tf.io.encode_png,
    "jpeg 4:4:4": lambda image: tf.io.encode_jpeg(image, chroma_downsampling=False),
    "jpeg 4:2:0": tf.io.encode_jpeg,  # chroma at half resolution, as most photos
}


@pytest.mark.parametrize("kind", ENCODERS)
def test_a_jpeg_decoded_inside_its_crop_window_equals_the_whole_decode_cropped(kind):
    """train_encoded (decode_and_crop_jpeg for JPEGs) gives the crop that decoding the
    whole image and cropping gives, as uint8, for every seed tried. With 4:2:0 chroma,
    libjpeg upsamples the chroma at the window's edge from inside the window only: a
    few edge pixels differ (under 1% of the crop before resizing), nothing else."""
    from data.pipeline import ImagePreprocessing, to_uint8

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(75, 100, 3), dtype=np.uint8)
    pixels = tf.image.resize(pixels[None], (150, 200))[0]  # smooth, as photos are
    encoded = ENCODERS[kind](tf.cast(pixels, tf.uint8))
    prep = ImagePreprocessing(size=32)
    for row in range(8):
        seed = tf.constant([3, row], tf.int64)
        fast = prep.train_encoded(encoded, seed)
        assert fast.dtype == tf.uint8 and fast.shape == (32, 32, 3)
        whole = to_uint8(prep.train(ImagePreprocessing.decode(encoded), seed))
        difference = np.abs(fast.numpy().astype(int) - whole.numpy().astype(int))
        if kind == "jpeg 4:2:0":
            assert difference.mean() < 0.5, (row, difference.mean())
        else:
            assert difference.max() <= 1, (row, difference.max())  # rounding only


def _png_file(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 16, 3), value, np.uint8)).save(path, format="PNG")


def write_sop(root, classes=(1, 2, 3, 4), per_class=3, first_test_class=3):
    """A tiny Stanford Online Products archive in the real layout: super-category
    folders and Ebay_train.txt / Ebay_test.txt ("image_id class_id super_class_id path")."""
    train = ["image_id class_id super_class_id path"]
    test = ["image_id class_id super_class_id path"]
    image_id = 0
    for class_id in classes:
        folder = "bicycle_final" if class_id % 2 else "cabinet_final"
        for i in range(per_class):
            image_id += 1
            relative = f"{folder}/{111085122870 + class_id}_{i}.JPG"
            _png_file(root / relative, class_id * 40 + i)
            line = f"{image_id} {class_id} {1 + class_id % 2} {relative}"
            (train if class_id < first_test_class else test).append(line)
    (root / "Ebay_train.txt").write_text("\n".join(train) + "\n")
    (root / "Ebay_test.txt").write_text("\n".join(test) + "\n")
    return root


def write_inshop(root):
    """A tiny In-Shop listing in its real format: a count line, a header line, then
    whitespace-aligned "image_name item_id evaluation_status"."""
    rows = []
    for n, (item, status) in enumerate(
        [("id_00000002", "train")] * 2 + [("id_00000007", "train")] * 2
        + [("id_00000003", "query"), ("id_00000003", "gallery"), ("id_00000009", "gallery")]
    ):  # fmt: skip
        name = f"img/WOMEN/Dresses/{item}/0{n}_1_front.jpg"
        _png_file(root / name, n * 20)
        rows.append(f"{name:<60}{item:<20}{status}")
    header = ["image_name item_id evaluation_status"]
    (root / "list_eval_partition.txt").write_text(
        "\n".join([str(len(rows)), *header, *rows]) + "\n"
    )
    return root


def test_list_file_reads_stanford_online_products_listings(tmp_path):
    root = write_sop(tmp_path / "Stanford_Online_Products")
    train = list_file(str(root), "Ebay_train.txt", path_column=3, label_column=1, skip_header=1)
    test = list_file(str(root), "Ebay_test.txt", path_column=3, label_column=1, skip_header=1)
    assert train.labels.tolist() == [1, 1, 1, 2, 2, 2]  # the listed class ids
    assert test.labels.tolist() == [3, 3, 3, 4, 4, 4]
    assert train.items[3] == str(root / "cabinet_final" / "111085122872_0.JPG")
    assert train.kind == "file" and test.class_names[4] == "4"


def test_list_file_reads_in_shop_partitions_by_status(tmp_path):
    root = write_inshop(tmp_path / "inshop")
    settings = dict(path_column=0, label_column=1, skip_header=2, keep_column=2)
    train = list_file(str(root), "list_eval_partition.txt", keep_values=("train",), **settings)
    evaluation = list_file(
        str(root), "list_eval_partition.txt", keep_values=("query", "gallery"), **settings
    )
    assert len(train) == 4 and len(evaluation) == 3
    assert [train.class_names[label] for label in train.labels] == ["id_00000002"] * 2 + [
        "id_00000007"
    ] * 2
    assert [evaluation.class_names[label] for label in evaluation.labels] == [
        "id_00000003", "id_00000003", "id_00000009"
    ]  # fmt: skip


def test_list_file_names_what_is_wrong(tmp_path):
    from data.errors import InputError

    root = write_sop(tmp_path / "sop")
    (root / "bicycle_final" / "111085122871_1.JPG").unlink()
    with pytest.raises(InputError, match=r"1 image\(s\) listed in .*Ebay_train.txt do not exist"):
        list_file(str(root), "Ebay_train.txt", path_column=3, label_column=1, skip_header=1)
    with pytest.raises(InputError, match=r"line 2 has 4 column\(s\), but list_file reads column 7"):
        list_file(str(root), "Ebay_test.txt", path_column=7, label_column=1, skip_header=1)
    with pytest.raises(InputError, match="list_file.listing .*Ebay_val.txt' is not a file"):
        list_file(str(root), "Ebay_val.txt")


def test_the_in_shop_config_builds_both_splits(tmp_path):
    import gin

    import trainer.config  # noqa: F401
    from trainer.evaluation import common_labels, evaluation

    root = write_inshop(tmp_path / "inshop")
    gin.clear_config()
    gin.add_config_file_search_path(os.path.join(ROOT, "gin"))
    try:
        gin.parse_config_files_and_bindings(
            [os.path.join(ROOT, "gin", "inshop.gin")], [f"INSHOP_ROOT='{root}'"]
        )
        with gin.config_scope("train_split"):
            train = list_file()
        with gin.config_scope("query_split"):
            queries = list_file()
        settings = evaluation()
        gallery = settings.gallery()
    finally:
        gin.clear_config()
    assert (len(train), len(queries), len(gallery)) == (4, 1, 2)
    assert settings.ks == (1, 10, 20, 30)  # In-Shop's published ks
    query_labels, gallery_labels = common_labels(queries, gallery)  # matched by item id
    assert query_labels[0] == gallery_labels[0] != gallery_labels[1]


def test_rows_are_regrouped_by_key_once_a_left_out_row_shifts_the_batches():
    """The training stream is batched by size; a row left out (it failed to decode)
    shifts every later batch. Each expected batch still gets exactly its own rows, and
    one whose every row failed at the end of the stream gets none."""
    keys = np.array([0, 1, 2, 3, 5, 6, 7, 8, 10], np.int64)  # 4, 9 and 11 failed
    images = tf.constant(keys[:, None] * 10.0)
    batches = iter(tf.data.Dataset.from_tensor_slices((keys, images)).batch(3))
    expected = [(np.arange(first, first + 3),) for first in (0, 3, 6, 9, 12)]
    got = list(_regrouped(batches, iter(expected)))
    assert [want[0][0] for _, want in got] == [0, 3, 6, 9, 12]
    rows = [keys.tolist() for (keys, _), _ in got]
    assert rows == [[0, 1, 2], [3, 5], [6, 7, 8], [10], []]
    for (keys, images), _ in got:
        np.testing.assert_array_equal(np.asarray(images)[:, 0], keys * 10.0)
