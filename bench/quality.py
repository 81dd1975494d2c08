"""Held-out retrieval quality of the default digits job with each loss (informative).

  python -m bench.quality [--steps N] [--losses NAME ...]

Runs `python -m trainer.main` on one device (the job is replica-count invariant) with the
default settings, seed and steps, changing only `train.loss` (and, for the memory rows,
`train.cross_batch_memory`), and prints MAP@R and Recall@1 on the held-out digits 6-9 as
a Markdown table. The workdirs go to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "TripletSemiHardLoss (default)": (),
    # The other triplet losses with the default's margin and distance.
    "TripletHardLoss": (
        "train.loss=@TripletHardLoss()",
        "TripletHardLoss.margin=0.2",
        "TripletHardLoss.distance='cosine'",
    ),
    "TripletBatchAllLoss": (
        "train.loss=@TripletBatchAllLoss()",
        "TripletBatchAllLoss.margin=0.2",
        "TripletBatchAllLoss.distance='cosine'",
    ),
    "ContrastiveLoss": ("train.loss=@ContrastiveLoss()",),
    "MultiSimilarityLoss": ("train.loss=@MultiSimilarityLoss()",),
    "SupConLoss": ("train.loss=@SupConLoss()",),
    "NTXentLoss": ("train.loss=@NTXentLoss()",),
    "ContrastiveLoss + memory 1024": (
        "train.loss=@ContrastiveLoss()",
        "train.cross_batch_memory=1024",
    ),
    "MultiSimilarityLoss + memory 1024": (
        "train.loss=@MultiSimilarityLoss()",
        "train.cross_batch_memory=1024",
    ),
    # Proxy losses (their centres sharded in the trainer; one device here), PML defaults.
    "ProxyAnchorLoss": ("train.loss=@ProxyAnchorLoss()",),
    "ProxyNCALoss": ("train.loss=@ProxyNCALoss()",),
    "ArcFaceLoss": ("train.loss=@ArcFaceLoss()",),
    "CosFaceLoss": ("train.loss=@CosFaceLoss()",),
    "SubCenterArcFaceLoss": ("train.loss=@SubCenterArcFaceLoss()",),
    "ProxyAnchorLoss, centres at 100x": (
        "train.loss=@ProxyAnchorLoss()",
        "optimizer.centre_learning_rate_multiplier=100",
    ),
    "ArcFaceLoss, centres at 100x": (
        "train.loss=@ArcFaceLoss()",
        "optimizer.centre_learning_rate_multiplier=100",
    ),
    "ArcFaceLoss, centres at 10x": (
        "train.loss=@ArcFaceLoss()",
        "optimizer.centre_learning_rate_multiplier=10",
    ),
}


def run(params: tuple, steps: int | None, workdir: str) -> dict:
    command = [sys.executable, "-m", "trainer.main", f"--workdir={workdir}"]
    extra = ("distribute.strategy='single'", "export.enabled=False", *params)
    if steps:
        extra += (f"train.steps={steps}",)
    command += [f"--gin_param={p}" for p in extra]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    with open(os.path.join(workdir, "results.json")) as f:
        return {**json.load(f), "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="default: the job's own")
    parser.add_argument("--losses", nargs="*", default=list(CASES), help="rows to run")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as folder:
        for i, name in enumerate(args.losses, 1):
            print(f"[{i}/{len(args.losses)}] {name}", flush=True)
            result = run(CASES[name], args.steps, os.path.join(folder, f"case{i}"))
            print(
                f"      map@r {result['map@r']:.4f}  recall@1 {result['recall@1']:.4f}  "
                f"({result['seconds']:.0f} s)",
                flush=True,
            )
            rows.append((name, result))
    print("\n| loss | MAP@R | Recall@1 |\n| --- | --- | --- |")
    for name, result in rows:
        print(f"| {name} | {result['map@r']:.4f} | {result['recall@1']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
