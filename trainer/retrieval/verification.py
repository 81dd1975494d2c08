"""Face-verification metrics: is a pair of images the same identity?

Each pair (i, j) gets a similarity score (higher: more alike; minus the distance, or the
cosine for the cosine distance) and is genuine (same label) or an impostor. From the
scores come the figures face papers report:
- TAR@FAR: the share of genuine pairs accepted at the threshold that accepts at most
  that share of impostors (insightface's IJB-C tables), for the FARs in FARS that the
  impostor count supports (at least one impostor accepted: FAR × impostors >= 1);
- ROC AUC and EER (where false accepts and false rejects are equally likely, linearly
  interpolated between ROC points);
- accuracy, LFW's 10-fold protocol: the pairs split in 10 folds in order, each fold's
  accuracy at the threshold that is best on the other nine, averaged.

The ROC comes from scikit-learn (`roc_curve`, every point kept). Pairs are a list of
(row, row, same), from a pairs file (`read_pairs`: LFW's pairs.txt or a CSV) or drawn
(`sample_pairs`: every genuine pair and a seeded sample of impostors).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os

import numpy as np

from data.errors import InputError

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FAR_NAMES = {far: f"1e-{i}" for far, i in zip(FARS, range(6, 0, -1), strict=True)}
IMPOSTOR_SAMPLE = 1_000_000  # supports FAR 1e-6
FOLDS = 10
PAIRS_PER_CHUNK = 1 << 17  # pairs scored at once (rows gathered: chunk × 2 × D floats)


def verification_metrics(
    embeddings, labels, pairs=None, distance="cosine", seed=0, impostors=IMPOSTOR_SAMPLE
) -> dict:
    """{'tar@far=1e-4': ..., 'roc_auc': ..., 'eer': ..., 'accuracy': ...} of `embeddings`
    (N, D) with `labels` (N,) on `pairs`, an (M, 3) integer array of (row, row, same);
    None: every genuine pair plus `impostors` impostor pairs drawn with `seed`.

    With drawn pairs the 10-fold accuracy uses as many impostors as genuine pairs (LFW's
    balance); the ROC figures use them all.
    """
    return metrics_of(scored_pairs(embeddings, labels, pairs, distance, seed, impostors))


@dataclasses.dataclass(frozen=True)
class ScoredPairs:
    scores: np.ndarray  # (M,) similarity of each pair
    same: np.ndarray  # (M,) bool: genuine
    drawn: bool  # the pairs were drawn (every genuine pair, then impostors at random)
    seed: int


def scored_pairs(embeddings, labels, pairs, distance, seed, impostors) -> ScoredPairs:
    embeddings = np.asarray(embeddings, np.float32)
    labels = np.asarray(labels)
    if embeddings.ndim != 2 or len(embeddings) != len(labels):
        raise ValueError(
            f"verification_metrics: embeddings {embeddings.shape} and labels {labels.shape} "
            "must be (N, D) and (N,)."
        )
    drawn = pairs is None
    pairs = sample_pairs(labels, seed, impostors) if drawn else check_pairs(pairs, len(labels))
    return ScoredPairs(pair_scores(embeddings, pairs, distance), pairs[:, 2] == 1, drawn, seed)


def metrics_of(scored: ScoredPairs) -> dict:
    scores, same = scored.scores, scored.same
    metrics = roc_metrics(scores, same)
    if scored.drawn:  # the impostors are in random order: the first ones are a random sample
        balanced = np.concatenate([np.flatnonzero(same), np.flatnonzero(~same)[: same.sum()]])
        order = np.random.default_rng(scored.seed).permutation(balanced)
        metrics["accuracy"] = fold_accuracy(scores[order], same[order])
    else:
        metrics["accuracy"] = fold_accuracy(scores, same)
    return metrics


def check_pairs(pairs, rows: int) -> np.ndarray:
    pairs = np.asarray(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 3 or not np.issubdtype(pairs.dtype, np.integer):
        raise ValueError(
            f"pairs must be an (M, 3) integer array of (row, row, same), got shape "
            f"{pairs.shape} of {pairs.dtype}."
        )
    if len(pairs) and (pairs[:, :2].min() < 0 or pairs[:, :2].max() >= rows):
        raise ValueError(f"pairs name rows outside the {rows} embeddings.")
    return pairs.astype(np.int64)


def sample_pairs(labels, seed: int = 0, impostors: int = IMPOSTOR_SAMPLE) -> np.ndarray:
    """(M, 3) pairs: every genuine pair (i < j, same label), then `impostors` impostor
    pairs drawn uniformly with `seed` (every impostor pair when there are no more)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    genuine = [np.zeros((0, 2), np.int64)]
    for start, count in zip(starts, counts, strict=True):
        if count > 1:
            i, j = np.triu_indices(count, 1)  # positions within the class
            genuine.append(np.stack([order[start + i], order[start + j]], 1))
    genuine = np.concatenate(genuine)
    n = len(labels)
    total_impostors = (n * n - int((counts.astype(np.int64) ** 2).sum())) // 2
    rng = np.random.default_rng(seed)
    if total_impostors <= impostors:
        i, j = np.triu_indices(n, 1)
        different = labels[i] != labels[j]
        impostor = np.stack([i[different], j[different]], 1)
        impostor = impostor[rng.permutation(len(impostor))]
    else:
        drawn = []
        while sum(len(d) for d in drawn) < impostors:
            ij = rng.integers(0, n, size=(2 * impostors, 2))
            drawn.append(ij[labels[ij[:, 0]] != labels[ij[:, 1]]])
        impostor = np.concatenate(drawn)[:impostors]
    return np.concatenate(
        [
            np.column_stack([genuine, np.ones(len(genuine), np.int64)]),
            np.column_stack([impostor, np.zeros(len(impostor), np.int64)]),
        ]
    ).astype(np.int64)


