"""Global-batch mining in plain Keras `model.fit`.

`GlobalMiningModel(embedding_model)` wraps any embedding model. Its training step is the
trainer's own (`trainer.step.train_step.replica_step` over `trainer/step/global_loss.py`): each
replica mines its anchors against the embeddings gathered from every replica, with the
global normalizer and exact gradients. The backend comes from the context the model is
built in: the tf.distribute strategy whose scope is open (MirroredStrategy,
MultiWorkerMirroredStrategy), Horovod when the script runs under `horovodrun` (each
worker feeds its own contiguous slice of every global batch), else one device.

    with tf.distribute.MirroredStrategy().scope():
        model = GlobalMiningModel(embedding_net)
        model.compile(optimizer="adam", loss=TripletSemiHardLoss(margin=0.2, distance="cosine"))
    model.fit(dataset, epochs=10)

Under horovodrun, importing this module puts each worker on the GPU of its local rank
(`trainer.backends.placement.place_worker`), so import it before building the model.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from trainer.backends.placement import place_worker
from trainer.backends.replicas import HorovodReplicas, from_context, launched_by_horovodrun
from trainer.model import batchnorm_layers
from trainer.step.class_centres import centres_for_optimizer
from trainer.step.global_loss import loss_and_statistics
from trainer.step.grad_cache import check_chunk_size
from trainer.step.proxy_loss import proxy_loss_and_statistics
from trainer.step.train_step import METRICS, metrics_vector, model_forward, replica_step

if launched_by_horovodrun():
    # Before the user's script builds a model: each worker the GPU of its local rank.
    place_worker()

PACKAGE = "metric_trainer"
# The step's figures in fit's logs, History and callbacks (each the mean over the epoch).
# The memory is the trainer's (train.cross_batch_memory); fit has none to report.
FIT_METRICS = tuple(m for m in METRICS if m not in ("finite_gradients", "memory_negative_fraction"))
_FIT_INDEX = [METRICS.index(m) for m in FIT_METRICS]


@keras.saving.register_keras_serializable(package=PACKAGE)
class GlobalMiningModel(keras.Model):
    """A `keras.Model` whose `fit` mines over the global batch of all replicas.

    `predict` and `__call__` return the embeddings; `evaluate` gives the loss of each
    global batch, mined the same way. `cross_replica_mining=False` mines each replica's
    slice alone (the usual data-parallel behaviour, for comparison).
    `jit_compile_model=True` compiles the embedding model's forward and backward passes
    with XLA; the mining stays outside, as its shapes depend on the labels.
    `embedding_chunk_size=n` embeds each replica's slice n rows at a time, twice, with
    the loss's cached gradient (GradCache, trainer/step/grad_cache.py): the same loss and
    gradients as unchunked (for a model without training BatchNorm), at one chunk's
    activation memory, for about one extra forward pass.
    """

    def __init__(
        self,
        embedding_model: keras.Model,
        cross_replica_mining: bool = True,
        jit_compile_model: bool = False,
        embedding_chunk_size: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(embedding_model, keras.Model):
            raise TypeError(
                "GlobalMiningModel wraps a keras.Model (the embedding model), got "
                f"{type(embedding_model).__name__}."
            )
        self.embedding_model = embedding_model
        self.cross_replica_mining = bool(cross_replica_mining)
        self.jit_compile_model = bool(jit_compile_model)
        self.embedding_chunk_size = check_chunk_size(  # an InputError is a ValueError
            embedding_chunk_size, "GlobalMiningModel(embedding_chunk_size=...)"
        )
        if self.embedding_chunk_size is not None:
            _refuse_synchronized_batchnorm(embedding_model)
        self._forward = model_forward(embedding_model, self.jit_compile_model)
        self.replicas = from_context()
        self._means = EpochMeans(FIT_METRICS)

    def call(self, inputs, training=False):
        return self.embedding_model(inputs, training=training)

    @property
    def metrics(self):
        return [self._means]

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, jit_compile="auto", **kwargs):
        """Keras' compile, for a loss of `losses` with a query/key form. The step runs
        without XLA: Keras' 'auto' would choose it on one GPU, and it cannot compile the
        mining (nor Horovod's collectives, which have no XLA kernels in this build)."""
        if hasattr(loss, "memory_size"):
            raise ValueError(
                "GlobalMiningModel cannot take CrossBatchMemory: its memory would hold each "
                "replica's own slice. Compile the wrapped loss, or use the training job's "
                "memory of global batches (train.cross_batch_memory)."
            )
        proxy = callable(getattr(loss, "block", None))
        if proxy and (loss.num_classes is None or not self.cross_replica_mining):
            raise ValueError(
                f"GlobalMiningModel with {type(loss).__name__} needs its num_classes set, "
                "and cross_replica_mining=True (the centres are sharded over the replicas)."
            )
        self.centres = None  # built at fit, when the embedding width is known
        if not (proxy or callable(getattr(loss, "terms", None))):
            raise ValueError(
                f"GlobalMiningModel needs a loss that can be mined over a batch (a class of "
                f"`losses` with a query/key form, e.g. TripletSemiHardLoss()), got {loss!r}."
            )
        if metrics or kwargs.get("weighted_metrics"):
            raise ValueError(
                "GlobalMiningModel logs its own step metrics ("
                + ", ".join(FIT_METRICS)
                + "); compile's `metrics` has no per-example meaning for a batch loss."
            )
        if jit_compile is True:
            raise ValueError(
                "GlobalMiningModel cannot be compiled with jit_compile=True: the mining's "
                "shapes depend on the labels (how many positives each anchor has), which XLA "
                "cannot compile. Leave jit_compile at 'auto' or False, and compile the "
                "embedding model alone with GlobalMiningModel(..., jit_compile_model=True)."
            )
        super().compile(optimizer=optimizer, loss=loss, jit_compile=False, **kwargs)

    def compile_from_config(self, config):
        """Recompiles a loaded model (Keras skips that for a model with its own compile)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(self, x=None, y=None, **kwargs):
        """Keras' fit. Under Horovod the workers first take rank 0's weights."""
        if callable(getattr(self.loss, "block", None)) and self.centres is None:
            self._build_centres(x)
        if isinstance(self.replicas, HorovodReplicas):
            self._start_from_chief(x)
        return super().fit(x, y, **kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kwargs):
        # Keras calls this only to build the model symbolically (the steps here compute
        # their own loss); a proxy loss's own call would need the whole centre matrix.
        if getattr(self, "centres", None) is not None:
            return tf.constant(0.0)
        return super().compute_loss(x, y, y_pred, sample_weight, **kwargs)

    def _build_model(self, x) -> None:
        """Creates an unbuilt embedding model's weights from one all-zeros input of x."""
        if not self.embedding_model.built or not self.embedding_model.weights:
            self.embedding_model(_example_batch(x), training=False)

    def _build_centres(self, x) -> None:
        """A proxy loss's centres, sharded over the replicas like the trainer's
        (trainer/step/class_centres.py; `self.centres.save` / `restore` checkpoint them)."""
        self._build_model(x)
        width = self.embedding_model.output_shape[-1]
        self.centres = centres_for_optimizer(
            self.loss, self.replicas, self.loss.num_classes, width, self.optimizer
        )

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3 builds the model on the mean of a distributed batch over replicas, which
        # MultiWorkerMirroredStrategy cannot take outside a step (keras-team/keras#20585:
        # plain Keras fit fails there). The first replica's values build it as well.
        if self.replicas.name == "multi_worker" and iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(self._first_replica, next(batches))
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _first_replica(self, value):
        if isinstance(value, tf.distribute.DistributedValues):
            return self.distribute_strategy.experimental_local_results(value)[0]
        return value

    def train_step(self, data):
        x, y = _inputs_and_labels(data)
        metrics, _ = replica_step(
            self,
            self.optimizer,
            self.loss,
            self.replicas,
            x,
            y,
            self.cross_replica_mining,
            self._replica_rows(y),
            check_finite=False,  # fit's logs leave finite_gradients out
            forward=self._forward,
            centres=getattr(self, "centres", None),
            embedding_chunk_size=self.embedding_chunk_size,
        )
        return self._logged(metrics)

    def test_step(self, data):
        x, y = _inputs_and_labels(data)
        embeddings = self(x, training=False)
        rows = self._replica_rows(y)
        if getattr(self, "centres", None) is not None:
            value, stats = proxy_loss_and_statistics(
                self.centres, self.replicas, embeddings, y, rows
            )
        else:
            value, stats = loss_and_statistics(
                self.loss, self.replicas, embeddings, y, self.cross_replica_mining, rows
            )
        return self._logged(metrics_vector(value, stats, finite=True))

    def _replica_rows(self, labels):
        """Each replica's rows when the batch shape fixes them (drop_remainder=True): the
        gather then needs no exchange of row counts."""
        return self.replicas.rows_from_static_shape(tf.TensorShape(labels.shape)[0])

    def _logged(self, metrics) -> dict:
        self._means.update_state(tf.gather(metrics, _FIT_INDEX))
        logs = dict(zip(FIT_METRICS, tf.unstack(self._means.result()), strict=True))
        if self.replicas.name == "multi_worker":
            # Keras 3 averages the logs of MultiWorkerMirroredStrategy's replicas along
            # axis 0, which a scalar lacks (keras-team/keras#20585); the mean of one-element
            # vectors is the same scalar.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    def _start_from_chief(self, x) -> None:
        """Builds the weights and optimizer state, then broadcasts rank 0's to every
        worker, so that workers started from different weights train as one."""
        self._build_model(x)
        if self.optimizer is not None and not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)
        optimizer_variables = self.optimizer.variables if self.optimizer is not None else []
        self.replicas.broadcast_variables([*self.variables, *optimizer_variables])

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "embedding_model": keras.saving.serialize_keras_object(self.embedding_model),
            "cross_replica_mining": self.cross_replica_mining,
            "jit_compile_model": self.jit_compile_model,
            "embedding_chunk_size": self.embedding_chunk_size,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["embedding_model"] = keras.saving.deserialize_keras_object(config["embedding_model"])
        return cls(**config)


