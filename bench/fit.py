"""Cost of global mining in plain Keras: `GlobalMiningModel.fit` over `model.fit` with the
same loss mined per replica, in one run.

  python -m bench.fit [--replicas 2 4] [--steps 60] [--batch 96]

For each replica count, a fresh process builds a plain MirroredStrategy on logical CPUs
(as a user would: default cross-device ops), the default job's digits model twice, and
compiles one as a GlobalMiningModel and one as a plain Keras model with the same loss
(TripletSemiHardLoss, cosine). Both fit the same P×K-sampled batches; one epoch of
`--steps` steps each, in alternating order, for 9 rounds after a warm-up epoch. A
round's figure is the median time from one step's end to the next (fit's set-up left
out); the result is the median over rounds of the ratio. Only ratios are meaningful on
a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROUNDS = 9


def measure(replicas_count: int, steps: int, batch: int) -> dict:
    """Runs in the child process: seconds per step of both fits, per round."""
    import keras
    import numpy as np
    import tensorflow as tf

    import losses
    from data.sampler import PKSampler
    from data.sources import digits
    from trainer.fit import GlobalMiningModel
    from trainer.model import digits_convnet
    from trainer.replicas import configure_cpu_replicas

    class StepTimer(keras.callbacks.Callback):
        """Seconds from one step's end to the next: fit's set-up is left out."""

        def __init__(self):
            super().__init__()
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

        def median(self) -> float:
            return float(np.median(np.diff(self.ends)))

    devices = configure_cpu_replicas(replicas_count)
    strategy = tf.distribute.MirroredStrategy(devices)
    source = digits(classes=(0, 6))
    sampler = PKSampler(source.labels, batch // 16, 16, seed=0)
    rows = np.concatenate([sampler.global_batch(step) for step in range(steps)])
    images = source.items[rows]
    dataset = tf.data.Dataset.from_tensor_slices((images, source.labels[rows]))
    dataset = dataset.batch(batch, drop_remainder=True).cache()
    with strategy.scope():
        keras.utils.set_random_seed(0)
        models = {"global": GlobalMiningModel(digits_convnet()), "plain": digits_convnet()}
        for model in models.values():
            model.compile(
                optimizer=keras.optimizers.Adam(1e-4),
                loss=losses.TripletSemiHardLoss(margin=0.2, distance="cosine"),
            )
    for model in models.values():  # trace and warm up
        model.fit(dataset, epochs=1, verbose=0)
    rounds = []
    for r in range(ROUNDS):
        seconds = {}
        for mode in list(models) if r % 2 == 0 else list(models)[::-1]:
            timer = StepTimer()
            models[mode].fit(dataset, epochs=1, verbose=0, callbacks=[timer])
            seconds[mode] = timer.median()
        rounds.append(seconds)
    ratios = sorted(r["global"] / r["plain"] for r in rounds)
    return {
        "global": float(np.median([r["global"] for r in rounds])),
        "plain": float(np.median([r["plain"] for r in rounds])),
        "ratio": float(np.median(ratios)),
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=96, help="global batch (multiple of 16)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.batch)))
        return 0
    results = {}
    for n in args.replicas:
        print(f"{n} replicas, global batch {args.batch}, {args.steps} steps an epoch ...")
        child = [sys.executable, "-m", "bench.fit", "--child", str(n)]
        child += ["--steps", str(args.steps), "--batch", str(args.batch)]
        out = subprocess.run(child, capture_output=True, text=True, check=True)
        t = json.loads(out.stdout.strip().splitlines()[-1])
        results[n] = t
        print(
            f"  GlobalMiningModel.fit {t['global'] * 1e3:7.2f} ms/step   plain fit "
            f"{t['plain'] * 1e3:7.2f} ms/step   ratio {t['ratio']:5.3f} (median of {ROUNDS} "
            f"rounds; {t['ratio_min']:.3f}-{t['ratio_max']:.3f})  (target <= 1.10)",
            flush=True,
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
