"""Keras 3 `Loss` classes wrapping the loss functions; serializable, usable in compile.

Labels are passed through as integers: Keras' default `Loss.__call__` would cast them
to the embeddings' float dtype; float labels that Keras hands over (under a distribution
strategy it does) are taken as the whole numbers they hold. Each loss is a scalar for
the whole batch, so per-example `sample_weight` has no meaning and is refused.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from losses import mining, pairs, triplet
from losses.distances import canonical_distance

PACKAGE = "metric_trainer"


class WholeBatchLoss(keras.losses.Loss):
    """A loss that is one number for the whole batch: `call` gets the labels as given
    (Keras' `__call__` would cast them to float), and `sample_weight` is refused."""

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(
                f"{type(self).__name__} is a whole-batch loss and does not take `sample_weight`."
            )
        with tf.name_scope(self.name or type(self).__name__):
            return self.call(y_true, y_pred)


class _QueryKeyLoss(WholeBatchLoss):
    """Common plumbing of the mined losses: integer labels, the query/key form, config.

    Each subclass names its query/key function (`_terms_fn`) and the options it takes
    (`_options`); the batch loss is that function with the batch as anchors and keys.
    """

    _terms_fn = None

    def _options(self) -> dict:
        return {}

    def call(self, y_true, y_pred):
        labels = mining.class_ids(y_true)  # Keras may hand over float labels
        return triplet.normalized(self.terms(*triplet.whole_batch(labels, y_pred)))

    def terms(self, anchors, anchor_labels, anchor_positions, keys, key_labels):
        """The query/key form of this loss (see losses.triplet): a TripletTerms."""
        return type(self)._terms_fn(
            anchors, anchor_labels, anchor_positions, keys, key_labels, **self._options()
        )

    def get_config(self):
        return {**super().get_config(), **self._options()}


class _BatchTripletLoss(_QueryKeyLoss):
    """A triplet loss: a margin and a distance (Addons' names accepted)."""

    def __init__(self, margin=1.0, distance="euclidean", name=None, distance_metric=None, **kwargs):
        # `distance_metric` is TensorFlow Addons' keyword, accepted for drop-in migration.
        if distance_metric is not None:
            distance = distance_metric
        self.margin = float(margin)
        if self.margin < 0:
            raise ValueError(f"{type(self).__name__}: margin must be >= 0, got {margin}.")
        self.distance = canonical_distance(distance)
        super().__init__(name=name, **kwargs)

    def _options(self) -> dict:
        return {"margin": self.margin, "distance": self.distance}


@keras.saving.register_keras_serializable(package=PACKAGE)
class TripletSemiHardLoss(_BatchTripletLoss):
    """Semi-hard triplet loss over the batch (Addons' `TripletSemiHardLoss`)."""

    _terms_fn = triplet.semihard_terms


@keras.saving.register_keras_serializable(package=PACKAGE)
class TripletHardLoss(_BatchTripletLoss):
    """Batch-hard triplet loss (Addons' `TripletHardLoss`); `soft` uses a softplus."""

    _terms_fn = triplet.hard_terms

    def __init__(self, margin=1.0, soft=False, distance="euclidean", name=None, **kwargs):
        self.soft = bool(soft)
        super().__init__(margin=margin, distance=distance, name=name, **kwargs)

    def _options(self) -> dict:
        return {**super()._options(), "soft": self.soft}


@keras.saving.register_keras_serializable(package=PACKAGE)
class TripletBatchAllLoss(_BatchTripletLoss):
    """Batch-all triplet loss; `reduction` here is "nonzero" or "all" (see triplet.py)."""

    _terms_fn = triplet.batch_all_terms

    def __init__(self, margin=1.0, distance="euclidean", reduction="nonzero", name=None, **kwargs):
        self.triplet_reduction = triplet.check_choice(
            "reduction", reduction, triplet.BATCH_ALL_REDUCTIONS
        )
        super().__init__(margin=margin, distance=distance, name=name, **kwargs)

    def _options(self) -> dict:
        # Keras' own `reduction` config key is replaced: the loss is one scalar anyway.
        return {**super()._options(), "reduction": self.triplet_reduction}


@keras.saving.register_keras_serializable(package=PACKAGE)
class TripletLoss(WholeBatchLoss):
    """Explicit triplets: y_pred is (anchor, positive, negative); y_true is ignored."""

    def __init__(
        self, margin=1.0, distance="euclidean", negative_mining="semihard", name=None, **kwargs
    ):
        self.margin = float(margin)
        if self.margin < 0:
            raise ValueError(f"{type(self).__name__}: margin must be >= 0, got {margin}.")
        self.distance = canonical_distance(distance)
        self.negative_mining = triplet.check_choice(
            "negative_mining", negative_mining, triplet.NEGATIVE_MINING
        )
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        if not isinstance(y_pred, (tuple, list)) or len(y_pred) != 3:
            raise ValueError("TripletLoss expects y_pred = (anchor, positive, negative).")
        anchor, positive, negative = y_pred
        return triplet.triplet_loss(
            anchor, positive, negative, self.margin, self.distance, self.negative_mining
        )

    def get_config(self):
        return {
            **super().get_config(),
            "margin": self.margin,
            "distance": self.distance,
            "negative_mining": self.negative_mining,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class ContrastiveLoss(_QueryKeyLoss):
    """Contrastive loss over every pair (pytorch-metric-learning's `ContrastiveLoss`)."""

    _terms_fn = pairs.contrastive_terms

    def __init__(self, pos_margin=0.0, neg_margin=1.0, distance="euclidean", name=None, **kwargs):
        self.pos_margin, self.neg_margin = float(pos_margin), float(neg_margin)
        self.distance = canonical_distance(distance)
        super().__init__(name=name, **kwargs)

    def _options(self) -> dict:
        return {
            "pos_margin": self.pos_margin,
            "neg_margin": self.neg_margin,
            "distance": self.distance,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class MultiSimilarityLoss(_QueryKeyLoss):
    """Multi-similarity loss (pytorch-metric-learning's `MultiSimilarityLoss`); with
    `epsilon`, its pairs mined as by `MultiSimilarityMiner(epsilon)`."""

    _terms_fn = pairs.multi_similarity_terms
    distance = "cosine"  # what the loss compares; the trainer's evaluation ranks by it

    def __init__(self, alpha=2.0, beta=50.0, base=0.5, epsilon=None, name=None, **kwargs):
        self.alpha = pairs.check_positive("alpha", alpha)
        self.beta = pairs.check_positive("beta", beta)
        self.base = float(base)
        self.epsilon = pairs.check_epsilon(epsilon)
        super().__init__(name=name, **kwargs)

    def _options(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "base": self.base, "epsilon": self.epsilon}


class _TemperatureLoss(_QueryKeyLoss):
    distance = "cosine"  # what the loss compares; the trainer's evaluation ranks by it

    def __init__(self, temperature, name=None, **kwargs):
        self.temperature = pairs.check_positive("temperature", temperature)
        super().__init__(name=name, **kwargs)

    def _options(self) -> dict:
        return {"temperature": self.temperature}


@keras.saving.register_keras_serializable(package=PACKAGE)
class SupConLoss(_TemperatureLoss):
    """Supervised contrastive loss (pytorch-metric-learning's `SupConLoss`)."""

    _terms_fn = pairs.supcon_terms

    def __init__(self, temperature=0.1, name=None, **kwargs):
        super().__init__(temperature, name=name, **kwargs)


@keras.saving.register_keras_serializable(package=PACKAGE)
class NTXentLoss(_TemperatureLoss):
    """NT-Xent / InfoNCE loss (pytorch-metric-learning's `NTXentLoss`)."""

    _terms_fn = pairs.ntxent_terms

    def __init__(self, temperature=0.07, name=None, **kwargs):
        super().__init__(temperature, name=name, **kwargs)
