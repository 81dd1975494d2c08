"""Slow numpy references written from the definitions, in float64, one loop per term.

They are deliberately naive: nested Python loops over anchors, positives and negatives,
so that the fast TensorFlow code is checked against something obviously right.
"""

import numpy as np


def distance(u, v, name):
    u = np.asarray(u, np.float64)
    v = np.asarray(v, np.float64)
    if name in ("euclidean", "L2"):
        return float(np.sqrt(np.sum((u - v) ** 2)))
    if name in ("squared_euclidean", "squared-L2"):
        return float(np.sum((u - v) ** 2))
    if name in ("cosine", "angular"):
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        nu, nv = max(nu, 1e-6), max(nv, 1e-6)
        return float(max(1.0 - np.dot(u, v) / (nu * nv), 0.0))
    raise ValueError(name)


metric = distance  # for functions whose `distance` argument is the name


def average_precision_at_r(relevant, r):
    """AP@R of a ranking (its relevance, nearest first) with R relevant items:
    (1/R) Σ_{i <= R} P@i · [rank i is relevant]."""
    hits, total = 0, 0.0
    for i in range(r):
        if relevant[i]:
            hits += 1
            total += hits / (i + 1)
    return total / r


def distance_matrix(x, name):
    n = len(x)
    return np.array([[distance(x[i], x[j], name) for j in range(n)] for i in range(n)])


def semihard(labels, x, margin=1.0, name="euclidean"):
    d = distance_matrix(x, name)
    total, pairs = 0.0, 0
    for a in range(len(x)):
        negatives = [d[a, n] for n in range(len(x)) if labels[n] != labels[a]]
        for p in range(len(x)):
            if p == a or labels[p] != labels[a]:
                continue
            farther = [dn for dn in negatives if dn > d[a, p]]
            if farther:
                chosen = min(farther)
            elif negatives:
                chosen = max(negatives)
            else:
                chosen = 0.0  # Addons: no negative at all -> negative distance 0
            total += max(margin + d[a, p] - chosen, 0.0)
            pairs += 1
    return total / pairs if pairs else 0.0


def hard(labels, x, margin=1.0, soft=False, name="euclidean"):
    d = distance_matrix(x, name)
    total = 0.0
    for a in range(len(x)):
        positives = [d[a, p] for p in range(len(x)) if p != a and labels[p] == labels[a]]
        negatives = [d[a, n] for n in range(len(x)) if labels[n] != labels[a]]
        hardest_p = max(positives) if positives else 0.0
        hardest_n = min(negatives) if negatives else max(d[a])  # Addons' fallback
        gap = hardest_p - hardest_n
        total += np.logaddexp(0.0, gap) if soft else max(gap + margin, 0.0)  # stable softplus
    return total / len(x)


def batch_all(labels, x, margin=1.0, name="euclidean", reduction="nonzero"):
    d = distance_matrix(x, name)
    total, nonzero, valid = 0.0, 0, 0
    for a in range(len(x)):
        for p in range(len(x)):
            if p == a or labels[p] != labels[a]:
                continue
            for n in range(len(x)):
                if labels[n] == labels[a]:
                    continue
                loss = max(d[a, p] - d[a, n] + margin, 0.0)
                total += loss
                valid += 1
                nonzero += loss > 0
    count = nonzero if reduction == "nonzero" else valid
    return total / count if count else 0.0


def cosine_similarity(u, v):
    u = np.asarray(u, np.float64)
    v = np.asarray(v, np.float64)
    return float(np.dot(u, v) / (max(np.linalg.norm(u), 1e-12) * max(np.linalg.norm(v), 1e-12)))


def _pairs(labels, keys_labels, positions):
    """For each anchor a: its positive and negative key indices (never its own slot)."""
    for a, label in enumerate(labels):
        positives = [k for k, kl in enumerate(keys_labels) if kl == label and k != positions[a]]
        negatives = [k for k, kl in enumerate(keys_labels) if kl != label]
        yield a, positives, negatives


