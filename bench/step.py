"""The training job's step rate against a bare compiled loop, and what XLA buys, on this CPU.

  python -m bench.step [--rounds 3] [--steps 200] [--width 64]

One process, the digits job's model (`digits_convnet(width)`), loss (semi-hard triplets,
margin 0.2, cosine), global batch (96 = 6 classes × 16) and optimizer (Adam at 1e-4 on
the job's warm-up and cosine schedule):

- trainer: `trainer.loop.train` on one device (its loop and step, logging; no
  checkpoint, evaluation or export in the timed steps) over batches staged in memory
  beforehand (its `train_batches` replaced), its examples/s over steps 2..N as it logs
  them at step N.
- bare: a `tf.function` of tape, loss and `optimizer.apply` over the same staged
  batches, timed over steps 2..N.
- the same two with the model compiled by XLA (`train.jit_compile_model`).
- trainer_pipeline: the job with its own augmenting pipeline, which on this 2-core
  machine competes with the step for the same cores (on a GPU node it runs on the host
  while the GPU computes).

Rounds alternate the modes; each ratio is the median over rounds of that round's ratio.
Targets: trainer / bare >= 0.95.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gin  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import losses  # noqa: E402
from data.sampler import PKSampler  # noqa: E402
from data.sources import digits  # noqa: E402
from tests.jobs import scalars  # noqa: E402
from trainer.backends.replicas import Replicas  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.model import digits_convnet  # noqa: E402
from trainer.step.learner import learning_rate_schedule  # noqa: E402
from trainer.step.train_step import model_forward  # noqa: E402

BATCH, PER_CLASS = 96, 16


def staged_batches(source, sampler, rows, first_step, last_step, preprocessing=None):
    """`train_batches`' batches without augmentation, made before the loop starts."""
    start, end = rows
    return iter(
        [
            (
                tf.constant(source.items[picked]),
                tf.constant(source.labels[picked]),
                np.ones(end - start, bool),
            )
            for picked in (sampler.global_batch(s)[start:end] for s in range(first_step, last_step))
        ]
    )


def trainer_rate(steps: int, width: int, jit: bool, staged: bool) -> float:
    """Examples/s of the job over steps 2..steps (as it logs them at the last step);
    `staged`: its batches made beforehand instead of by its augmenting pipeline."""
    from trainer import loop

    gin.bind_parameter("export.enabled", False)  # the export reads its own configurable
    pipeline = loop.train_batches
    loop.train_batches = staged_batches if staged else pipeline
    try:
        with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(io.StringIO()):
            train(
                workdir,
                Replicas(),
                steps=steps,
                global_batch_size=BATCH,
                examples_per_class=PER_CLASS,
                log_every=steps,
                checkpoint_every=10 * steps,
                eval_every=10 * steps,
                progress_seconds=1e9,  # prints at step 1 (the rate's window starts after it)
                model=lambda: digits_convnet(width=width),
                jit_compile_model=jit,
            )
            return scalars(workdir, "train/examples_per_second")[steps]
    finally:
        loop.train_batches = pipeline


def bare_rate(steps: int, width: int, jit: bool) -> float:
    """Examples/s of a bare compiled step over staged batches, steps 2..steps."""
    source = digits(classes=(0, 6))
    sampler = PKSampler(source.labels, BATCH // PER_CLASS, PER_CLASS, seed=0)
    staged = [
        (tf.constant(source.items[rows]), tf.constant(source.labels[rows]))
        for rows in (sampler.global_batch(s) for s in range(steps))
    ]
    keras.utils.set_random_seed(0)
    model = digits_convnet(width=width)
    optimizer = keras.optimizers.Adam(learning_rate_schedule(1e-4, steps))  # the job's
    loss = losses.TripletSemiHardLoss(margin=0.2, distance="cosine")
    forward = model_forward(model, jit)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            value = loss(labels, forward(images))
        optimizer.apply(tape.gradient(value, model.trainable_variables), model.trainable_variables)
        return value

    float(step(*staged[0]))  # compiles
    began = time.perf_counter()
    for images, labels in staged[1:]:
        value = step(images, labels)
    float(value)
    return (steps - 1) * BATCH / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()
    modes = {
        "trainer": lambda: trainer_rate(args.steps, args.width, False, staged=True),
        "bare": lambda: bare_rate(args.steps, args.width, False),
        "trainer_xla": lambda: trainer_rate(args.steps, args.width, True, staged=True),
        "bare_xla": lambda: bare_rate(args.steps, args.width, True),
        "trainer_pipeline": lambda: trainer_rate(args.steps, args.width, False, staged=False),
    }
    rounds = []
    for r in range(args.rounds):
        order = list(modes) if r % 2 == 0 else list(reversed(modes))
        rates = {name: modes[name]() for name in order}
        rounds.append(rates)
        print(f"  round {r + 1}: " + "  ".join(f"{k} {v:,.0f}" for k, v in rates.items()))

    def line(name, over, target=""):
        ratios = sorted(r[name] / r[over] for r in rounds)
        median = {k: float(np.median([r[k] for r in rounds])) for k in (name, over)}
        print(
            f"{name} / {over}: {median[name]:,.0f} / {median[over]:,.0f} examples/s, ratio "
            f"{np.median(ratios):.3f} (median of {args.rounds} rounds; {ratios[0]:.3f}-"
            f"{ratios[-1]:.3f}){target}",
            flush=True,
        )

    print(f"digits_convnet(width={args.width}), batch {BATCH}, {args.steps} steps, 1 process")
    line("trainer", "bare", " (target >= 0.95)")
    line("trainer_xla", "bare_xla", " (target >= 0.95)")
    line("bare_xla", "bare", " (what XLA buys the bare step on this CPU)")
    line("trainer_xla", "trainer", " (what train.jit_compile_model buys the job)")
    line("trainer_pipeline", "trainer", " (the augmenting pipeline on the same 2 cores)")


if __name__ == "__main__":
    main()
