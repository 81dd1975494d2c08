"""Embedding models: a small conv net for digits, keras.applications backbones for images.

Every model maps images to L2-normalized embeddings. None uses BatchNorm unless asked:
unsynchronized BatchNorm would make the loss depend on how the batch is split
(see `sync_batchnorm` for the synchronized kind).
"""

from __future__ import annotations

import glob
import os

import gin
import keras
import tensorflow as tf

from data.errors import InputError
from trainer.settings import check_types

# keras.applications constructor and preprocessing module per supported backbone, and the
# file name pattern of its ImageNet weights (no top) in the Keras cache.
BACKBONES = {
    "ResNet50": ("resnet50", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "EfficientNetV2B0": ("efficientnet_v2", "efficientnetv2-b0_notop.h5"),
    "EfficientNetV2S": ("efficientnet_v2", "efficientnetv2-s_notop.h5"),
    "MobileNetV3Small": ("mobilenet_v3", "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"),
    "MobileNetV3Large": ("mobilenet_v3", "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"),
}


BATCHNORM_MODES = ("frozen", "batch", "synchronized")


@gin.configurable
def digits_convnet(width: int = 64, pool: int = 4, embedding_dim: int | None = None) -> keras.Model:
    """Two 3×3 conv layers on the 8×8 digit, `pool`×`pool` average pooling, flattened,
    L2-normalized: (8 / pool)² × width dimensions.

    Keeping the coarse spatial layout and, by default, no projection head is what lets
    the embedding carry over to digit classes it never saw (a trained dense head
    collapses onto the six training classes); `embedding_dim` adds one anyway.
    """
    layers = [
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(width, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(width, 3, padding="same", activation="relu"),
    ]
    if pool > 1:
        layers.append(keras.layers.AveragePooling2D(pool))
    layers.append(keras.layers.Flatten())
    if embedding_dim:
        layers.append(keras.layers.Dense(embedding_dim))
    layers.append(keras.layers.UnitNormalization())
    return keras.Sequential(layers, name="digits_embedding")


@gin.configurable
def small_convnet(
    image_size: int = 32,
    widths: tuple = (32, 64),
    embedding_dim: int | None = None,
    channels: int = 3,
    grid: int = 4,
) -> keras.Model:
    """A conv net for small images (28 to 128 px, RGB or grayscale) in [0, 255]: a 3×3
    conv layer (ReLU) per entry of `widths`, 2×2 average pooling between them, average
    pooling to a `grid`×`grid` map, flattened, L2-normalized.

    Like `digits_convnet` it keeps the coarse spatial layout and has no projection head
    unless `embedding_dim` is set: on small product photos a trained dense head after
    global pooling collapses onto the training classes and carries over worse to
    classes it never saw (see BENCHMARKS.md, bench.real).
    """
    if not (isinstance(image_size, int) and 28 <= image_size <= 128):
        raise InputError(
            f"small_convnet.image_size must be 28 to 128 (pixels), got {image_size!r}."
        )
    widths = tuple(widths)
    if not widths or not all(isinstance(w, int) and w >= 1 for w in widths):
        raise InputError(f"small_convnet.widths must be whole numbers >= 1, got {widths!r}.")
    if channels not in (1, 3):
        raise InputError(f"small_convnet.channels must be 1 or 3, got {channels!r}.")
    if embedding_dim is not None and not (isinstance(embedding_dim, int) and embedding_dim >= 1):
        raise InputError(
            f"small_convnet.embedding_dim must be None or >= 1, got {embedding_dim!r}."
        )
    if not (isinstance(grid, int) and grid >= 1):
        raise InputError(f"small_convnet.grid must be a whole number >= 1, got {grid!r}.")
    layers = [keras.Input((image_size, image_size, channels)), keras.layers.Rescaling(1 / 255)]
    side = image_size
    for i, width in enumerate(widths):
        if i:
            layers.append(keras.layers.AveragePooling2D(2))
            side //= 2
        layers.append(keras.layers.Conv2D(width, 3, padding="same", activation="relu"))
    if side // grid > 1:
        layers.append(keras.layers.AveragePooling2D(side // grid))
    layers.append(keras.layers.Flatten())
    if embedding_dim:
        layers.append(keras.layers.Dense(embedding_dim))
    layers.append(keras.layers.UnitNormalization())
    return keras.Sequential(layers, name="small_convnet")


def imagenet_weights(backbone: str) -> str:
    """Path of the backbone's ImageNet weights in the Keras cache; a clear error if absent."""
    pattern = BACKBONES[backbone][1]
    cache = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "models")
    found = glob.glob(os.path.join(cache, pattern))
    if not found:
        raise InputError(
            f"ImageNet weights for {backbone} are not in {cache} (expected {pattern}). "
            "Training nodes often have no internet: on a machine that has, run "
            f"`python -c 'import keras; keras.applications.{backbone}(include_top=False)'` "
            f"and copy {os.path.join(cache, pattern)} here, or set "
            "backbone_embedding.weights=None to train from scratch."
        )
    return found[0]


@gin.configurable
def backbone_embedding(
    backbone: str = "ResNet50",
    embedding_dim: int = 128,
    image_size: int = 224,
    weights: str | None = "imagenet",
    batchnorm: str | None = None,
) -> keras.Model:
    """A keras.applications backbone (global average pooled) plus a dense, L2-normalized head.

    Inputs are RGB images in [0, 255]; the backbone's own preprocessing is part of the
    model, so the exported SavedModel takes raw pixels. `weights`: "imagenet" (from the
    local Keras cache only, never downloaded), a path to a weights file, or None.

    `batchnorm`: 'frozen' (the pretrained statistics, never updated: the usual choice
    when fine-tuning on CUB, Cars or SOP with small P×K batches, whose few classes per
    batch make poor population estimates), 'batch' (each replica's batch statistics in
    training, moving averages for inference) or 'synchronized' (batch statistics over
    the global batch: the same loss for any replica count). None: 'frozen' with
    pretrained weights, 'batch' from scratch (frozen random statistics would not train).
    """
    if batchnorm is None:
        batchnorm = "batch" if weights is None else "frozen"
    if batchnorm not in BATCHNORM_MODES:
        raise InputError(
            f"Unknown backbone_embedding.batchnorm {batchnorm!r}; valid values are "
            f"{BATCHNORM_MODES} (or None: 'frozen' with pretrained weights, else 'batch')."
        )
    if backbone not in BACKBONES:
        raise InputError(
            f"Unknown backbone_embedding.backbone {backbone!r}; valid values are "
            f"{tuple(BACKBONES)}."
        )
    module = getattr(keras.applications, BACKBONES[backbone][0])
    constructor = getattr(keras.applications, backbone)
    path = imagenet_weights(backbone) if weights == "imagenet" else weights
    if path is not None and not os.path.exists(path):
        raise InputError(f"backbone_embedding.weights file {path!r} does not exist.")
    base = constructor(
        include_top=False, weights=None, input_shape=(image_size, image_size, 3), pooling="avg"
    )
    if path is not None:
        base.load_weights(path)
    if batchnorm == "frozen":
        for layer in _all_layers(base):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False  # Keras 3: inference mode, statistics kept
    inputs = keras.Input((image_size, image_size, 3))
    features = base(module.preprocess_input(inputs))
    head = keras.layers.Dense(embedding_dim, dtype="float32", name="embedding")(features)
    outputs = keras.layers.UnitNormalization(dtype="float32")(head)
    model = keras.Model(inputs, outputs, name=f"{backbone}_embedding")
    model.synchronized_batchnorm = batchnorm == "synchronized"  # applied by the learner
    return model


@gin.configurable("batchnorm")
def batchnorm_settings(synchronized: bool = False) -> bool:
    """Whether every BatchNorm layer of the model takes its moments over the global batch
    (all replicas' rows) rather than its replica's slice (gin/base.gin)."""
    check_types("batchnorm", batchnorm_settings, dict(locals()))
    return synchronized


def sync_batchnorm(model: keras.Model, replicas) -> int:
    """Makes every BatchNormalization layer compute its batch moments over all replicas.

    The moments come from one summing all-reduce of (sum, sum of squares, count) through
    the replica abstraction, so it works on every backend and keeps the loss independent
    of how the global batch is split. Returns the number of layers changed.
    """
    changed = 0
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer._moments = _global_moments(layer, replicas)
            changed += 1
    return changed


def batchnorm_layers(model) -> list:
    """The BatchNormalization layers of `model` (nested models included) that train:
    a frozen one (trainable=False) runs on its fixed statistics."""
    return [
        layer
        for layer in _all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _global_moments(layer, replicas, record=None):
    """The layer's batch moments over every replica's rows (one summing all-reduce of
    sum, sum of squares and count). `record(mean, mean_of_squares)`, if given, receives
    the float32 global moments (trainer/step/batchnorm.py's re-estimation)."""

    def moments(inputs, mask):
        if mask is not None:
            raise ValueError(f"Synchronized BatchNorm ({layer.name}) does not support masks.")
        x = tf.cast(inputs, tf.float32)
        axes = layer._reduction_axes
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float32)
        local = tf.concat(
            [tf.reduce_sum(x, axes), tf.reduce_sum(tf.square(x), axes), count[None]], axis=0
        )
        total = replicas.all_reduce_sum(local)
        channels = (tf.shape(total)[0] - 1) // 2
        mean = total[:channels] / total[-1]
        mean_of_squares = total[channels:-1] / total[-1]
        if record is not None:
            record(mean, mean_of_squares)
        variance = tf.maximum(mean_of_squares - tf.square(mean), 0.0)
        return tf.cast(mean, inputs.dtype), tf.cast(variance, inputs.dtype)

    return moments