class EpochMeans(keras.metrics.Metric):
    """The mean over the epoch of each step figure, all in one vector variable: a Mean
    per figure would update 2 variables per figure on every replica at every step.
    Every replica adds the same global figures, so the sums over replicas (what a
    cross-replica read gives) have the same ratio."""

    def __init__(self, names, name="step_means", **kwargs):
        super().__init__(name=name, **kwargs)
        self.names = tuple(names)
        self.total = self.add_variable(
            shape=(len(self.names),), initializer="zeros", aggregation="sum", name="total"
        )
        self.count = self.add_variable(
            shape=(), initializer="zeros", aggregation="sum", name="count"
        )

    def update_state(self, values):
        self.total.assign_add(tf.cast(values, self.dtype))
        self.count.assign_add(tf.constant(1.0, self.dtype))

    def result(self):
        return tf.math.divide_no_nan(self.total, self.count)

    def get_config(self):
        return {**super().get_config(), "names": self.names}


def _refuse_synchronized_batchnorm(model) -> None:
    """A chunk never holds the global batch whose moments synchronized BatchNorm needs."""
    synchronized = [layer.name for layer in batchnorm_layers(model) if layer.synchronized]
    if synchronized:
        raise ValueError(
            "GlobalMiningModel(embedding_chunk_size=...) cannot be exact with synchronized "
            f"BatchNorm ({synchronized[0]!r} and {len(synchronized) - 1} more): each chunk "
            "would see only its own rows' moments. Freeze those layers (trainable=False), "
            "use plain BatchNorm (per-chunk statistics), or leave the chunk size unset."
        )


def _inputs_and_labels(data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if sample_weight is not None:
        raise ValueError(
            "GlobalMiningModel mines a whole-batch loss; per-example `sample_weight` has no "
            "meaning for it."
        )
    if y is None:
        raise ValueError("GlobalMiningModel.fit needs labels: fit(x, y) or (x, y) batches.")
    return x, y


def _example_batch(x):
    """One all-zeros input of `fit`'s x (an array or a dataset of (x, y) batches), to
    create an unbuilt model's weights before they are broadcast."""
    if isinstance(x, tf.data.Dataset):
        spec = x.element_spec
        spec = spec[0] if isinstance(spec, tuple) else spec
        shape = [1 if d is None else d for d in spec.shape]
        return tf.zeros(shape, spec.dtype)
    if x is None:
        raise ValueError(
            "GlobalMiningModel under Horovod builds its weights from fit's x before "
            "broadcasting them; pass x as an array or a tf.data.Dataset, or build the model first."
        )
    x = np.asarray(x)
    return tf.zeros((1, *x.shape[1:]), x.dtype)
