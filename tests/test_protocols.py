"""Evaluation protocols against loops written from their definitions: queries against a
gallery, face verification (TAR@FAR, ROC AUC, EER, 10-fold accuracy), and approximate
search with its recall of exact."""

import numpy as np
import pytest

from tests.cross_replica_case import mirrored
from tests.test_evaluation import reference_metrics
from tests.test_scale import clustered
from trainer.evaluation import (
    Ranking,
    query_gallery_metrics,
    retrieval_metrics,
    sharded_metrics,
    verification_metrics,
)
from trainer.retrieval import verification
from trainer.retrieval.neighbours import ApproximateIndex, SearchSettings


def reference_query_gallery(queries, query_labels, gallery, gallery_labels, ks, distance):
    """Recall@k and MAP@R of each query against the gallery by plain loops (ties broken by
    gallery index); queries whose class is not in the gallery left out, and counted."""
    from tests.reference import average_precision_at_r
    from tests.reference import distance as between

    recall, average_precisions, left_out = dict.fromkeys(ks, 0), [], 0
    for q, label in zip(queries, query_labels, strict=True):
        relevant_count = sum(g == label for g in gallery_labels)
        if not relevant_count:
            left_out += 1
            continue
        d = [between(q, g, distance) for g in gallery]
        ranked = sorted(range(len(gallery)), key=lambda i: (d[i], i))
        relevant = [gallery_labels[i] == label for i in ranked]
        for k in ks:
            recall[k] += any(relevant[:k])
        average_precisions.append(average_precision_at_r(relevant, relevant_count))
    kept = len(queries) - left_out
    metrics = {f"recall@{k}": recall[k] / kept for k in ks}
    return {**metrics, "map@r": float(np.mean(average_precisions))}, left_out


@pytest.mark.parametrize("distance", ["squared_euclidean", "cosine"])
def test_query_gallery_metrics_equal_the_definition_with_ties_and_absent_classes(distance):
    if distance == "squared_euclidean":
        # Small integer points: many exact ties (computed exactly), broken by index.
        gallery, gallery_labels = clustered(80, 6, 3, seed=1)
        queries, query_labels = clustered(40, 8, 3, seed=2)  # classes 6, 7, 13: not in it
    else:  # float32 cosines tie only by chance: points in general position
        gallery, gallery_labels = clustered_unit(80, 6, 4, seed=1)
        queries, query_labels = clustered_unit(40, 8, 4, seed=2)
    ks = (1, 2, 5)
    expected, left_out = reference_query_gallery(
        queries, query_labels, gallery, gallery_labels, ks, distance
    )
    assert left_out > 0
    got = query_gallery_metrics(queries, query_labels, gallery, gallery_labels, ks, distance, 7)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    ranking = Ranking(gallery, gallery_labels, ks, distance, 7, queries, query_labels)
    assert ranking.left_out == left_out and ranking.num_queries == len(queries) - left_out


def test_query_gallery_is_not_all_against_all():
    """A query's own copy in the gallery is found (it is a gallery item, not the query),
    while all-against-all excludes the query itself."""
    x = np.array([[0.0, 1.0], [0.0, 1.1], [1.0, 0.0], [1.1, 0.0]], np.float32)
    labels = np.array([0, 1, 1, 0])
    got = query_gallery_metrics(x, labels, x, labels, ks=(1,), distance="squared_euclidean")
    assert got["recall@1"] == 1.0  # each query's nearest gallery item is itself
    assert retrieval_metrics(x, labels, (1,), "squared_euclidean")["recall@1"] == 0.0


def test_query_gallery_refuses_empty_splits_and_no_common_class():
    x = np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match="needs a gallery"):
        query_gallery_metrics(x, [0, 1, 2], x[:0], np.array([], int))
    with pytest.raises(ValueError, match="needs queries"):
        query_gallery_metrics(x[:0], np.array([], int), x, [0, 1, 2])
    with pytest.raises(ValueError, match="None of the 3 queries has its class in the gallery"):
        query_gallery_metrics(x, [5, 6, 7], x, [0, 1, 2])


@pytest.mark.parametrize("num_replicas", [2, 4])
def test_sharded_query_gallery_equals_one_process(num_replicas):
    gallery, gallery_labels = clustered(90, 7, 3, seed=num_replicas)
    queries, query_labels = clustered(50, 9, 3, seed=10 + num_replicas)
    ks = (1, 4)
    ranking = Ranking(gallery, gallery_labels, ks, "squared_euclidean", 8, queries, query_labels)
    got = sharded_metrics(ranking, mirrored(num_replicas))
    expected, _ = reference_query_gallery(
        queries, query_labels, gallery, gallery_labels, ks, "squared_euclidean"
    )
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


# --- verification ---------------------------------------------------------------------


def synthetic_scores(seed, genuine=300, impostors=20_000, ties=False):
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.normal(2.0, 1.0, genuine), rng.normal(0.0, 1.0, impostors)])
    if ties:
        scores = np.round(scores, 1)  # many equal scores across the two kinds
    same = np.r_[np.ones(genuine, bool), np.zeros(impostors, bool)]
    order = rng.permutation(len(scores))
    return scores[order], same[order]


