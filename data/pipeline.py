"""tf.data pipelines: this process's rows of each global P×K batch, and the eval set.

Sharding happens on indices: the sampler names the global batch of each step, the
process keeps its contiguous rows [start, end) and decodes only those, in parallel,
with prefetching. Image augmentation (random resized crop, horizontal flip) is
stateless and seeded by (seed, step, row in the global batch), so every example is
augmented the same way whatever the number of replicas: the global batch, augmented,
is still a function of the seed and the step alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import gin
import numpy as np
import tensorflow as tf

from data.cached_work import cached, current, fingerprint
from data.errors import InputError
from data.reading import encoded_image, raw_bytes
from data.sampler import PKSampler
from data.sources import Source

AUTOTUNE = tf.data.AUTOTUNE


@gin.configurable("images")
class ImagePreprocessing:
    """Decode and resize (and augment, for training) images to `size`×`size`×3 in [0, 255].

    Training: random resized crop covering `crop_area` of the image (aspect 3/4 to 4/3),
    random horizontal flip. Evaluation: central crop of `eval_crop` of each side, resize.
    """

    def __init__(self, size=224, augment=True, crop_area=(0.35, 1.0), eval_crop=0.875):
        if not (isinstance(size, int) and size >= 1):
            raise InputError(f"images.size must be a whole number >= 1, got {size!r}.")
        if not (len(crop_area) == 2 and 0 < crop_area[0] <= crop_area[1] <= 1):
            raise InputError(
                "images.crop_area must be (low, high) with 0 < low <= high <= 1, "
                f"got {crop_area!r}."
            )
        if not 0 < eval_crop <= 1:
            raise InputError(f"images.eval_crop must be in (0, 1], got {eval_crop!r}.")
        self.size, self.augment = size, augment
        self.crop_area, self.eval_crop = tuple(crop_area), eval_crop

    @staticmethod
    def decode(encoded):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return tf.cast(image, tf.float32)

    def train(self, image, seed):
        """A decoded image -> its augmented crop, float32."""
        if self.augment:
            begin, extent = self._window(tf.shape(image), seed)
            image = tf.slice(image, begin, extent)
            image = tf.image.stateless_random_flip_left_right(image, seed=seed[::-1])
        return self._resize(image)

    def train_encoded(self, encoded, seed):
        """Encoded image bytes -> the same augmented crop as `train`, as uint8 (a quarter
        of float32's bytes to the device, where the step makes it float). A JPEG is
        decoded only inside its crop window; other formats whole, then cropped."""
        if not self.augment:
            return to_uint8(self._resize(self.decode(encoded)))

        def jpeg_window():
            begin, extent = self._window(tf.image.extract_jpeg_shape(encoded), seed)
            window = tf.stack([begin[0], begin[1], extent[0], extent[1]])
            return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

        def decoded_then_cropped():
            image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
            begin, extent = self._window(tf.shape(image), seed)
            return tf.slice(image, begin, extent)

        crop = tf.cond(tf.io.is_jpeg(encoded), jpeg_window, decoded_then_cropped)
        crop = tf.image.stateless_random_flip_left_right(crop, seed=seed[::-1])
        return to_uint8(self._resize(crop))

    def _window(self, shape, seed):
        """The random crop's (begin, extent) in an image of `shape` (H, W, C)."""
        begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            tf.zeros([1, 0, 4]),
            seed=seed,
            area_range=self.crop_area,
            aspect_ratio_range=(0.75, 1.333),
            min_object_covered=0.0,
            use_image_if_no_bounding_boxes=True,
        )
        return begin, extent

    def eval(self, image):
        return self._resize(tf.image.central_crop(image, self.eval_crop))

    def _resize(self, image):
        image = tf.image.resize(image, (self.size, self.size), antialias=True)
        image.set_shape((self.size, self.size, 3))
        return image


