"""Shared by the benchmarks that compare two modes in alternating rounds, each round in
a child process per replica count: the summary over rounds and the child's run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np


def summarize(rounds: list[dict], mode: str, baseline: str) -> dict:
    """Median seconds of each mode and the median, lowest and highest ratio over rounds
    (one ratio per round: the machine's load drifts between rounds)."""
    ratios = sorted(r[mode] / r[baseline] for r in rounds)
    return {
        mode: float(np.median([r[mode] for r in rounds])),
        baseline: float(np.median([r[baseline] for r in rounds])),
        "ratio": float(np.median(ratios)),
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
    }


def ratio_line(t: dict, mode: str, baseline: str, rounds: int, unit: str = "ms") -> str:
    """One result of `summarize` as a line: both times, the ratio and its spread."""
    return (
        f"{mode} {t[mode] * 1e3:7.2f} {unit}   {baseline} {t[baseline] * 1e3:7.2f} {unit}   "
        f"ratio {t['ratio']:5.3f} (median of {rounds} rounds; "
        f"{t['ratio_min']:.3f}-{t['ratio_max']:.3f})  (target <= 1.10)"
    )


def run_child(module: str, replicas: int, steps: int, batch: int, *extra: str) -> dict:
    """`python -m module --child replicas --steps … --batch … extra`; its last line's JSON."""
    command = [sys.executable, "-m", module, "--child", str(replicas)]
    command += ["--steps", str(steps), "--batch", str(batch), *extra]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
