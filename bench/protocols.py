"""Evaluation protocols at scale, on synthetic clustered embeddings (D = 128, cosine).

1. At SOP's size (60,502 embeddings, 11,316 classes): all against all, queries against a
   gallery (half and half) and verification (every genuine pair, 1M impostors), each
   timed against all against all in the same run; then 10k queries against a gallery
   of `--gallery` (all against all there only on paper, from the measured rate).
2. A gallery of `--gallery` embeddings (default 1M) and 10k queries: exact ranking on
   TensorFlow against faiss's 'ivf' and 'hnsw' at the default settings and a sweep of
   their search width: build time, query time, index size, and recall@10 of exact on
   1,000 queries. `--latent 16` (default): clusters of intrinsic dimension 16 in 128-D;
   `--latent 0`: isotropic 128-D noise, the worst case.

    python -m bench.protocols [--gallery 1000000] [--queries 10000] [--latent 16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def clustered(n: int, classes: int, dim: int = 128, seed: int = 0, latent: int | None = None):
    """Unit embeddings around class centres. `latent` None: isotropic noise in all `dim`
    dimensions (the hardest case for a search: every direction counts, neighbours nearly
    equidistant); else clusters in a `latent`-dimensional space mapped into `dim` with a
    little noise, as learned embeddings are (their intrinsic dimension is low)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    width = latent or dim
    centres = rng.normal(size=(classes, width)).astype(np.float32)
    x = centres[labels] + 0.8 * rng.normal(size=(n, width)).astype(np.float32)
    if latent:
        basis = np.linalg.qr(rng.normal(size=(dim, latent)))[0].T.astype(np.float32)
        x = x @ basis + 0.05 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


SWEEP = {"ivf": (16, 32, 128, 256, 512), "hnsw": (64, 128, 512, 1024)}
SWEPT = {"ivf": "evaluation.ivf_probes", "hnsw": "evaluation.hnsw_ef_search"}


def timed(function, *args, **kwargs):
    began = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - began


def bench_sop_size() -> None:
    from trainer.evaluation import query_gallery_metrics, retrieval_metrics, verification_metrics

    x, labels = clustered(60_502, 11_316)
    print("protocols at SOP's size: 60,502 embeddings, 11,316 classes, D = 128", flush=True)
    everything, base = timed(retrieval_metrics, x, labels, (1, 10))
    half = len(x) // 2
    gallery, seconds_qg = timed(
        query_gallery_metrics, x[:half], labels[:half], x[half:], labels[half:], (1, 10)
    )
    verified, seconds_v = timed(verification_metrics, x, labels)
    print(f"  all against all     {base:6.1f} s  {everything}")
    print(f"  query/gallery 50/50 {seconds_qg:6.1f} s  ratio {seconds_qg / base:.2f}  {gallery}")
    print(
        f"  verification        {seconds_v:6.1f} s  ratio {seconds_v / base:.2f}  "
        + "  ".join(f"{k} {v:.4f}" for k, v in verified.items()),
        flush=True,
    )


def bench_million(gallery_size: int, queries: int, latent: int | None) -> None:
    """Queries against a large gallery, and verification on it, timed; all against all
    at that size would rank every gallery item as a query: its time is the measured
    time per query times the gallery size (on paper)."""
    from trainer.evaluation import query_gallery_metrics, verification_metrics

    x, labels = clustered(
        gallery_size + queries, max(1, (gallery_size + queries) // 10), seed=2, latent=latent
    )
    print(f"protocols at {gallery_size:,} gallery × {queries:,} queries, D = 128", flush=True)
    found, seconds = timed(
        query_gallery_metrics,
        x[gallery_size:], labels[gallery_size:], x[:gallery_size], labels[:gallery_size], (1, 10),
    )  # fmt: skip
    per_query = seconds / queries
    print(
        f"  query/gallery (exact) {seconds:6.1f} s ({1e3 * per_query:.2f} ms/query)  {found}\n"
        f"  all against all at {gallery_size:,}: {gallery_size * per_query / 3600:.1f} h on "
        f"paper ({gallery_size:,} queries at that rate): query/gallery takes "
        f"{queries / gallery_size:.3f} of it",
        flush=True,
    )
    verified, seconds = timed(verification_metrics, x[:gallery_size], labels[:gallery_size])
    print(
        f"  verification (every genuine pair, 1M impostors) {seconds:6.1f} s  "
        + "  ".join(f"{k} {v:.4f}" for k, v in verified.items()),
        flush=True,
    )


def bench_search(gallery_size: int, queries: int, latent: int | None) -> None:
    import tensorflow as tf

    from losses import pairwise_distances
    from trainer.evaluation import MAX_DISTANCES_PER_CHUNK
    from trainer.retrieval.neighbours import ApproximateIndex, SearchSettings, recall_of_exact

    x, _ = clustered(
        gallery_size + queries, max(1, (gallery_size + queries) // 10), seed=1, latent=latent
    )
    keys, asked = x[:gallery_size], x[gallery_size:]
    data = f"{latent}-D clusters mapped to 128-D" if latent else "isotropic noise in 128-D"
    print(
        f"search: gallery {gallery_size:,}, {queries:,} queries, top 10; {data}, 10 per class",
        flush=True,
    )
    keys_tensor = tf.constant(keys)

    chunk = max(1, MAX_DISTANCES_PER_CHUNK // gallery_size)  # as the evaluation chunks

    def exact_top(q):
        ids = []
        for first in range(0, len(q), chunk):
            d = pairwise_distances(tf.constant(q[first : first + chunk]), keys_tensor, "cosine")
            ids.append(tf.math.top_k(-d, 10)[1].numpy())
        return np.concatenate(ids)

    exact, exact_seconds = timed(exact_top, asked)
    print(
        f"  exact (TensorFlow matmul + top-k): {exact_seconds:.1f} s, "
        f"{1e3 * exact_seconds / queries:.2f} ms/query, keys {keys.nbytes / 2**20:.0f} MiB",
        flush=True,
    )
    for kind in ("ivf", "hnsw"):
        index, build = timed(ApproximateIndex, keys, "cosine", SearchSettings(kind))
        found, seconds = timed(index.search, asked, 10)
        recall = recall_of_exact(found[:1000], exact[:1000])
        print(
            f"  {kind:<5} build {build:7.1f} s, search {seconds:6.1f} s "
            f"({1e3 * seconds / queries:.3f} ms/query, {exact_seconds / seconds:.1f}x faster "
            f"than exact), index {index.nbytes / 2**20:.0f} MiB, recall@10 of exact "
            f"{recall:.4f} (target >= 0.99 at the defaults)",
            flush=True,
        )
        for value in SWEEP[kind]:  # the same index, searched wider or narrower
            if kind == "ivf":
                index.index.nprobe = value
            else:
                index.settings = SearchSettings(kind, hnsw_ef_search=value)
            found, seconds = timed(index.search, asked, 10)
            print(
                f"        {SWEPT[kind]} {value:>5}: {1e3 * seconds / queries:.3f} ms/query "
                f"({exact_seconds / seconds:.1f}x faster than exact), recall@10 of exact "
                f"{recall_of_exact(found[:1000], exact[:1000]):.4f}",
                flush=True,
            )
        del index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--skip-sop", action="store_true")
    parser.add_argument(
        "--latent", type=int, default=16, help="intrinsic dimension of the clusters; 0: isotropic"
    )
    args = parser.parse_args()
    if not args.skip_sop:
        bench_sop_size()
        bench_million(args.gallery, args.queries, args.latent or None)
    bench_search(args.gallery, args.queries, args.latent or None)


if __name__ == "__main__":
    main()
