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

import gin
import numpy as np
import tensorflow as tf

from data.errors import InputError
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
        self.size, self.augment = size, augment
        self.crop_area, self.eval_crop = tuple(crop_area), eval_crop

    @staticmethod
    def decode(encoded):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return tf.cast(image, tf.float32)

    def train(self, image, seed):
        if self.augment:
            begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
                tf.shape(image),
                tf.zeros([1, 0, 4]),
                seed=seed,
                area_range=self.crop_area,
                aspect_ratio_range=(0.75, 1.333),
                min_object_covered=0.0,
                use_image_if_no_bounding_boxes=True,
            )
            image = tf.slice(image, begin, extent)
            image = tf.image.stateless_random_flip_left_right(image, seed=seed[::-1])
        return self._resize(image)

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


def preprocessing_for(source: Source):
    """The default preprocessing of a source's kind (gin configures each)."""
    return PixelAugmentation() if source.kind == "pixels" else ImagePreprocessing()


def _load(source: Source):
    """index -> the example's image tensor (pixels, or a decoded file or record)."""
    if source.kind == "pixels":
        pixels = tf.constant(source.items)
        return lambda i: tf.gather(pixels, i)
    decode = ImagePreprocessing.decode
    if source.kind == "file":
        paths = tf.constant(source.items.astype(str))
        return lambda i: decode(tf.io.read_file(tf.gather(paths, i)))
    records = tf.constant(list(source.items), tf.string)
    return lambda i: decode(tf.gather(records, i))


def train_batches(
    source: Source,
    sampler: PKSampler,
    rows: tuple[int, int],
    first_step: int,
    last_step: int,
    preprocessing=None,
) -> tf.data.Dataset:
    """(images, labels) of rows [start, end) of global batches first_step..last_step-1."""
    start, end = rows
    labels = tf.constant(source.labels)
    preprocessing = preprocessing or preprocessing_for(source)
    load = _load(source)
    seed = tf.constant(sampler.seed, tf.int64)

    def examples(step):
        picked = tf.numpy_function(
            lambda s: sampler.global_batch(int(s))[start:end], [step], tf.int64, stateful=False
        )
        picked = tf.reshape(picked, [end - start])
        rows_in_global = tf.range(start, end, dtype=tf.int64) + step * sampler.global_batch_size
        return tf.data.Dataset.from_tensor_slices((picked, rows_in_global))

    def example(index, global_row):
        image = preprocessing.train(load(index), tf.stack([seed, global_row]))
        return image, tf.gather(labels, index)

    return (
        tf.data.Dataset.range(first_step, last_step)
        .flat_map(examples)
        .map(example, num_parallel_calls=AUTOTUNE)
        .batch(end - start)
        .prefetch(AUTOTUNE)
    )


def eval_batches(source: Source, rows: list[tuple[int, int]], preprocessing=None):
    """(images, labels) batches of the given [start, end) row ranges, in order."""
    labels = tf.constant(source.labels)
    preprocessing = preprocessing or preprocessing_for(source)
    load = _load(source)
    bounds = tf.constant(rows, tf.int64)
    return (
        tf.data.Dataset.from_tensor_slices(bounds)
        .map(lambda b: tf.range(b[0], b[1]))
        .map(
            lambda i: (
                tf.map_fn(lambda j: preprocessing.eval(load(j)), i, fn_output_signature=tf.float32),
                tf.gather(labels, i),
            ),
            num_parallel_calls=AUTOTUNE,
        )
        .prefetch(AUTOTUNE)
    )


@gin.configurable
def verify_images(source: Source, on_corrupt: str = "stop") -> tuple[Source, list[str]]:
    """Decodes every image of a file or record source once, before training.

    A corrupt image found mid-run would stop the job hours in (or, if dropped there,
    leave the workers with batches of different sizes). `on_corrupt='stop'` raises an
    error naming the files; `'skip'` leaves them out of the source and returns their names.
    """
    if on_corrupt not in ("stop", "skip"):
        raise InputError(f"Unknown verify_images.on_corrupt {on_corrupt!r}; valid: 'stop', 'skip'.")
    if source.kind == "pixels":
        return source, []
    load = _load(source)
    decodable = (
        tf.data.Dataset.range(len(source))
        .map(lambda i: (i, tf.size(load(i))), num_parallel_calls=AUTOTUNE)
        .ignore_errors()
        .batch(1024)
    )
    good = np.zeros(len(source), bool)
    for indices, _ in decodable:
        good[indices.numpy()] = True
    bad = [_describe(source, i) for i in np.flatnonzero(~good)]
    if bad and on_corrupt == "stop":
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise InputError(
            f"{len(bad)} image(s) of {source.name} cannot be decoded: {shown}. Fix or remove "
            "them, or set verify_images.on_corrupt='skip' to leave them out."
        )
    return dataclasses.replace(source, items=source.items[good], labels=source.labels[good]), bad


def _describe(source: Source, index: int) -> str:
    return str(source.items[index]) if source.kind == "file" else f"record #{index}"