@gin.configurable("pixels")
class PixelAugmentation:
    """Small-image augmentation for pixel sources: a random affine warp (rotation up to
    `rotation` degrees, scale by 1 ± `scale`, shear up to `shear`, shift up to `shift`
    pixels; bilinear, zero fill). Digits differ mostly in pose, slant and size; learning
    to ignore those is what carries over to classes the model never saw."""

    def __init__(self, rotation=12.0, scale=0.1, shear=0.15, shift=1.0):
        self.rotation, self.scale, self.shear, self.shift = rotation, scale, shear, shift

    def train(self, image, seed):
        u = tf.random.stateless_uniform([5], seed=seed, minval=-1.0, maxval=1.0)
        angle = u[0] * self.rotation * np.pi / 180.0
        zoom = 1.0 + u[1] * self.scale
        cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
        # Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2), about the centre.
        a0, a1, b0, b1 = cos, -sin + u[2] * self.shear, sin, cos
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        cy = (tf.cast(height, tf.float32) - 1.0) / 2.0
        cx = (tf.cast(width, tf.float32) - 1.0) / 2.0
        a2 = cx - a0 * cx - a1 * cy + u[3] * self.shift
        b2 = cy - b0 * cx - b1 * cy + u[4] * self.shift
        transform = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[None]
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=image[None],
            transforms=transform,
            output_shape=tf.shape(image)[:2],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="CONSTANT",
        )[0]

    def eval(self, image):
        return image


def to_uint8(image):
    """Float pixels in [0, 255] -> uint8, rounded."""
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def preprocessing_for(source: Source):
    """The default preprocessing of a source's kind (gin configures each)."""
    return PixelAugmentation() if source.kind == "pixels" else ImagePreprocessing()


def _load(source: Source):
    """index -> the example's image tensor (pixels, or a decoded file or record)."""
    if source.kind == "pixels":
        pixels = tf.constant(source.items)
        return lambda i: tf.gather(pixels, i)
    encoded = _encoded(source)
    return lambda i: ImagePreprocessing.decode(encoded(i))


def _encoded(source: Source):
    """index -> the example's encoded image bytes (files and records)."""
    if source.kind == "file":
        paths = tf.constant(source.items.astype(str))
        return lambda i: tf.io.read_file(tf.gather(paths, i))
    reader, records = source.reader, source.items

    def encoded(i):
        serialized = tf.numpy_function(
            lambda i: reader.read(records[i]), [i], tf.string, stateful=False
        )
        serialized.set_shape([])
        return reader.parse_image(serialized)

    return encoded


def encoded_images(source: Source, indices) -> list[bytes]:
    """The encoded bytes (a file's, or a record's image) of examples `indices` of a file
    or record source: what a server would be sent."""
    encoded = _encoded(source)
    return [encoded(tf.constant(int(i), tf.int64)).numpy() for i in indices]


def _read_records(source: Source, indices: np.ndarray) -> np.ndarray:
    """The serialized records of `indices`, in one call (one Python entry per batch, not
    per record; `os.pread` releases the GIL). A record that cannot be read is b"", which
    fails to parse, so its row is substituted like any unreadable image."""
    reader, records = source.reader, source.items
    out = np.empty(len(indices), object)
    for position, i in enumerate(indices):
        try:
            out[position] = reader.read(records[i])
        except OSError:
            out[position] = b""
    return out


def substitutes(labels) -> np.ndarray:
    """For each example, the next example of its class (cyclically; itself when alone).

    A row whose image cannot be read at run time (a file changed after the start-up
    check) is filled with its substitute, so every replica keeps its number of rows and
    the P×K layout holds; the row is reported (see `_every_row`).
    """
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    following = np.arange(1, len(order) + 1)
    following[starts + counts - 1] = starts  # the last of a class wraps to its first
    result = np.empty_like(order)
    result[order] = order[following]
    return result


def _decoded(source: Source, keys, rows: tf.data.Dataset, size, prepare) -> tf.data.Dataset:
    """The `size` rows of one batch, (key, *args) -> exactly one batch (keys, images),
    decoded in parallel, in order. A row whose image fails to decode is left out (files
    and records; pixels cannot fail), and a batch whose every row failed is an empty
    batch, never a missing one. `keys` identify the rows (the global row of a training
    step, the example of an evaluation batch): `_every_row` matches them, not positions.
    """
    prepared = tf.data.Dataset.zip(keys, rows).map(
        lambda key, row: (key, prepare(*row)), num_parallel_calls=AUTOTUNE
    )
    if source.kind == "pixels":
        return prepared.batch(size)
    survivors = prepared.ignore_errors()
    key_spec, image_spec = survivors.element_spec
    nothing = tf.data.Dataset.from_tensors(
        (
            tf.zeros([0], key_spec.dtype),
            tf.zeros([0, *[d or 0 for d in image_spec.shape]], image_spec.dtype),
        )
    )
    return survivors.batch(size).concatenate(nothing).take(1)


