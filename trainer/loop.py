"""The training job: data, model, optimizer, checkpoints, the step loop, evaluation, export.

Every public knob is a `train.*` gin binding (see gin/base.gin). The loop runs on the
replica abstraction and never branches on the backend, only on whether workers may come
and go (elastic Horovod); the chief alone prints progress, writes TensorBoard and
checkpoints and exports.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import types
import typing

import gin
import keras
import numpy as np

from data import shared
from data.errors import InputError
from data.pipeline import (
    corrupt_policy,
    listed,
    preprocessing_for,
    train_batches,
    unreadable,
    verify_images,
)
from data.sampler import PKSampler
from data.sources import digits
from losses import TripletSemiHardLoss
from trainer import export
from trainer.checkpoints import Checkpoints
from trainer.evaluation import embed_source, embedding_function, sharded_retrieval_metrics
from trainer.model import digits_convnet, sync_batchnorm
from trainer.preemption import StopRequest
from trainer.summaries import Summaries
from trainer.train_step import TrainStep

OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": keras.optimizers.SGD,
}
PRECISIONS = (None, "float32", "mixed_float16", "mixed_bfloat16")


@gin.configurable
def learning_rate_schedule(
    base_rate: float, steps: int, warmup_steps: int = 20, decay: str = "cosine"
):
    """Linear warm-up from 0 to `base_rate`, then cosine decay to 0 at `steps` (or constant)."""
    if warmup_steps < 0:
        raise InputError(f"learning_rate_schedule.warmup_steps must be >= 0, got {warmup_steps}.")
    if decay not in ("cosine", "constant"):
        raise InputError(
            f"Unknown learning_rate_schedule.decay {decay!r}; use 'cosine' or 'constant'."
        )
    warmup_steps = min(warmup_steps, max(steps - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup_steps else base_rate,
        max(steps - warmup_steps, 1),
        alpha=1.0 if decay == "constant" else 0.0,  # alpha = 1: no decay
        warmup_target=base_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


MINED_LOSSES = ("TripletSemiHardLoss", "TripletHardLoss", "TripletBatchAllLoss")


def _check_types(function, values: dict) -> None:
    """Each annotated parameter of the gin-configured `function` has a value of its type
    (a binding like train.steps='abc' is named here, not deep in a traceback)."""
    hints = typing.get_type_hints(function.__wrapped__)
    for name, hint in hints.items():
        if name == "return" or name not in values:
            continue
        value = values[name]
        allowed = typing.get_args(hint) if typing.get_origin(hint) is types.UnionType else (hint,)
        if float in allowed:
            allowed = (*allowed, int)  # 1 is a fine learning rate
        matches = any(
            value is None if kind is type(None) else isinstance(value, kind) for kind in allowed
        )
        if matches and isinstance(value, bool) and bool not in allowed:
            matches = False  # True is an int to Python, not a step count
        names = " or ".join("None" if k is type(None) else k.__name__ for k in allowed)
        _check(matches, f"train.{name} must be {names}, got {value!r} ({type(value).__name__}).")


@gin.configurable("train", denylist=["workdir", "replicas", "assembled"])
def train(
    workdir: str,
    replicas,
    steps: int = 200,
    global_batch_size: int = 96,
    seed: int = 0,
    log_every: int = 10,
    checkpoint_every: int = 50,
    eval_every: int = 50,
    loss=None,
    cross_replica_mining: bool = True,
    examples_per_class: int = 16,
    train_data=None,
    eval_data=None,
    model=digits_convnet,
    optimizer: str = "adam",
    learning_rate: float = 1e-4,
    weight_decay: float = 0.0,
    scale_learning_rate: bool = False,
    precision: str | None = None,
    synchronized_batchnorm: bool = False,
    recall_k: int = 4,
    eval_chunk_size: int = 512,
    keep_checkpoints: int = 3,
    progress_seconds: float = 10.0,
    export_model: bool = True,
    stop_after_steps: int | None = None,
    nonfinite: str = "stop",
    elastic_commit_every: int = 10,
    assembled=None,
) -> dict:
    """Trains, evaluates and exports; returns the last evaluation's metrics (chief and others).

    Defaults are the embedded digits job: train on classes 0-5, evaluate on 6-9.
    `stop_after_steps` ends this run (with a checkpoint) after that many steps, for
    queues with a time limit; the same command then continues the job. `nonfinite`:
    'stop' ends the run at a non-finite loss or gradient (naming the step and the last
    good checkpoint), 'skip' leaves such steps out and counts them. An elastic Horovod
    job keeps its state in memory every `elastic_commit_every` steps (see
    trainer/elastic.py); after a worker dies it goes on from there. `assembled()` is
    called once every configurable of the job has been built, before anything is written
    (the entry point refuses --gin_param bindings that nothing read).
    """
    _check_types(train, locals())
    started = time.time()
    chief = replicas.is_chief

    def say(*args, **kwargs):  # the chief's voice (in an elastic job the chief can change)
        if replicas.is_chief:
            print(*args, **kwargs)

    for name, value in (
        ("steps", steps),
        ("global_batch_size", global_batch_size),
        ("examples_per_class", examples_per_class),
        ("log_every", log_every),
        ("checkpoint_every", checkpoint_every),
        ("eval_every", eval_every),
        ("elastic_commit_every", elastic_commit_every),
        ("recall_k", recall_k),
        ("eval_chunk_size", eval_chunk_size),
        ("keep_checkpoints", keep_checkpoints),
        ("stop_after_steps", 1 if stop_after_steps is None else stop_after_steps),
    ):
        _check(value >= 1, f"train.{name} must be >= 1, got {value}.")
    _check(learning_rate > 0, f"train.learning_rate must be > 0, got {learning_rate}.")
    _check(weight_decay >= 0, f"train.weight_decay must be >= 0, got {weight_decay}.")
    _check(progress_seconds >= 0, f"train.progress_seconds must be >= 0, got {progress_seconds}.")
    if not replicas.elastic:  # an elastic job takes the worker counts it gets (see below)
        _check_divides(global_batch_size, replicas.size)
    _check(
        not (scale_learning_rate and replicas.elastic),
        "train.scale_learning_rate=True cannot be used in an elastic job, whose replica "
        "count changes; set train.learning_rate for the global batch instead.",
    )
    _check(
        global_batch_size % examples_per_class == 0,
        f"train.global_batch_size={global_batch_size} is not a multiple of "
        f"train.examples_per_class={examples_per_class} (the P×K batch needs P = B / K).",
    )
    _check(
        optimizer in OPTIMIZERS,
        f"Unknown train.optimizer {optimizer!r}; valid: {tuple(OPTIMIZERS)}.",
    )
    _check(
        nonfinite in ("stop", "skip"),
        f"Unknown train.nonfinite {nonfinite!r}; valid: 'stop', 'skip'.",
    )
    _check(precision in PRECISIONS, f"Unknown train.precision {precision!r}; valid: {PRECISIONS}.")
    loss = loss if loss is not None else TripletSemiHardLoss(margin=0.2, distance="cosine")
    _check(
        callable(getattr(loss, "terms", None)),
        f"train.loss = {type(loss).__name__} cannot be mined over a batch (it takes explicit "
        "triplets); the trainer takes a loss with a query/key form: "
        + ", ".join(MINED_LOSSES)
        + ".",
    )

    on_corrupt = corrupt_policy()
    with shared.using(_shared_work(workdir, replicas)):  # indexing and checks, split and cached
        train_source = (train_data or (lambda: digits(classes=(0, 6))))()
        eval_source = (eval_data or (lambda: digits(classes=(6, 10))))()
        train_source, corrupt = verify_images(train_source, log=say)
        eval_source, corrupt_eval = verify_images(eval_source, log=say)
    for name in (corrupt + corrupt_eval)[:5]:
        say(f"  skipped corrupt image {name}")
    if corrupt or corrupt_eval:
        say(f"skipped {len(corrupt)} corrupt training and {len(corrupt_eval)} eval images")
    sampler = PKSampler(
        train_source.labels, global_batch_size // examples_per_class, examples_per_class, seed
    )
    say(
        f"data: train {train_source.name}: {len(train_source)} examples, "
        f"{train_source.num_classes} classes; eval {eval_source.name}: {len(eval_source)} "
        f"examples, {eval_source.num_classes} classes"
    )
    if sampler.skipped_classes:
        say(
            f"  {sampler.skipped_classes} classes have fewer than {examples_per_class} examples "
            "and are never sampled"
        )

    train_preprocessing = preprocessing_for(train_source)  # images.* or pixels.*
    eval_preprocessing = preprocessing_for(eval_source)
    keras.mixed_precision.set_global_policy(precision or "float32")
    keras.utils.set_random_seed(seed)
    base_rate = learning_rate * (replicas.size if scale_learning_rate else 1)
    with replicas.scope():
        embedding_model = model()
        if synchronized_batchnorm:
            say(f"synchronized BatchNorm in {sync_batchnorm(embedding_model, replicas)} layers")
        schedule = learning_rate_schedule(base_rate, steps)
        opt = OPTIMIZERS[optimizer](
            learning_rate=schedule,
            **({"weight_decay": weight_decay} if weight_decay else {}),
        )
        if precision == "mixed_float16":
            opt = keras.optimizers.LossScaleOptimizer(opt)
        elif nonfinite == "skip":
            # Its skipping of non-finite steps, without loss scaling: the scale stays a
            # power of two (exact in float32) and never grows.
            opt = keras.optimizers.LossScaleOptimizer(
                opt, initial_scale=1.0, dynamic_growth_steps=2**31 - 1
            )
    step_fn = TrainStep(embedding_model, opt, loss, replicas, cross_replica_mining)
    if assembled is not None:
        assembled()  # every configurable has been built: nothing more will read a binding
    if chief:
        os.makedirs(workdir, exist_ok=True)  # only once the configuration has checked out
    checkpoints = Checkpoints(
        os.path.join(workdir, "checkpoints"),
        replicas,
        keep_checkpoints,
        model=embedding_model,
        optimizer=opt,
    )
    first_step = checkpoints.restore(
        [*embedding_model.variables, *opt.variables], broadcast=not replicas.elastic
    )
    summaries = Summaries(workdir, enabled=chief)
    if corrupt or corrupt_eval:
        summaries.scalars(first_step, {"data/skipped_corrupt_images": len(corrupt + corrupt_eval)})
    evaluate = Evaluator(
        embedding_model,
        replicas,
        eval_source,
        loss.distance,
        recall_k,
        eval_chunk_size,
        summaries,
        say,
        on_corrupt,
        eval_preprocessing,
    )
    if chief:
        operative = gin.operative_config_str()
        with open(os.path.join(workdir, "operative_config.gin"), "w") as f:
            f.write(operative)
        summaries.text("config/operative_config", "```\n" + operative + "\n```", first_step)
    say(
        f"replicas: {replicas.size} ({replicas.name}), global batch {global_batch_size} = "
        f"{sampler.classes_per_batch} classes × {examples_per_class}, "
        f"{'global' if cross_replica_mining else 'per-replica'} mining, "
        f"{embedding_model.count_params():,} parameters"
    )
    if first_step:
        say(f"resumed from {checkpoints.latest} at step {first_step}")
    if first_step >= steps:
        say(f"already trained to step {first_step} >= train.steps={steps}")

    job = _Job(
        workdir=workdir,
        replicas=replicas,
        say=say,
        started=started,
        steps=steps,
        global_batch_size=global_batch_size,
        log_every=log_every,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
        progress_seconds=progress_seconds,
        export_model=export_model,
        stop_after_steps=stop_after_steps,
        skip_nonfinite=nonfinite == "skip",
        on_corrupt=on_corrupt,
        train_source=train_source,
        train_preprocessing=train_preprocessing,
        eval_source=eval_source,
        sampler=sampler,
        model=embedding_model,
        schedule=schedule,
        step_fn=step_fn,
        checkpoints=checkpoints,
        summaries=summaries,
        evaluate=evaluate,
        first_step=first_step,
    )
    with StopRequest() as stop:
        if replicas.elastic:
            return _run_elastic(job, stop, elastic_commit_every)
        return _run(job, stop, first_step)


def _shared_work(workdir: str, replicas) -> shared.SharedWork:
    """The job's processes as data/shared.py sees them. In an elastic job a worker may
    join later, and nobody may call a collective before the elastic loop: each worker
    then works alone (a cached result is still read back)."""
    cache_dir = shared.cache_directory(workdir)
    if replicas.elastic:
        return shared.SharedWork(cache_dir)
    return shared.SharedWork(
        cache_dir,
        process=replicas.rank,
        processes=replicas.size // replicas.local_replicas,
        sum_over_processes=replicas.sum_over_processes,
    )


def _check_divides(global_batch_size: int, num_replicas: int) -> None:
    _check(
        global_batch_size % num_replicas == 0,
        f"train.global_batch_size={global_batch_size} is not divisible by the "
        f"{num_replicas} replicas; each replica must hold the same number of rows.",
    )


@dataclasses.dataclass
class _Job:
    """Everything the step loop needs, built by `train`."""

    workdir: str
    replicas: object
    say: object
    started: float
    steps: int
    global_batch_size: int
    log_every: int
    checkpoint_every: int
    eval_every: int
    progress_seconds: float
    export_model: bool
    stop_after_steps: int | None
    skip_nonfinite: bool
    on_corrupt: str
    train_source: object
    train_preprocessing: object
    eval_source: object
    sampler: PKSampler
    model: keras.Model
    schedule: object
    step_fn: TrainStep
    checkpoints: Checkpoints
    summaries: Summaries
    evaluate: object
    first_step: int
    unreadable_images: int = 0  # images unreadable at run time, replaced (on_corrupt='skip')


class NumericalError(RuntimeError):
    """A non-finite loss or gradient stopped the run (no NaN weights were checkpointed)."""


def _run(job: _Job, stop: StopRequest, start: int, after_step=None) -> dict:
    """The step loop from step `start`: train, log, checkpoint, evaluate; then export.

    `after_step(step)`, if given, runs at the end of every step (elastic commits).
    """
    say, steps, first_step = job.say, job.steps, job.first_step
    last_step = steps if not job.stop_after_steps else min(steps, first_step + job.stop_after_steps)
    rows = job.replicas.process_rows(job.global_batch_size)
    batches = train_batches(
        job.train_source, job.sampler, rows, start, last_step, job.train_preprocessing
    )
    last_print = window_start = time.time()
    window_steps, results, skipped = 0, {}, 0
    for step, (images, labels, ok) in zip(range(start + 1, last_step + 1), batches, strict=True):
        metrics = job.step_fn.run_local(images, labels, global_size=job.global_batch_size)
        # One small collective a step: a stop request, or an unreadable image, anywhere.
        stop_requested, unreadable_rows = job.replicas.sum_over_processes(
            [stop.requested, np.size(ok) - np.count_nonzero(ok)]
        )
        if unreadable_rows:
            _unreadable_in_step(job, step)
        window_steps += 1
        skipped += _check_finite(job, metrics, step)
        now = time.time()
        rate = window_steps * job.global_batch_size / max(now - window_start, 1e-9)
        if step % job.log_every == 0 or step == steps:
            _log_step(job, step, metrics, rate, skipped)
        if now - last_print >= job.progress_seconds or step in (start + 1, last_step):
            _print_progress(job, step, metrics, rate, compiling=step == start + 1)
            last_print, window_start, window_steps = now, now, 0
        if stop_requested and step < last_step:
            job.checkpoints.save(step)  # and straight out: the scheduler's grace is short
            say(
                f"stopped by {stop.signal_name or 'a stop request on another worker'} at "
                f"step {step} of {steps}; checkpoint {job.checkpoints.latest}; run the same "
                "command to continue",
                flush=True,
            )
            job.summaries.flush()
            return results
        if step % job.checkpoint_every == 0 or step == last_step:
            job.checkpoints.save(step)
        if step % job.eval_every == 0 or step == steps:
            results, embeddings = job.evaluate(step)
        if after_step is not None:
            after_step(step)
    if last_step < steps:
        say(
            f"stopped at step {last_step} of {steps} (train.stop_after_steps="
            f"{job.stop_after_steps}); run the same command to continue"
        )
        return results
    if not results:
        results, embeddings = job.evaluate(max(start, steps))
    job.summaries.flush()
    if job.replicas.is_chief:
        _write_outputs(
            job.workdir, job.model, embeddings, job.eval_source, results, job.export_model
        )
    say(_final_summary(job.workdir, results, time.time() - job.started, job.export_model))
    return results


def _run_elastic(job: _Job, stop: StopRequest, commit_every: int) -> dict:
    """`_run` under Horovod's elastic driver: each change of workers restarts it from the
    last commit (in memory), with the step and evaluation retraced for the new ranks."""
    from trainer import elastic  # imports Horovod

    variables = [*job.model.variables, *job.step_fn.optimizer.variables]
    state = elastic.TrainingState(job.replicas, variables, step=job.first_step)

    def commit(step: int) -> None:
        if step % commit_every == 0:
            state.step = step
            state.commit()  # also where a worker waiting to join is let in

    def attempt(state) -> dict:
        replicas = job.replicas
        job.step_fn.retrace()
        job.evaluate.retrace()
        job.summaries.enabled = replicas.is_chief
        # A worker count that does not divide the batch is not refused here, where losing
        # one worker of 8 would end the job: the first B mod N workers take a row more,
        # and the mining over the gathered batch is exact for any split.
        rows = replicas.replica_rows(job.global_batch_size)
        uneven = f" ({'/'.join(map(str, rows))} rows)" if len(set(rows)) > 1 else ""
        job.say(
            f"elastic: {replicas.size} worker(s){uneven}, training from step {state.step}",
            flush=True,
        )
        return _run(job, stop, state.step, after_step=commit)

    return elastic.run(attempt, state)


def _unreadable_in_step(job: _Job, step: int) -> None:
    """Images of step `step` passed the start-up check but cannot be read now (a file
    changed on a shared disk). Their rows were filled with another example of the same
    class on every replica; 'stop' ends the job before this step is checkpointed."""
    names = unreadable(job.train_source, job.sampler.global_batch(step - 1))
    named = listed(names) or "(readable again when checked)"
    if job.on_corrupt == "stop":
        raise InputError(
            f"{len(names)} image(s) of {job.train_source.name} cannot be read at step {step}, "
            f"although they passed the start-up check: {named}. Nothing of this step was "
            f"saved; last checkpoint: {job.checkpoints.latest or 'none'}. Fix them and run "
            "the same command, or set verify_images.on_corrupt='skip'."
        )
    job.unreadable_images += len(names)
    job.summaries.scalars(step, {"data/unreadable_images": job.unreadable_images})
    job.say(f"step {step}: unreadable image(s) {named} replaced by others of their class")


def _check_finite(job: _Job, metrics: dict, step: int) -> int:
    """1 if the step was skipped for non-finite values, 0 if fine; raises to stop the run.

    A loss-scale optimizer (mixed_float16, or train.nonfinite='skip') has already left
    such a step out on every replica; otherwise the weights are now bad, so the run
    stops before they can be checkpointed.
    """
    finite_loss = np.isfinite(metrics["loss"])
    if finite_loss and metrics["finite_gradients"]:
        return 0
    skipping = job.step_fn.skips_nonfinite and (finite_loss or job.skip_nonfinite)
    if skipping:
        return 1
    what = "loss" if not finite_loss else "gradient"
    raise NumericalError(
        f"non-finite {what} at step {step} (loss {metrics['loss']}); stopped before "
        f"saving. Last good checkpoint: {job.checkpoints.latest or 'none'}. "
        "train.nonfinite='skip' skips such steps instead (counted in train/skipped_steps)."
    )


def _log_step(job: _Job, step: int, metrics: dict, rate: float, skipped: int) -> None:
    scalars = {f"train/{k}": v for k, v in metrics.items() if k != "finite_gradients"}
    scalars["train/learning_rate"] = float(job.schedule(step - 1))  # the rate this step used
    scalars["train/examples_per_second"] = rate
    scalars["train/replicas"] = job.replicas.size
    if job.step_fn.skips_nonfinite:
        scalars["train/skipped_steps"] = skipped
    job.summaries.scalars(step, scalars)
    distances = job.step_fn.last_distances.items()
    job.summaries.histograms(step, {f"train/{k}_distances": v for k, v in distances})


def _print_progress(job: _Job, step: int, metrics: dict, rate: float, compiling: bool) -> None:
    left = (job.steps - step) * job.global_batch_size / max(rate, 1e-9)
    pace = (
        "(includes compiling)" if compiling else f"{rate:,.0f} examples/s  {_duration(left)} left"
    )
    job.say(
        f"step {step:>6}/{job.steps}  loss {metrics['loss']:.4f}  "
        f"active {metrics['active_triplet_fraction']:.3f}  "
        f"remote negatives {metrics['cross_replica_negative_fraction']:.2f}  {pace}",
        flush=True,
    )


class Evaluator:
    """Embeds the eval set on all replicas, computes retrieval metrics, logs them."""

    def __init__(
        self,
        model,
        replicas,
        source,
        distance,
        recall_k,
        chunk_size,
        summaries,
        say,
        on_corrupt,
        preprocessing,
    ):
        self.model, self.replicas, self.source, self.distance = model, replicas, source, distance
        self.retrace()
        self.ks = sorted({1, recall_k})
        self.chunk_size, self.summaries, self.say = chunk_size, summaries, say
        self.on_corrupt, self.preprocessing = on_corrupt, preprocessing

    def retrace(self) -> None:
        """A fresh compiled embedding step (see `TrainStep.retrace`)."""
        self.embed = embedding_function(self.model, self.replicas)

    def __call__(self, step: int):
        embeddings, unreadable_rows = embed_source(
            self.embed, self.replicas, self.source, self.chunk_size, self.preprocessing
        )
        if len(unreadable_rows):
            self._unreadable(step, [self.source.describe(i) for i in unreadable_rows])
        metrics = sharded_retrieval_metrics(
            embeddings, self.source.labels, self.ks, self.distance, self.replicas
        )
        self.summaries.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
        figures = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        self.say(f"eval at step {step}: {figures}", flush=True)
        return metrics, embeddings

    def _unreadable(self, step: int, names: list[str]) -> None:
        if self.on_corrupt == "stop":
            raise InputError(
                f"{len(names)} evaluation image(s) of {self.source.name} cannot be read at step "
                f"{step}, although they passed the start-up check: {listed(names)}. Fix them "
                "and run the same command, or set verify_images.on_corrupt='skip'."
            )
        self.say(
            f"eval at step {step}: unreadable image(s) {listed(names)} replaced by others of "
            "their class"
        )


def _write_outputs(workdir, model, embeddings, eval_source, results, export_model):
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    export.projector(workdir, embeddings, eval_source)
    if export_model:
        export.saved_model(model, os.path.join(workdir, "saved_model"))


def _final_summary(workdir, results, seconds, export_model) -> str:
    figures = "  ".join(f"{k} {v:.4f}" for k, v in results.items())
    lines = [
        f"done in {_duration(seconds)}: {figures}",
        f"  workdir      {workdir}",
        f"  tensorboard  tensorboard --logdir {workdir}",
        f"  checkpoints  {os.path.join(workdir, 'checkpoints')}",
        f"  results      {os.path.join(workdir, 'results.json')}",
        f"  projector    {os.path.join(workdir, 'projector')} (TensorBoard's Projector tab)",
    ]
    if export_model:
        lines.append(f"  saved model  {os.path.join(workdir, 'saved_model')}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
