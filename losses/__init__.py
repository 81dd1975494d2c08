"""Triplet, pair-based and proxy (margin-softmax) losses for metric learning on
TensorFlow 2 / Keras 3, with no distributed code.

Functions return a float32 scalar; the Keras classes wrap them for `model.compile`.
The `*_terms` functions are the query/key form used for cross-replica mining.
"""

from losses.distances import (
    ALIASES,
    DISTANCES,
    canonical_distance,
    paired_distances,
    pairwise_distances,
)
from losses.keras_losses import (
    ContrastiveLoss,
    MultiSimilarityLoss,
    NTXentLoss,
    SupConLoss,
    TripletBatchAllLoss,
    TripletHardLoss,
    TripletLoss,
    TripletSemiHardLoss,
)
from losses.memory import CrossBatchMemory
from losses.pairs import (
    contrastive_loss,
    contrastive_terms,
    multi_similarity_loss,
    multi_similarity_terms,
    ntxent_loss,
    ntxent_terms,
    supcon_loss,
    supcon_terms,
)
from losses.proxies import (
    ProxyBlock,
    arcface_loss,
    cosface_loss,
    proxy_anchor_loss,
    proxy_nca_loss,
    subcenter_arcface_loss,
)
from losses.proxy_classes import (
    PROXY_LOSS_CLASSES,
    ArcFaceLoss,
    CosFaceLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    SubCenterArcFaceLoss,
)
from losses.triplet import (
    TripletTerms,
    batch_all_terms,
    hard_terms,
    normalized,
    semihard_terms,
    triplet_batch_all_loss,
    triplet_hard_loss,
    triplet_loss,
    triplet_semihard_loss,
)

# The Keras loss classes a configuration can name (the trainer registers them with gin).
LOSS_CLASSES = (
    TripletSemiHardLoss,
    TripletHardLoss,
    TripletBatchAllLoss,
    TripletLoss,
    ContrastiveLoss,
    MultiSimilarityLoss,
    SupConLoss,
    NTXentLoss,
    *PROXY_LOSS_CLASSES,
)

__all__ = [
    "LOSS_CLASSES",
    "PROXY_LOSS_CLASSES",
    "ArcFaceLoss",
    "CosFaceLoss",
    "ProxyAnchorLoss",
    "ProxyBlock",
    "ProxyNCALoss",
    "SubCenterArcFaceLoss",
    "arcface_loss",
    "cosface_loss",
    "proxy_anchor_loss",
    "proxy_nca_loss",
    "subcenter_arcface_loss",
    "ContrastiveLoss",
    "CrossBatchMemory",
    "MultiSimilarityLoss",
    "NTXentLoss",
    "SupConLoss",
    "contrastive_loss",
    "contrastive_terms",
    "multi_similarity_loss",
    "multi_similarity_terms",
    "ntxent_loss",
    "ntxent_terms",
    "supcon_loss",
    "supcon_terms",
    "ALIASES",
    "DISTANCES",
    "TripletBatchAllLoss",
    "TripletHardLoss",
    "TripletLoss",
    "TripletSemiHardLoss",
    "TripletTerms",
    "batch_all_terms",
    "canonical_distance",
    "hard_terms",
    "normalized",
    "paired_distances",
    "pairwise_distances",
    "semihard_terms",
    "triplet_batch_all_loss",
    "triplet_hard_loss",
    "triplet_loss",
    "triplet_semihard_loss",
]