def _every_row(batches, expected, source: Source, prepare, prepare_encoded=None):
    """Yields (images, labels, ok) with every expected row of each batch.

    `batches` gives (keys, images) with failed rows left out, keys rising (see
    `_regrouped`); `expected` gives, per batch, the (keys, indices, *args) of every row,
    keys in order. Rows are placed by
    their keys: a batch holding a row of another batch is an error, never a silent
    shift of labels. A missing row (its image became unreadable after the start-up
    check) is first read again in Python (data/reading.py): an I/O error is retried,
    and stops the job if it persists; bytes that come back are decoded by
    `prepare_encoded(encoded, *args)`, and the row is whole again. Bytes that do not
    decode make it corrupt: filled with its substitute (`substitutes`), or zeros if that
    fails too, and marked False in `ok`: no replica is ever a row short. The normal path
    costs nothing but the check.
    """
    substitute_of = None
    for (keys, images), (expected_keys, indices, *args) in _regrouped(batches, expected):
        labels = tf.constant(source.labels[indices])
        positions = keys - expected_keys[0]
        inside = (positions >= 0) & (positions < len(expected_keys))
        if not inside.all() or np.any(expected_keys[positions[inside]] != keys):
            raise RuntimeError(
                f"the input pipeline gave rows {keys[:5].tolist()}... for the batch of "
                f"rows {expected_keys[0]}..{expected_keys[-1]}: its batches are out of order"
            )
        ok = np.zeros(len(indices), bool)
        ok[positions] = True
        if ok.all():
            yield images, labels, ok
            continue
        if substitute_of is None:
            substitute_of = substitutes(source.labels)
        full = np.zeros((len(indices), *images.shape[1:]), images.dtype.as_numpy_dtype)
        if len(positions):
            full[positions] = images.numpy()
        for row in np.flatnonzero(~ok):
            if prepare_encoded is not None:
                recovered = _read_again(
                    source, indices[row], prepare_encoded, [a[row] for a in args]
                )
                if recovered is not None:  # a passing I/O error: the row is its own again
                    full[row], ok[row] = recovered, True
                    continue
            try:
                full[row] = prepare(
                    tf.constant(substitute_of[indices[row]], tf.int64),
                    *(tf.constant(a[row], tf.int64) for a in args),
                )
            except (tf.errors.OpError, ValueError):
                pass  # its substitute cannot be read either: zeros
        yield tf.constant(full), labels, ok


def _regrouped(batches, expected):
    """Pairs each expected batch with the rows of `batches` whose keys belong to it.

    `batches` holds the rows in rising key order, any number at a time, with the rows
    that failed left out. While none failed, each of its batches is one expected batch
    (passed on as it is); after a failure the rows are split and joined by key. Yields
    ((keys, images), expected batch); `batches` is a tf.data iterator (its element_spec
    shapes an empty batch). A row of a later batch given early is an error in
    `_every_row`; rows left over at the end are one here.
    """
    pending = None  # (keys, images) taken from `batches` and not yet used
    for want in expected:
        last = want[0][-1]
        keys_parts, image_parts = [], []
        while True:
            if pending is None:
                got = next(batches, None)
                if got is None:
                    break
                pending = (got[0].numpy(), got[1])
            keys, images = pending
            within = int(np.searchsorted(keys, last, side="right"))
            if within < len(keys):  # the rest belongs to later batches
                keys_parts.append(keys[:within])
                image_parts.append(images[:within])
                pending = (keys[within:], images[within:])
                break
            keys_parts.append(keys)
            image_parts.append(images)
            pending = None
            if len(keys) and keys[-1] == last:
                break
        if len(keys_parts) == 1:
            yield (keys_parts[0], image_parts[0]), want
        elif not keys_parts:  # the last batches' every row failed: they are all to fill
            _, image_spec = batches.element_spec
            shape = [0, *[d or 0 for d in image_spec.shape[1:]]]
            yield (np.zeros(0, np.int64), tf.zeros(shape, image_spec.dtype)), want
        else:
            yield (np.concatenate(keys_parts), tf.concat(image_parts, 0)), want
    if (pending is not None and len(pending[0])) or next(batches, None) is not None:
        raise RuntimeError("the input pipeline gave more rows than its batches hold")