def reference_tar_at_far(scores, same, far):
    """The most genuine pairs accepted (score >= t) at a threshold t accepting at most
    far × impostors, over every candidate threshold."""
    genuine, impostor = scores[same], scores[~same]
    best = 0.0
    for t in np.unique(scores):
        if np.sum(impostor >= t) <= far * len(impostor):
            best = max(best, np.mean(genuine >= t))
    return best


def reference_auc(scores, same):
    """P(genuine score > impostor score) + P(equal) / 2, over all pairs of pairs."""
    genuine, impostor = scores[same], scores[~same]
    greater = (genuine[:, None] > impostor[None, :]).sum()
    equal = (genuine[:, None] == impostor[None, :]).sum()
    return (greater + 0.5 * equal) / (len(genuine) * len(impostor))


def reference_accuracy(scores, same, folds=10):
    bounds = np.linspace(0, len(scores), folds + 1).round().astype(int)
    accuracies = []
    for first, last in zip(bounds[:-1], bounds[1:], strict=True):
        test = np.zeros(len(scores), bool)
        test[first:last] = True
        candidates = np.r_[np.inf, np.unique(scores[~test])[::-1]]  # strictest first
        train_accuracy = [np.mean((scores[~test] >= t) == same[~test]) for t in candidates]
        best = candidates[int(np.argmax(train_accuracy))]  # of equals, the strictest
        accuracies.append(np.mean((scores[test] >= best) == same[test]))
    return np.mean(accuracies)


@pytest.mark.parametrize("ties", [False, True])
def test_roc_figures_equal_their_definitions(ties):
    scores, same = synthetic_scores(0, ties=ties)
    got = verification.roc_metrics(scores, same)
    # 20,000 impostors support FAR down to 1e-4 (at least one impostor accepted).
    assert sorted(k for k in got if k.startswith("tar")) == [
        "tar@far=1e-1", "tar@far=1e-2", "tar@far=1e-3", "tar@far=1e-4"
    ]  # fmt: skip
    for far in (1e-4, 1e-3, 1e-2, 1e-1):
        name = f"tar@far={verification.FAR_NAMES[far]}"
        assert got[name] == pytest.approx(reference_tar_at_far(scores, same, far), abs=1e-12)
    assert got["roc_auc"] == pytest.approx(reference_auc(scores, same), abs=1e-9)
    # EER: where the false accept rate equals the false reject rate.
    far_at = lambda t: np.mean(scores[~same] >= t)  # noqa: E731
    frr_at = lambda t: np.mean(scores[same] < t)  # noqa: E731
    thresholds = np.unique(scores)
    gaps = [abs(far_at(t) - frr_at(t)) for t in thresholds]
    closest = thresholds[int(np.argmin(gaps))]
    assert abs(got["eer"] - far_at(closest)) <= max(min(gaps), 1e-3) + 2 / same.sum()
    assert 0.1 < got["eer"] < 0.2  # two unit normals 2 apart: Φ(-1) = 0.159


def test_ten_fold_accuracy_is_lfw_protocol():
    for seed, ties in ((1, False), (2, True)):
        scores, same = synthetic_scores(seed, genuine=400, impostors=400, ties=ties)
        want = reference_accuracy(scores, same)
        assert verification.fold_accuracy(scores, same) == pytest.approx(want, abs=1e-12)
        assert 0.75 < want < 0.9  # two unit normals 2 apart: Φ(1) = 0.841


def test_sample_pairs_gives_every_genuine_pair_and_seeded_impostors():
    labels = np.array([3, 1, 3, 2, 1, 3, 7])
    pairs = verification.sample_pairs(labels, seed=0, impostors=5)
    genuine = {tuple(sorted(p[:2])) for p in pairs if p[2] == 1}
    assert genuine == {(0, 2), (0, 5), (2, 5), (1, 4)}  # every same-label pair, once
    impostors = pairs[pairs[:, 2] == 0]
    assert len(impostors) == 5 and np.all(labels[impostors[:, 0]] != labels[impostors[:, 1]])
    np.testing.assert_array_equal(verification.sample_pairs(labels, 0, 5), pairs)  # seeded
    assert not np.array_equal(verification.sample_pairs(labels, 1, 5), pairs)
    every = verification.sample_pairs(labels, seed=0, impostors=100)  # fewer exist: all
    assert (every[:, 2] == 0).sum() == 21 - 4  # 7·6/2 pairs, 4 of them genuine