def contrastive(labels, x, pos_margin=0.0, neg_margin=1.0, distance="euclidean", keys=None):
    keys_x, keys_labels, positions = keys or (x, labels, range(len(x)))
    positive_terms, negative_terms = [], []
    for a, positives, negatives in _pairs(labels, keys_labels, positions):
        d = {k: metric(x[a], keys_x[k], distance) for k in positives + negatives}
        positive_terms += [max(d[p] - pos_margin, 0.0) for p in positives]
        negative_terms += [max(neg_margin - d[n], 0.0) for n in negatives]
    total = 0.0
    for terms in (positive_terms, negative_terms):
        nonzero = [t for t in terms if t > 0]
        total += sum(nonzero) / len(nonzero) if nonzero else 0.0
    return total


def multi_similarity(labels, x, alpha=2.0, beta=50.0, base=0.5, epsilon=None, keys=None):
    keys_x, keys_labels, positions = keys or (x, labels, range(len(x)))
    total = 0.0
    for a, positives, negatives in _pairs(labels, keys_labels, positions):
        s = {k: cosine_similarity(x[a], keys_x[k]) for k in positives + negatives}
        if epsilon is not None:
            max_negative = max((s[n] for n in negatives), default=-np.inf)
            min_positive = min((s[p] for p in positives), default=np.inf)
            positives, negatives = (
                [p for p in positives if s[p] - epsilon < max_negative],
                [n for n in negatives if s[n] + epsilon > min_positive],
            )
        # log(1 + sum exp(v)) = logaddexp over {0} and the v's: exact in float64
        total += np.logaddexp.reduce([0.0] + [-alpha * (s[p] - base) for p in positives]) / alpha
        total += np.logaddexp.reduce([0.0] + [beta * (s[n] - base) for n in negatives]) / beta
    return total / len(x)


def supcon(labels, x, temperature=0.1, keys=None):
    keys_x, keys_labels, positions = keys or (x, labels, range(len(x)))
    terms = []
    for a, positives, negatives in _pairs(labels, keys_labels, positions):
        if not positives or not negatives:
            continue
        s = {k: cosine_similarity(x[a], keys_x[k]) / temperature for k in positives + negatives}
        denominator = np.logaddexp.reduce(list(s.values()))
        terms.append(-sum(s[p] - denominator for p in positives) / len(positives))
    nonzero = [t for t in terms if t > 0]
    return sum(nonzero) / len(nonzero) if nonzero else 0.0


def ntxent(labels, x, temperature=0.07, keys=None):
    keys_x, keys_labels, positions = keys or (x, labels, range(len(x)))
    terms = []
    for a, positives, negatives in _pairs(labels, keys_labels, positions):
        s = {k: cosine_similarity(x[a], keys_x[k]) / temperature for k in positives + negatives}
        for p in positives:
            if not negatives:
                terms.append(0.0)
                continue
            denominator = np.logaddexp.reduce([s[p]] + [s[n] for n in negatives])
            terms.append(-(s[p] - denominator))
    return sum(terms) / len(terms) if terms else 0.0


def explicit_triplets(a, p, n, margin=1.0, name="euclidean", mining="semihard"):
    total = 0.0
    for i in range(len(a)):
        dp = distance(a[i], p[i], name)
        candidates = [distance(a[i], c, name) for c in np.reshape(n[i], (-1, a.shape[1]))]
        if mining == "hardest":
            dn = min(candidates)
        else:
            farther = [c for c in candidates if c > dp]
            dn = min(farther) if farther else max(candidates)
        total += max(dp - dn + margin, 0.0)
    return total / len(a)


def numeric_gradient(f, x, eps=1e-4):
    """Central differences of a scalar function of x (float64)."""
    x = np.array(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        orig = x[idx]
        x[idx] = orig + eps
        up = f(x)
        x[idx] = orig - eps
        down = f(x)
        x[idx] = orig
        grad[idx] = (up - down) / (2 * eps)
    return grad