def _read_again(source: Source, index, prepare_encoded, args):
    """Example `index` read in Python (I/O errors retried; DataIOError when they
    persist) and prepared; None when its bytes do not decode (a corrupt image)."""
    raw = raw_bytes(source, int(index))
    try:
        encoded = tf.constant(encoded_image(source, raw))
        return prepare_encoded(encoded, *(tf.constant(a, tf.int64) for a in args)).numpy()
    except (tf.errors.OpError, ValueError):
        return None


def train_batches(
    source: Source,
    sampler: PKSampler,
    rows: tuple[int, int],
    first_step: int,
    last_step: int,
    preprocessing=None,
):
    """(images, labels, ok) of rows [start, end) of global batches first_step..last_step-1.

    Images of files and records are uint8 (the step makes them float on the device),
    pixels float32. `ok` is False for a row whose image could not be read and was
    substituted.
    """
    start, end = rows
    preprocessing = preprocessing or preprocessing_for(source)
    seed = tf.constant(sampler.seed, tf.int64)
    from_bytes = source.kind != "pixels" and hasattr(preprocessing, "train_encoded")

    def rows_of(step):
        return sampler.global_batch(step)[start:end], np.arange(start, end) + (
            step * sampler.global_batch_size
        )

    drawn = {}  # step -> rows_of(step), drawn by the pipeline ahead of `expected_rows`

    def draw(step):
        drawn[step] = rows_of(step)  # (the sampler once per step: on small images its
        return drawn[step]  # Python, run twice, cost a few per cent of the rate)

    prepare_encoded = None
    if from_bytes:
        encoded = _encoded(source)

        def prepare_encoded(image, global_row):
            return preprocessing.train_encoded(image, tf.stack([seed, global_row]))

        def prepare(index, global_row):  # one example by index (also a substitute)
            return prepare_encoded(encoded(index), global_row)

        def prepare_record(serialized, global_row):
            image = source.reader.parse_image(serialized)
            return preprocessing.train_encoded(image, tf.stack([seed, global_row]))
    else:
        load = _load(source)

        def prepare(index, global_row):
            return preprocessing.train(load(index), tf.stack([seed, global_row]))

    def step_rows(step):
        """The step's rows: (index or serialized record, global row), one element each."""
        picked, global_rows = tf.numpy_function(
            lambda s: draw(int(s)), [step], (tf.int64, tf.int64), stateful=False
        )
        picked, global_rows = tf.reshape(picked, [end - start]), tf.reshape(global_rows, [-1])
        if from_bytes and source.kind == "record":  # one read call per step, GIL released
            picked = tf.numpy_function(
                lambda indices: _read_records(source, indices),
                [picked],
                tf.string,
                stateful=False,
            )
            picked.set_shape([end - start])
        return picked, global_rows

    per_row = prepare_record if from_bytes and source.kind == "record" else prepare
    # One stream of rows over every step, decoded in parallel, in order: no pipeline
    # built per step (those cost 0.08-0.23 ms per image beyond decoding, this 0.02-0.05:
    # BENCHMARKS.md).
    rows = (
        tf.data.Dataset.range(first_step, last_step)
        .map(step_rows)
        .unbatch()
        .map(lambda row, key: (key, per_row(row, key)), num_parallel_calls=AUTOTUNE)
    )
    if source.kind != "pixels":
        rows = rows.ignore_errors()  # a failed row is left out; _every_row fills it
    batches = rows.batch(end - start).prefetch(AUTOTUNE)

    def expected_rows(step):
        rows = drawn.pop(step, None)
        for earlier in [s for s in list(drawn) if s < step]:  # drawn after we computed them
            drawn.pop(earlier, None)
        indices, global_rows = rows if rows is not None else rows_of(step)
        return global_rows, indices, global_rows

    expected = (expected_rows(step) for step in range(first_step, last_step))
    return _every_row(iter(batches), expected, source, prepare, prepare_encoded)


def eval_batches(source: Source, rows: list[tuple[int, int]], preprocessing=None):
    """(images, labels, ok) batches of the given [start, end) row ranges, in order."""
    preprocessing = preprocessing or preprocessing_for(source)
    load = _load(source)

    def prepare(index):
        return preprocessing.eval(load(index))

    def chunk(bounds):
        keys = tf.data.Dataset.range(bounds[0], bounds[1])
        return _decoded(source, keys, keys.map(lambda i: (i,)), bounds[1] - bounds[0], prepare)

    batches = (
        tf.data.Dataset.from_tensor_slices(tf.constant(rows, tf.int64))
        .interleave(chunk, cycle_length=2, num_parallel_calls=2, deterministic=True)
        .prefetch(AUTOTUNE)
    )
    expected = ((np.arange(first, last), np.arange(first, last)) for first, last in rows)

    def prepare_encoded(image):
        return preprocessing.eval(ImagePreprocessing.decode(image))

    return _every_row(
        iter(batches),
        expected,
        source,
        prepare,
        None if source.kind == "pixels" else prepare_encoded,
    )


