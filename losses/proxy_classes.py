"""Keras 3 `Loss` classes of the proxy losses, each owning its class centres.

Keras trains only the model's variables, so in plain `model.fit` the centres must be
tracked by the model: `loss.attach(model)` creates them (the width from the model's
output) and hangs them on the model, then `model.compile(loss=loss)` and `fit` train
both. The trainer does not use `self.centres`: it shards its own copy over the replicas
and calls `block` (see trainer/step/class_centres.py). `sample_rate` < 1 (Partial FC) applies
in the trainer, where the step is known; a plain `model.fit` uses every centre.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from losses import mining, proxies
from losses.keras_losses import PACKAGE, WholeBatchLoss


class _ProxyLoss(WholeBatchLoss):
    loss_name = ""
    distance = "cosine"  # what the embeddings are compared with (they are normalized)

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        sample_rate: float = 1.0,
        seed: int = 0,
        name: str | None = None,
        **options,
    ):
        super().__init__(name=name or self.loss_name)
        self.options = proxies.checked_options(self.loss_name, **options)
        for key, value in (("num_classes", num_classes), ("embedding_dim", embedding_dim)):
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{key} must be a whole number >= 1, got {value!r}")
        if not (isinstance(sample_rate, int | float) and 0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if self.loss_name == "proxy_anchor" and sample_rate != 1:
            raise ValueError("ProxyAnchorLoss takes every proxy: sample_rate must be 1")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.sample_rate, self.seed = float(sample_rate), int(seed)
        self.centres = None
        if num_classes and embedding_dim:
            self.build(num_classes, embedding_dim)

    @property
    def rows_per_class(self) -> int:
        return proxies.rows_per_class(self.loss_name, self.options)

    def build(self, num_classes: int, embedding_dim: int) -> None:
        """Creates the (num_classes · rows_per_class, embedding_dim) centres."""
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.centres = keras.Variable(
            proxies.initial_centres(0, num_classes, self.rows_per_class, embedding_dim, self.seed),
            name=f"{self.name}_centres",
        )

    def attach(self, model: keras.Model) -> keras.Model:
        """Creates the centres if needed (width: the model's output) and makes `model`
        track them, so that `model.fit` trains them. Returns the model."""
        if self.num_classes is None:
            raise ValueError(f"{type(self).__name__} needs num_classes before attach")
        if self.centres is None:
            width = model.output_shape[-1] if model.built else None
            if not isinstance(width, int):
                raise ValueError(
                    f"{type(self).__name__}.attach: the embedding width of {model.name} is "
                    "not known; pass embedding_dim"
                )
            self.build(self.num_classes, width)
        setattr(model, f"{self.name}_centres", self.centres)
        return model

    def call(self, y_true, y_pred):
        if self.centres is None:
            raise ValueError(
                f"{type(self).__name__} has no centres yet: pass num_classes and "
                "embedding_dim, or call attach(model) before fit"
            )
        labels = mining.class_ids(y_true)
        return proxies.differentiable(
            proxies.proxy_loss_block(
                self.loss_name, y_pred, labels, self.centres, 0, self.num_classes, self.options
            )
        )

    def block(
        self, embeddings, labels, centres, first_class, end_class, step, reduce_sum, reduce_max
    ) -> proxies.ProxyBlock:
        """The loss for the centres of classes [first_class, end_class) (see
        losses.proxies.proxy_loss_block), with this step's Partial FC draw (`step` None:
        every centre, as for evaluation)."""
        kept = None
        if self.sample_rate < 1 and step is not None:  # step None: evaluation, every centre
            kept = proxies.sampled_classes(
                tf.range(first_class, end_class), labels, self.sample_rate, self.seed, step
            )
        return proxies.proxy_loss_block(
            self.loss_name,
            embeddings,
            labels,
            centres,
            first_class,
            self.num_classes,
            self.options,
            reduce_sum,
            reduce_max,
            kept,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "embedding_dim": self.embedding_dim,
            "sample_rate": self.sample_rate,
            "seed": self.seed,
            **self.options,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class ProxyNCALoss(_ProxyLoss):
    """ProxyNCA (losses.proxy_nca_loss) with its own proxies; option `softmax_scale`."""

    loss_name = "proxy_nca"


@keras.saving.register_keras_serializable(package=PACKAGE)
class ProxyAnchorLoss(_ProxyLoss):
    """Proxy-Anchor (losses.proxy_anchor_loss); options `margin`, `alpha`."""

    loss_name = "proxy_anchor"


@keras.saving.register_keras_serializable(package=PACKAGE)
class ArcFaceLoss(_ProxyLoss):
    """ArcFace (losses.arcface_loss); options `margin` (degrees), `scale`."""

    loss_name = "arcface"


@keras.saving.register_keras_serializable(package=PACKAGE)
class CosFaceLoss(_ProxyLoss):
    """CosFace (losses.cosface_loss); options `margin`, `scale`."""

    loss_name = "cosface"


@keras.saving.register_keras_serializable(package=PACKAGE)
class SubCenterArcFaceLoss(_ProxyLoss):
    """Sub-center ArcFace (losses.subcenter_arcface_loss); options `sub_centers`,
    `margin` (degrees), `scale`."""

    loss_name = "subcenter_arcface"


PROXY_LOSS_CLASSES = (ProxyNCALoss, ProxyAnchorLoss, ArcFaceLoss, CosFaceLoss, SubCenterArcFaceLoss)
