"""Speed of the mined losses, as ratios measured in one run (forward + backward, CPU).

  python -m bench.losses [--repeats 5] [--quick]

1. Peak resident memory added by one forward + backward, each case in a fresh process.
2. Semi-hard at B = 1024 (P×K, K = 4, D = 128): Addons' tiled formulation / ours.
3. Every mined loss at B = 4096 over the bare pairwise-distance matrix (forward +
   backward); the batch-all and pair-based losses have a target of at most 3x.
4. CrossBatchMemory with M = 16,384 keys and a batch of 1,024 (memory full) over the
   bare 1,024 x 16,384 distance matrix (forward + backward): target at most 3x.
Timings are interleaved (baseline, candidate, baseline, ...) and the median is used,
because the machines are shared and noisy; only ratios are meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _case_fn(name):
    import tensorflow as tf

    import losses
    from tests.addons_reference import addons_semihard

    fns = {
        "addons_semihard": addons_semihard,
        "semihard": losses.triplet_semihard_loss,
        "hard": losses.triplet_hard_loss,
        "batch_all": losses.triplet_batch_all_loss,
        "contrastive": losses.contrastive_loss,
        "multi_similarity": losses.multi_similarity_loss,
        "supcon": losses.supcon_loss,
        "ntxent": losses.ntxent_loss,
        "pairwise_distances": lambda labels, x: tf.reduce_sum(losses.pairwise_distances(x, x)),
    }
    return fns[name]


PAIR_LOSSES = ("contrastive", "multi_similarity", "supcon", "ntxent")
MEMORY_LOSSES = {
    "xbm_contrastive": "ContrastiveLoss",
    "xbm_multi_similarity": "MultiSimilarityLoss",
}


def _memory_step(name, labels, x, memory_size):
    """Forward + backward of a batch against a full memory of `memory_size` keys, or of
    the bare batch x memory distance matrix (`name == "memory_distances"`)."""
    import numpy as np
    import tensorflow as tf

    import losses

    rng = np.random.default_rng(1)
    keys = tf.constant(rng.normal(size=(memory_size, x.shape[1])).astype(np.float32))
    if name == "memory_distances":
        fn = lambda labels, x: tf.reduce_sum(losses.pairwise_distances(x, keys))  # noqa: E731
    else:
        fn = losses.CrossBatchMemory(getattr(losses, MEMORY_LOSSES[name])(), memory_size)
        key_labels = rng.integers(0, memory_size // 4, memory_size)
        for start in range(0, memory_size, len(labels)):  # fill the memory
            fn(key_labels[start : start + len(labels)], keys[start : start + len(labels)])
    return _compiled(fn, labels, x)


def _batch(batch, dim, k, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(batch // k), k)).astype(np.int32)
    x = rng.normal(size=(batch, dim)).astype(np.float32)
    return labels, x


def _step(name, labels, x):
    return _compiled(_case_fn(name), labels, x)


def _compiled(fn, labels, x):
    """One forward + backward of `fn(labels, x)` with respect to x, as a tf.function."""
    import tensorflow as tf

    labels = tf.constant(labels)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = fn(labels, x)
        return loss, tape.gradient(loss, x)

    x = tf.constant(x)
    return lambda: [t.numpy() for t in step(x)]


def time_interleaved(names, batch, dim, k, repeats, memory_size=None):
    """Median seconds per forward + backward of each case, timed in turns."""
    labels, x = _batch(batch, dim, k)
    if memory_size:
        steps = {n: _memory_step(n, labels, x, memory_size) for n in names}
    else:
        steps = {n: _step(n, labels, x) for n in names}
    for run in steps.values():  # trace and warm up
        run()
    times = {n: [] for n in names}
    for _ in range(repeats):
        for n, run in steps.items():
            start = time.perf_counter()
            run()
            times[n].append(time.perf_counter() - start)
    return {n: sorted(t)[len(t) // 2] for n, t in times.items()}


def peak_memory_mb(name, batch, dim, k):
    """Peak RSS added by one forward + backward, measured in a fresh process."""
    code = (
        "import json,resource,sys; sys.path.insert(0, '.');"
        "from bench.losses import _batch,_step;"
        f"l,x=_batch({batch},{dim},{k}); run=_step({name!r},l,x);"
        "before=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; run();"
        "print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss-before)/1024))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smaller batches (smoke test)")
    args = parser.parse_args(argv)
    small, large = (256, 512) if args.quick else (1024, 4096)
    dim, k = 128, 4

    # Memory first, in child processes, while this process holds nothing large: Addons'
    # tiled formulation alone takes ~15 GB at B = 1024.
    print("[1/4] peak memory added by one forward + backward (fresh process each)", flush=True)
    memory = {
        f"addons_semihard@{small}": peak_memory_mb("addons_semihard", small, dim, k),
        f"semihard@{small}": peak_memory_mb("semihard", small, dim, k),
        f"pairwise_distances@{large}": peak_memory_mb("pairwise_distances", large, dim, k),
        f"semihard@{large}": peak_memory_mb("semihard", large, dim, k),
        f"batch_all@{large}": peak_memory_mb("batch_all", large, dim, k),
        **{f"{n}@{large}": peak_memory_mb(n, large, dim, k) for n in PAIR_LOSSES},
    }
    for n, mb in memory.items():
        print(f"      {n:<28} {mb:9.1f} MB", flush=True)
    print(f"[2/4] semi-hard, B={small}, D={dim}, K={k}: Addons tiled vs ours", flush=True)
    t1 = time_interleaved(["addons_semihard", "semihard"], small, dim, k, args.repeats)
    speedup = t1["addons_semihard"] / t1["semihard"]
    print(
        f"      addons {t1['addons_semihard'] * 1e3:9.1f} ms   ours {t1['semihard'] * 1e3:8.1f} ms"
        f"   speed-up {speedup:6.1f}x  (target >= 50x)",
        flush=True,
    )

    print(f"[3/4] B={large}, D={dim}, K={k}: each loss over the bare distance matrix", flush=True)
    names = ["pairwise_distances", "semihard", "hard", "batch_all", *PAIR_LOSSES]
    t2 = time_interleaved(names, large, dim, k, args.repeats)
    base = t2["pairwise_distances"]
    ratios = {n: t2[n] / base for n in names[1:]}
    print(f"      pairwise distances {base * 1e3:8.1f} ms", flush=True)
    for n in names[1:]:
        target = {"semihard": "  (target <= 5x)", "hard": ""}.get(n, "  (target <= 3x)")
        print(f"      {n:<18} {t2[n] * 1e3:8.1f} ms   ratio {ratios[n]:5.2f}x{target}", flush=True)

    memory_size, memory_batch = (4096, 256) if args.quick else (16384, 1024)
    print(
        f"[4/4] CrossBatchMemory, M={memory_size}, batch {memory_batch}: over the bare "
        f"{memory_batch} x {memory_size} distance matrix",
        flush=True,
    )
    names = ["memory_distances", *MEMORY_LOSSES]
    t3 = time_interleaved(names, memory_batch, dim, k, args.repeats, memory_size=memory_size)
    base = t3["memory_distances"]
    print(f"      batch x memory distances {base * 1e3:8.1f} ms", flush=True)
    for n in MEMORY_LOSSES:
        ratios[n] = t3[n] / base
        print(
            f"      {n:<24} {t3[n] * 1e3:8.1f} ms   ratio {ratios[n]:5.2f}x  (target <= 3x)",
            flush=True,
        )

    print(
        json.dumps({"speedup_vs_addons": speedup, "ratio_vs_pairwise": ratios, "peak_mb": memory})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
