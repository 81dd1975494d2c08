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
