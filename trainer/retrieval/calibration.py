"""The decision threshold of a retrieval index (`python -m trainer.index`): the largest
distance at which at most a target share of impostor pairs is accepted, on the source's
genuine and impostor pairs (the evaluation's verification sample)."""

from __future__ import annotations

import numpy as np

from data.errors import InputError
from trainer.retrieval.neighbours import prepared
from trainer.retrieval.verification import IMPOSTOR_SAMPLE, sample_pairs


def distances_of_pairs(embeddings, pairs, distance: str) -> np.ndarray:
    """Each pair's distance as the index reports it (trainer.search.reported_distance)."""
    x = prepared(embeddings, distance).astype(np.float64)
    a, b = x[pairs[:, 0]], x[pairs[:, 1]]
    if distance == "cosine":
        return 1.0 - np.einsum("ij,ij->i", a, b)
    squared = np.einsum("ij,ij->i", a - b, a - b)
    return squared if distance == "squared_euclidean" else np.sqrt(squared)


def calibrate(embeddings, labels, distance: str, far: float, seed: int = 0) -> dict:
    """The largest distance threshold whose false accept rate on the impostor pairs is at
    most `far` (accept: distance <= threshold), with the true accept rate there."""
    if not 0 < far < 1:
        raise InputError(f"--far must be in (0, 1), got {far}")
    pairs = sample_pairs(labels, seed=seed, impostors=IMPOSTOR_SAMPLE)
    same = pairs[:, 2] == 1
    if not same.any() or same.all():
        raise InputError(
            f"calibrating a threshold needs genuine and impostor pairs; the source has "
            f"{int(same.sum())} genuine and {int((~same).sum())} impostor pairs"
        )
    d = distances_of_pairs(embeddings, pairs, distance)
    impostors = np.sort(d[~same])
    allowed = int(np.floor(far * len(impostors)))  # impostors that may be accepted
    threshold = (
        float(np.nextafter(impostors[allowed], -np.inf))
        if allowed < len(impostors)
        else float(impostors[-1])
    )
    return {
        "threshold": threshold,
        "far": far,
        "measured_far": float(np.mean(d[~same] <= threshold)),
        "tar": float(np.mean(d[same] <= threshold)),
        "genuine_pairs": int(same.sum()),
        "impostor_pairs": int((~same).sum()),
    }