def unreadable(source: Source, indices) -> list[str]:
    """Which of the examples `indices` cannot be read and decoded now, by name."""
    load = _load(source)
    bad = []
    for i in indices:
        try:
            load(tf.constant(i, tf.int64))
        except (tf.errors.OpError, ValueError):
            bad.append(source.describe(int(i)))
    return bad


@gin.configurable(denylist=["source", "log"])
def verify_images(source: Source, on_corrupt: str = "stop", log=None) -> tuple[Source, list[str]]:
    """Decodes every image of a file or record source once per data set, before training.

    A corrupt image found mid-run would stop the job hours in. `on_corrupt='stop'`
    raises an error naming the files; `'skip'` leaves them out of the source and returns
    their names. The job's processes each check their share and the verdict is cached,
    keyed to the files (data/cached_work.py): a restart reads it back. `log(message)`
    reports progress.
    """
    check_on_corrupt(on_corrupt)
    if source.kind == "pixels":
        return source, []
    work = current()
    log = log or (lambda message: None)

    def check() -> np.ndarray:
        start, end = work.share(len(source))
        log(
            f"checking the {len(source):,} images of {source.name} once (this worker: "
            f"{end - start:,}; the verdict is cached for later starts)"
        )
        return work.combine(len(source), start, _decodable(source, start, end, log))

    good = cached("image-check", _fingerprint(source), check)
    good = good.astype(bool)
    bad = [source.describe(i) for i in np.flatnonzero(~good)]
    if bad and on_corrupt == "stop":
        raise InputError(
            f"{len(bad)} image(s) of {source.name} cannot be decoded: {listed(bad)}. Fix or "
            "remove them, or set verify_images.on_corrupt='skip' to leave them out."
        )
    return dataclasses.replace(source, items=source.items[good], labels=source.labels[good]), bad


def corrupt_policy() -> str:
    """`verify_images.on_corrupt` as configured: what an image unreadable at run time gets."""
    policy = gin.get_bindings(verify_images).get("on_corrupt", "stop")
    check_on_corrupt(policy)
    return policy


def check_on_corrupt(on_corrupt: str) -> None:
    if on_corrupt not in ("stop", "skip"):
        raise InputError(f"Unknown verify_images.on_corrupt {on_corrupt!r}; valid: 'stop', 'skip'.")


def _fingerprint(source: Source) -> str:
    """The key of a source's image check: its files as they are now, and its rows."""
    if source.kind == "file":
        return fingerprint(source.items, "image-check")
    rows = hashlib.sha1(np.ascontiguousarray(source.items).tobytes()).hexdigest()
    return fingerprint(source.reader.files, "image-check", source.reader.image_key, rows)


def _decodable(source: Source, start: int, end: int, log, every_seconds: float = 10.0):
    """Whether each example in [start, end) decodes (bool array of end - start)."""
    load = _load(source)
    checked = (
        tf.data.Dataset.range(start, end)
        .map(lambda i: (i, tf.size(load(i))), num_parallel_calls=AUTOTUNE)
        .ignore_errors()
        .batch(1024)
    )
    good = np.zeros(end - start, bool)
    last = began = time.time()
    for done, (indices, _) in enumerate(checked):
        good[indices.numpy() - start] = True
        if time.time() - last >= every_seconds:
            last = time.time()
            log(
                f"  checked {min((done + 1) * 1024, end - start):,}/{end - start:,} images "
                f"({(time.time() - began):.0f}s)"
            )
    # A failure is corrupt only if the bytes read and do not decode; an I/O error is
    # retried, and stops the job (never cached as corrupt) if it persists.
    for offset in np.flatnonzero(~good):
        recovered = _read_again(source, start + offset, ImagePreprocessing.decode, [])
        good[offset] = recovered is not None
    return good


def listed(names: list[str], shown: int = 5) -> str:
    """The first `shown` names, and how many more, for messages."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
