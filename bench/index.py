"""The retrieval index of `python -m trainer.index` at scale, on synthetic embeddings.

  python -m bench.index [--rows 1000000] [--dim 128] [--queries 200] [--k 10]
                        [--kinds exact ivf hnsw]

For each kind, a child process builds the index (`trainer.retrieval.neighbours.ApproximateIndex`,
the evaluation's settings) over --rows unit vectors of --dim in 1,000 clusters and
writes the folder (`trainer.retrieval.index_folder.write`, in a temporary folder), reporting the
time of each and how far its resident memory rose during the build, above the embeddings
it was given (sampled every 5 ms). Then --queries queries, one at a time (as
`trainer.search` of one image), are timed against the baseline in the same process:
exact matmul + top-k in numpy over the same vectors; reported per query, with the
index's recall of the exact k nearest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.memory import peak_during

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    x = centres[rng.integers(0, 1000, size=rows)] + 0.5 * rng.normal(size=(rows, dim)).astype(
        np.float32
    )
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def child(kind: str, rows: int, dim: int, queries: int, k: int) -> dict:
    from trainer.retrieval import index_folder
    from trainer.retrieval.neighbours import ApproximateIndex, SearchSettings

    x = synthetic(rows, dim)
    q = synthetic(queries, dim, seed=1)
    index, built, grown = peak_during(lambda: ApproximateIndex(x, "cosine", SearchSettings(kind)))
    with tempfile.TemporaryDirectory(prefix="bench-index-") as folder:
        start = time.perf_counter()
        index_folder.write(os.path.join(folder, "i"), index.index, np.arange(rows).astype(str),
                           np.zeros(rows, np.int64), ("c",), {"dim": dim})  # fmt: skip
        written = time.perf_counter() - start
        size = sum(
            os.path.getsize(os.path.join(folder, "i", f))
            for f in os.listdir(os.path.join(folder, "i"))
        )
    searched, exact, found = [], [], []
    for query in q:
        start = time.perf_counter()
        ids = index.search(query[None], k)[0]
        searched.append(time.perf_counter() - start)
        start = time.perf_counter()
        scores = x @ query
        top = np.argpartition(-scores, k)[:k]
        top = top[np.argsort(-scores[top])]
        exact.append(time.perf_counter() - start)
        found.append(len(set(ids) & set(top)) / k)
    return {
        "build_s": built, "write_s": written, "peak_growth": grown, "folder_bytes": size,
        "query_ms": 1e3 * float(np.median(searched)), "matmul_ms": 1e3 * float(np.median(exact)),
        "recall": float(np.mean(found)),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--kinds", nargs="+", default=["exact", "ivf", "hnsw"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = (args.rows, args.dim, args.queries, args.k)
    if args.child:
        print(json.dumps(child(args.child, *settings)), flush=True)
        return
    print(f"{args.rows:,} × {args.dim} embeddings ({args.rows * args.dim * 4 / 2**20:.0f} MiB), "
          f"k = {args.k}, {args.queries} queries one at a time", flush=True)  # fmt: skip
    for kind in args.kinds:
        command = [
            sys.executable, "-m", "bench.index", "--child", kind, "--rows", str(args.rows),
            "--dim", str(args.dim), "--queries", str(args.queries), "--k", str(args.k),
        ]  # fmt: skip
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        mib = 2**20
        print(
            f"  {kind:6s} build {r['build_s']:7.1f} s  write {r['write_s']:5.1f} s  "
            f"peak memory +{r['peak_growth'] / mib:6.0f} MiB  "
            f"folder {r['folder_bytes'] / mib:6.0f} MiB  query {r['query_ms']:7.2f} ms vs "
            f"matmul+top-k {r['matmul_ms']:7.2f} ms (x{r['query_ms'] / r['matmul_ms']:.3f})  "
            f"recall@{args.k} of exact {r['recall']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