def pair_scores(embeddings, pairs, distance: str = "cosine") -> np.ndarray:
    """Similarity of each pair: the cosine for 'cosine', else minus the distance."""
    from losses.distances import canonical_distance

    distance = canonical_distance(distance)
    x = np.asarray(embeddings, np.float32)
    if distance == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    scores = np.empty(len(pairs), np.float64)
    for first in range(0, len(pairs), PAIRS_PER_CHUNK):
        chunk = pairs[first : first + PAIRS_PER_CHUNK]
        a, b = x[chunk[:, 0]].astype(np.float64), x[chunk[:, 1]].astype(np.float64)
        if distance == "cosine":
            scores[first : first + len(chunk)] = np.einsum("ij,ij->i", a, b)
        else:
            squared = np.einsum("ij,ij->i", a - b, a - b)
            scores[first : first + len(chunk)] = -(
                squared if distance == "squared_euclidean" else np.sqrt(squared)
            )
    return scores


def roc_curve(scores, same):
    """(false accept rate, true accept rate, threshold) at every distinct score, from
    the strictest threshold down (accept: score >= threshold)."""
    from sklearn.metrics import roc_curve as sklearn_roc_curve

    return sklearn_roc_curve(same, scores, drop_intermediate=False)


def roc_metrics(scores, same) -> dict:
    """TAR at each supported FAR, ROC AUC and EER of scored pairs."""
    from sklearn.metrics import auc

    same = np.asarray(same, bool)
    genuine, impostors = int(same.sum()), int((~same).sum())
    if not genuine or not impostors:
        raise InputError(
            f"verification needs genuine and impostor pairs; got {genuine} genuine and "
            f"{impostors} impostor pairs."
        )
    far, tar, _ = roc_curve(scores, same)
    metrics = {
        f"tar@far={FAR_NAMES[target]}": float(tar[far <= target].max())
        for target in FARS
        if target * impostors >= 1
    }
    metrics["roc_auc"] = float(auc(far, tar))
    metrics["eer"] = equal_error_rate(far, tar)
    return metrics


def equal_error_rate(far, tar) -> float:
    """Where the false accept rate equals the false reject rate (1 - TAR), on the ROC's
    segments. FAR rises and FRR falls along the curve, so they cross once."""
    frr = 1.0 - tar
    crossed = int(np.argmax(frr <= far))  # the first point at or past the crossing
    if crossed == 0:
        return float(far[0])
    # On the segment from point c-1 to c: far + t (far' - far) = frr + t (frr' - frr).
    gap_before = frr[crossed - 1] - far[crossed - 1]
    gap_after = frr[crossed] - far[crossed]
    t = gap_before / (gap_before - gap_after)
    return float(far[crossed - 1] + t * (far[crossed] - far[crossed - 1]))


def fold_accuracy(scores, same, folds: int = FOLDS) -> float:
    """LFW's protocol: the pairs in `folds` consecutive folds; each fold's accuracy at
    the threshold that is most accurate on the others; their mean."""
    scores, same = np.asarray(scores), np.asarray(same, bool)
    if len(scores) < folds:
        raise InputError(f"10-fold accuracy needs at least {folds} pairs, got {len(scores)}.")
    bounds = np.linspace(0, len(scores), folds + 1).round().astype(int)
    accuracies = []
    for first, last in zip(bounds[:-1], bounds[1:], strict=True):
        held = np.zeros(len(scores), bool)
        held[first:last] = True
        threshold = best_threshold(scores[~held], same[~held])
        accuracies.append(np.mean((scores[held] >= threshold) == same[held]))
    return float(np.mean(accuracies))


