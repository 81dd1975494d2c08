"""Cost of global mining in plain Keras: `GlobalMiningModel.fit` over `model.fit` with the
same loss mined per replica, in one run.

  python -m bench.fit [--replicas 2 4] [--steps 60] [--batch 96] [--ops default one_device]

For each replica count, a fresh process builds a MirroredStrategy on logical CPUs, once
with the cross-device ops it picks itself (as a user's `MirroredStrategy()` would; on
CPUs, CollectiveAllReduce, which then carries both models' gradient all-reduce, while
the global model's gather and statistics add on one device: see trainer/backends/replicas.py)
and once reducing everything on one device (what the trainer uses for logical CPUs),
then the default job's digits model twice, and
compiles one as a GlobalMiningModel and one as a plain Keras model with the same loss
(TripletSemiHardLoss, cosine). Both fit the same P×K-sampled batches, taking turns
every 5 steps (a `fit` of 5 batches each), `--steps` steps each a round, 5 rounds after
a warm-up epoch. A round's figure is the median time of a step (from its batch's begin
to its end: fit's set-up left out); the result is the median over rounds of the ratio.
Only ratios are meaningful on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench.rounds import ratio_line, run_child, summarize

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROUNDS = 5
CHUNK = 5


def measure(replicas_count: int, steps: int, batch: int, ops: str) -> dict:
    """Runs in the child process: seconds per step of both fits, per round."""
    import keras
    import numpy as np
    import tensorflow as tf

    import losses
    from data.sampler import PKSampler
    from data.sources import digits
    from trainer.backends.replicas import configure_cpu_replicas
    from trainer.fit import GlobalMiningModel
    from trainer.model import digits_convnet

    class StepTimer(keras.callbacks.Callback):
        """Seconds of each step, from its batch's begin to its end: fit's set-up is left out."""

        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_train_batch_begin(self, batch, logs=None):
            self.began = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.seconds.append(time.perf_counter() - self.began)

    devices = configure_cpu_replicas(replicas_count)
    reduce_on_one = tf.distribute.ReductionToOneDevice(devices[0])
    strategy = tf.distribute.MirroredStrategy(
        devices, cross_device_ops=reduce_on_one if ops == "one_device" else None
    )
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
    for _ in range(ROUNDS):
        seconds = {mode: [] for mode in models}
        for chunk in range(steps // CHUNK):  # the models take turns every CHUNK steps
            part = dataset.skip(chunk * CHUNK).take(CHUNK)
            for mode in list(models) if chunk % 2 == 0 else list(models)[::-1]:
                timer = StepTimer()
                models[mode].fit(part, epochs=1, verbose=0, callbacks=[timer])
                seconds[mode] += timer.seconds
        rounds.append({mode: float(np.median(s)) for mode, s in seconds.items()})
    return summarize(rounds, "global", "plain")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=96, help="global batch (multiple of 16)")
    parser.add_argument(
        "--ops",
        nargs="+",
        default=["default", "one_device"],
        help="cross-device ops: MirroredStrategy's default choice, or reducing on one device",
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.batch, args.ops[0])))
        return 0
    results = {}
    for ops in args.ops:
        for n in args.replicas:
            print(f"{n} replicas ({ops} cross-device ops), global batch {args.batch} ...")
            t = run_child("bench.fit", n, args.steps, args.batch, "--ops", ops)
            results[f"{ops}/{n}"] = t
            print("  " + ratio_line(t, "global", "plain", ROUNDS, "ms/step"), flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