def test_verification_metrics_on_embeddings_match_scores_from_their_cosines():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(30), 5)
    embeddings = rng.normal(size=(30, 16))[labels] + 0.9 * rng.normal(size=(150, 16))
    pairs = verification.sample_pairs(labels, seed=4, impostors=2000)
    got = verification_metrics(embeddings, labels, pairs, "cosine")
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    scores = np.array([unit[i] @ unit[j] for i, j, _ in pairs])
    same = pairs[:, 2] == 1
    assert got["roc_auc"] == pytest.approx(reference_auc(scores, same), abs=1e-6)
    assert got["tar@far=1e-3"] == pytest.approx(reference_tar_at_far(scores, same, 1e-3))
    assert got["accuracy"] == pytest.approx(reference_accuracy(scores, same), abs=1e-9)
    assert "tar@far=1e-4" not in got  # 2,000 impostors cannot measure FAR 1e-4
    drawn = verification_metrics(embeddings, labels, None, "cosine", seed=4, impostors=2000)
    assert drawn["roc_auc"] == pytest.approx(got["roc_auc"], abs=1e-12)  # the same pairs
    assert 0.5 < drawn["accuracy"] < 1.0  # balanced: as many impostors as genuine pairs
    with pytest.raises(ValueError, match=r"\(M, 3\) integer array"):
        verification_metrics(embeddings, labels, pairs[:, :2])


def test_pairs_files_lfw_and_csv_name_rows_and_missing_images(tmp_path):
    from data.errors import InputError
    from data.sources import Source

    names = ["Ann/Ann_0001.jpg", "Ann/Ann_0002.jpg", "Bob/Bob_0001.jpg"]
    source = Source(
        "faces", np.array([str(tmp_path / n) for n in names], dtype=object),
        np.array([0, 0, 1], np.int32), "file", ("Ann", "Bob"),
    )  # fmt: skip
    lfw = tmp_path / "pairs.txt"
    lfw.write_text("1\t2\nAnn\t1\t2\nAnn\t2\tBob\t1\n")
    np.testing.assert_array_equal(verification.read_pairs(str(lfw), source), [[0, 1, 1], [1, 2, 0]])
    table = tmp_path / "pairs.csv"
    table.write_text("first,second,same\nAnn/Ann_0001.jpg,Bob/Bob_0001.jpg,0\n")
    np.testing.assert_array_equal(verification.read_pairs(str(table), source), [[0, 2, 0]])
    lfw.write_text("1\t1\nCid\t1\t2\n")
    with pytest.raises(InputError, match="2 image\\(s\\) are not in the evaluation source faces"):
        verification.read_pairs(str(lfw), source)
    with pytest.raises(InputError, match="evaluation.pairs .*nothing.txt' is not a file"):
        verification.read_pairs(str(tmp_path / "nothing.txt"), source)


# --- approximate search ---------------------------------------------------------------


def clustered_unit(n, classes, dim, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    x = rng.normal(size=(classes, dim))[labels] + 0.5 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_search_finds_the_exact_neighbours_and_says_how_well(kind):
    x, labels = clustered_unit(6000, 60, 32, seed=0)
    exact = Ranking(x, labels, (1, 4), "cosine", 512)
    approximate = Ranking(x, labels, (1, 4), "cosine", 512, search=SearchSettings(kind))
    recall = approximate.recall_of_exact(sample=300, seed=0)
    assert recall >= 0.98, recall
    want = exact.metrics(exact.sums(0, exact.num_queries))
    got = approximate.metrics(approximate.sums(0, approximate.num_queries))
    for key in want:  # the figures move by at most the neighbours the search missed
        assert got[key] == pytest.approx(want[key], abs=2 * (1 - recall) + 1e-3), key
    assert ApproximateIndex(x, "cosine", SearchSettings(kind)).nbytes > x.nbytes


def test_an_approximate_search_that_misses_is_measured_low():
    """One probed cell of many: the search misses neighbours, and its recall says so."""
    x, labels = clustered_unit(4000, 40, 32, seed=1)
    poor = Ranking(
        x, labels, (1,), "cosine", 512, search=SearchSettings("ivf", ivf_lists=200, ivf_probes=1)
    )
    assert poor.recall_of_exact(sample=200) < 0.9


def test_exact_search_through_faiss_equals_the_tensorflow_ranking():
    x, labels = clustered(200, 9, 3, seed=5)
    x = x + 3.0
    want = retrieval_metrics(x, labels, (1, 4), "cosine")
    index = ApproximateIndex(x, "cosine", SearchSettings("exact"))
    nearest = index.search(x, 5)
    assert np.all(nearest[:, 0] >= 0)
    got = Ranking(x, labels, (1, 4), "cosine", 64, search=SearchSettings("hnsw"))
    got_metrics = got.metrics(got.sums(0, got.num_queries))
    for key in want:  # ties among the integer points may be ordered otherwise by faiss
        assert got_metrics[key] == pytest.approx(want[key], abs=0.05), key


def test_search_settings_name_a_bad_value():
    from data.errors import InputError

    with pytest.raises(InputError, match=r"Unknown evaluation.search 'annoy'"):
        SearchSettings("annoy").check()
    with pytest.raises(InputError, match="evaluation.ivf_probes must be >= 1"):
        SearchSettings("ivf", ivf_probes=0).check()


def test_reference_all_against_all_still_matches(tmp_path):
    """The refactored ranking keeps all-against-all exactly (singletons count as misses)."""
    x, labels = clustered(120, 10, 3, seed=7)
    got = retrieval_metrics(x, labels, (1, 4), "squared_euclidean", chunk=9)
    want = reference_metrics(x, labels, (1, 4), "squared_euclidean")
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