def best_threshold(scores, same) -> float:
    """The threshold (accept: score >= it) most accurate on these pairs; of equally
    accurate ones, the strictest. Accepting nothing is a candidate too."""
    order = np.argsort(-scores, kind="stable")
    ranked, ranked_same = scores[order], same[order]
    distinct = np.r_[ranked[1:] != ranked[:-1], True]  # last of each run of equal scores
    accepted_genuine = np.cumsum(ranked_same)[distinct]
    accepted_impostors = np.cumsum(~ranked_same)[distinct]
    correct = accepted_genuine + (int((~same).sum()) - accepted_impostors)
    candidates = ranked[distinct]
    best = int(np.argmax(correct))
    if correct[best] <= (~same).sum():  # accepting nothing is at least as good
        return float(np.inf)
    return float(candidates[best])


def read_pairs(path: str, source) -> np.ndarray:
    """(M, 3) pairs of rows of `source` from a pairs file, in its order (its folds):
    - LFW's pairs.txt: a first line "folds pairs-per-fold", then "name n1 n2" (same
      person) or "name1 n1 name2 n2" (different), naming <name>/<name>_<n:04d>.<ext>;
    - a CSV of path, path, same (1/0 or true/false; a header line is skipped), the
      paths relative to the source's root or as the source lists them.
    Every image named must be in the source: the missing ones are named."""
    if not os.path.isfile(path):
        raise InputError(f"evaluation.pairs {path!r} is not a file.")
    rows = _rows_by_name(source)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = [line for line in text.splitlines() if line.strip()]
    lfw = bool(lines) and len(lines[0].split()) == 2 and "," not in lines[0]
    named = _lfw_pairs(lines[1:]) if lfw else _csv_pairs(text)
    pairs, missing = [], []
    for first, second, same in named:
        found = [_find(rows, name) for name in (first, second)]
        missing += [name for name, row in zip((first, second), found, strict=True) if row is None]
        if None not in found:
            pairs.append((*found, same))
    if missing:
        raise InputError(
            f"evaluation.pairs {path}: {len(missing)} image(s) are not in the evaluation "
            f"source {source.name}: {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            + "."
        )
    if not pairs:
        raise InputError(f"evaluation.pairs {path} lists no pair.")
    return np.array(pairs, np.int64)


def _lfw_pairs(lines):
    for number, line in enumerate(lines, start=2):
        columns = line.split()
        if len(columns) == 3:
            name, a, b = columns
            yield _lfw_name(name, a), _lfw_name(name, b), 1
        elif len(columns) == 4:
            yield _lfw_name(columns[0], columns[1]), _lfw_name(columns[2], columns[3]), 0
        else:
            raise InputError(
                f"pairs.txt line {number}: expected 'name n1 n2' or 'name1 n1 name2 n2', "
                f"got {line.strip()[:120]!r}."
            )


def _lfw_name(person: str, number: str) -> str:
    return f"{person}/{person}_{int(number):04d}"


def _csv_pairs(text: str):
    for number, columns in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not columns or not "".join(columns).strip():
            continue
        if len(columns) != 3:
            raise InputError(f"pairs CSV line {number}: expected path,path,same, got {columns}.")
        same = columns[2].strip().lower()
        if same not in ("0", "1", "true", "false"):
            if number == 1:
                continue  # a header
            raise InputError(f"pairs CSV line {number}: same must be 1/0 or true/false.")
        yield columns[0].strip(), columns[1].strip(), int(same in ("1", "true"))


def _rows_by_name(source) -> dict:
    """Each example's path (and its path without extension, relative to the folder
    above its class folder) -> row."""
    if source.kind != "file":
        raise InputError(
            f"evaluation.pairs names image files, but the evaluation source {source.name} "
            "holds no files."
        )
    rows = {}
    for row, path in enumerate(source.items):
        path = os.path.normpath(str(path))
        rows[path] = row
        parts = path.split(os.sep)
        for kept in (2, 1):  # class/file, file
            relative = os.path.join(*parts[-kept:])
            rows.setdefault(relative, row)
            rows.setdefault(os.path.splitext(relative)[0], row)
    return rows


def _find(rows: dict, name: str):
    name = os.path.normpath(name)
    return rows.get(name, rows.get(os.path.splitext(name)[0]))


def roc_png(scored: ScoredPairs, title: str = "ROC") -> bytes:
    """The ROC curve (log FAR) as a PNG, for TensorBoard's Images tab."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    far, tar, _ = roc_curve(scored.scores, scored.same)
    figure, axes = plt.subplots(figsize=(5, 4), dpi=100)
    shown = far > 0
    axes.plot(far[shown], tar[shown])
    axes.set_xscale("log")
    axes.set_xlabel("false accept rate")
    axes.set_ylabel("true accept rate")
    axes.set_ylim(0, 1.01)
    axes.grid(True, which="both", alpha=0.3)
    axes.set_title(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()
