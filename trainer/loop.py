"""The training job: `train` checks the train.* settings, assembles the job from its
parts (data → model, optimizer and loss → outputs) and runs the step loop.

The job's own settings are `train.*` gin bindings; each part's are its configurable's
(`optimizer.*`, `checkpoints.*`, ...; see gin/base.gin). The loop runs on the
replica abstraction and never branches on the backend, only on whether workers may come
and go (elastic Horovod); the chief alone prints progress, writes TensorBoard and
checkpoints and exports.
"""

from __future__ import annotations

import dataclasses
import time

import gin
import numpy as np
import tensorflow as tf

from data.errors import InputError
from data.pipeline import listed, train_batches, unreadable
from losses import LOSS_CLASSES, PROXY_LOSS_CLASSES, TripletSemiHardLoss
from trainer.backends import heartbeat
from trainer.backends.preemption import StopRequest
from trainer.evaluation import evaluation
from trainer.job_data import JobData, load_data
from trainer.model import batchnorm_settings, digits_convnet
from trainer.outputs.checkpoints import checkpoint_settings
from trainer.outputs.export import export_settings
from trainer.outputs.job_outputs import (
    Outputs,
    duration,
    final_summary,
    open_outputs,
    write_results,
)
from trainer.settings import check, check_types
from trainer.step.batchnorm import COLLAPSED, BatchNormStatistics
from trainer.step.learner import Learner, build_learner, optimizer_settings, precision_policy
from trainer.step.train_step import metrics_of

MEMORY_TAG = "memory_negative_fraction"  # written only with train.cross_batch_memory
MINED_LOSSES = tuple(
    c.__name__ for c in LOSS_CLASSES if hasattr(c, "terms") or c in PROXY_LOSS_CLASSES
)


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
    cross_batch_memory: int = 0,
    examples_per_class: int = 16,
    train_data=None,
    eval_data=None,
    model=digits_convnet,
    progress_seconds: float = 10.0,
    stop_after_steps: int | None = None,
    nonfinite: str = "stop",
    elastic_commit_every: int = 10,
    jit_compile_model: bool = False,
    precise_batchnorm_batches: int = 50,
    embedding_chunk_size: int | None = None,
    mining_memory_mb: int = 256,
    assembled=None,
) -> dict:
    """Trains, evaluates and exports; returns the last evaluation's metrics (chief and others).

    Defaults are the embedded digits job: train on classes 0-5, evaluate on 6-9.
    `stop_after_steps` ends this run (with a checkpoint) after that many steps, for
    queues with a time limit; the same command then continues the job. `nonfinite`:
    'stop' ends the run at a non-finite loss or gradient (naming the step and the last
    good checkpoint), 'skip' leaves such steps out and counts them. An elastic Horovod
    job keeps its state in memory every `elastic_commit_every` steps (see
    trainer/backends/elastic.py); after a worker dies it goes on from there. `assembled()` is
    called once every configurable of the job has been built, before anything is written
    (the entry point refuses --gin_param bindings that nothing read). A model with
    training BatchNorm layers has their population statistics recomputed over
    `precise_batchnorm_batches` training batches before each evaluation (0: off; see
    trainer/step/batchnorm.py). The parts' own settings are their configurables: `optimizer`
    (trainer/step/learner.py), `precision`, `batchnorm` (trainer/model.py), `checkpoints`,
    `export` and `evaluation` (trainer/evaluation.py); this reads them once, here.
    `embedding_chunk_size` rows of a replica's slice are embedded at a time, twice, with
    the loss's cached gradient (GradCache, trainer/step/grad_cache.py): the global batch is
    then bounded by the mining's memory, not by the model's activations. That memory
    is bounded too: each replica mines its anchors in tiles whose (anchors × keys)
    arrays fit `mining_memory_mb` (losses/tiles.py).
    """
    settings = dict(locals())
    check_types("train", train, settings)
    _check_settings(settings, replicas)
    optimizing, precision, synchronized_batchnorm = (
        optimizer_settings(),
        precision_policy(),
        batchnorm_settings(),
    )
    checkpointing, export_model = checkpoint_settings(), export_settings()
    started = time.time()
    loss = loss if loss is not None else TripletSemiHardLoss(margin=0.2, distance="cosine")
    _check_minable(loss, cross_replica_mining, cross_batch_memory)
    evaluating = evaluation()

    def say(*args, **kwargs):  # the chief's voice (in an elastic job the chief can change)
        if replicas.is_chief:
            print(*args, **kwargs)

    data = load_data(
        workdir,
        replicas,
        train_data,
        eval_data,
        global_batch_size,
        examples_per_class,
        seed,
        say,
        gallery=evaluating.gallery,
        pairs_file=evaluating.pairs,
    )
    learner = build_learner(
        replicas,
        model=model,
        loss=loss,
        optimizer=optimizing,
        global_batch_size=global_batch_size,
        steps=steps,
        seed=seed,
        say=say,
        cross_replica_mining=cross_replica_mining,
        precision=precision,
        synchronized_batchnorm=synchronized_batchnorm,
        nonfinite=nonfinite,
        cross_batch_memory=cross_batch_memory,
        jit_compile_model=jit_compile_model,
        num_classes=int(np.max(data.train_source.labels)) + 1 if len(data.train_source) else None,
        embedding_chunk_size=embedding_chunk_size,
        mining_memory_mb=mining_memory_mb,
    )
    if assembled is not None:
        assembled()  # every configurable has been built: nothing more will read a binding
    outputs = open_outputs(
        workdir,
        replicas,
        data,
        learner,
        loss.distance,
        evaluating,
        say,
        checkpointing=checkpointing,
        export_model=export_model,
        seed=seed,
    )
    say(
        f"replicas: {replicas.size} ({replicas.name}), global batch {global_batch_size} = "
        f"{data.sampler.classes_per_batch} classes × {examples_per_class}, "
        f"{'global' if cross_replica_mining else 'per-replica'} mining"
        f"{f' with a memory of {cross_batch_memory:,}' if cross_batch_memory else ''}, "
        f"{learner.model.count_params():,} parameters"
    )
    if outputs.first_step:
        say(f"resumed from {outputs.checkpoints.latest} at step {outputs.first_step}")
    if outputs.first_step >= steps:
        say(f"already trained to step {outputs.first_step} >= train.steps={steps}")
    cadence = Cadence(
        steps,
        global_batch_size,
        log_every,
        checkpoint_every,
        eval_every,
        progress_seconds,
        stop_after_steps,
        skip_nonfinite=nonfinite == "skip",
        precise_batchnorm_batches=precise_batchnorm_batches,
    )
    statistics = BatchNormStatistics(learner.model, replicas)
    job = _Job(replicas, say, started, cadence, data, learner, outputs, statistics)
    with StopRequest() as stop:
        if replicas.elastic:
            return _run_elastic(job, stop, elastic_commit_every)
        return _run(job, stop, outputs.first_step)


@dataclasses.dataclass(frozen=True)
class Cadence:
    """How long the job trains, and how often it logs, checkpoints and evaluates."""

    steps: int
    global_batch_size: int
    log_every: int
    checkpoint_every: int
    eval_every: int
    progress_seconds: float
    stop_after_steps: int | None
    skip_nonfinite: bool
    precise_batchnorm_batches: int = 0


@dataclasses.dataclass
class _Job:
    """The assembled job, as the step loop sees it."""

    replicas: object
    say: object
    started: float
    cadence: Cadence
    data: JobData
    learner: Learner
    outputs: Outputs
    batchnorm: BatchNormStatistics  # precise BatchNorm and the collapse check
    unreadable_images: int = 0  # images unreadable at run time, replaced (on_corrupt='skip')


_AT_LEAST_ONE = (
    "steps",
    "global_batch_size",
    "examples_per_class",
    "log_every",
    "checkpoint_every",
    "eval_every",
    "elastic_commit_every",
    "stop_after_steps",
    "embedding_chunk_size",
    "mining_memory_mb",
)


def _check_settings(s: dict, replicas) -> None:
    """Every train.* value that makes no sense is refused by name, before anything runs."""
    for name in _AT_LEAST_ONE:
        if s[name] is not None:
            check(s[name] >= 1, f"train.{name} must be >= 1, got {s[name]}.")
    check(
        s["progress_seconds"] >= 0,
        f"train.progress_seconds must be >= 0, got {s['progress_seconds']}.",
    )
    if not replicas.elastic:  # an elastic job takes the worker counts it gets (see below)
        _check_divides(s["global_batch_size"], replicas.size)
    check(
        s["global_batch_size"] % s["examples_per_class"] == 0,
        f"train.global_batch_size={s['global_batch_size']} is not a multiple of "
        f"train.examples_per_class={s['examples_per_class']} (the P×K batch needs P = B / K).",
    )
    check(
        s["nonfinite"] in ("stop", "skip"),
        f"Unknown train.nonfinite {s['nonfinite']!r}; valid: 'stop', 'skip'.",
    )
    check(
        s["precise_batchnorm_batches"] >= 0,
        f"train.precise_batchnorm_batches must be >= 0 (0: off), got "
        f"{s['precise_batchnorm_batches']}.",
    )
    memory = s["cross_batch_memory"]
    check(memory >= 0, f"train.cross_batch_memory must be >= 0 (0: off), got {memory}.")
    check(
        not (memory and not s["cross_replica_mining"]),
        "train.cross_batch_memory holds past global batches, so it needs "
        "train.cross_replica_mining=True.",
    )


def _check_minable(loss, cross_replica_mining: bool, cross_batch_memory: int) -> None:
    if isinstance(loss, PROXY_LOSS_CLASSES):
        name = type(loss).__name__
        check(
            cross_replica_mining,
            f"train.cross_replica_mining=False: {name} always takes the global batch "
            "against every replica's block of centres.",
        )
        check(not cross_batch_memory, f"train.cross_batch_memory is for mined losses, not {name}.")
        return
    check(
        not hasattr(loss, "memory_size"),
        "train.loss = CrossBatchMemory keeps one device's memory; the job's memory of "
        "past global batches is train.cross_batch_memory = M, with the wrapped loss as "
        "train.loss.",
    )
    check(
        callable(getattr(loss, "terms", None)),
        f"train.loss = {type(loss).__name__} cannot be mined over a batch (it takes explicit "
        "triplets); the trainer takes a loss with a query/key form: "
        + ", ".join(MINED_LOSSES)
        + ".",
    )


def _check_divides(global_batch_size: int, num_replicas: int) -> None:
    check(
        global_batch_size % num_replicas == 0,
        f"train.global_batch_size={global_batch_size} is not divisible by the "
        f"{num_replicas} replicas; each replica must hold the same number of rows.",
    )


class NumericalError(RuntimeError):
    """A non-finite loss or gradient stopped the run (no NaN weights were checkpointed)."""


def _run(job: _Job, stop: StopRequest, start: int, after_step=None) -> dict:
    """The step loop from step `start`: train, log, checkpoint, evaluate; then export.

    `after_step(step)`, if given, runs at the end of every step (elastic commits).
    """
    c, data, learner, out, say = job.cadence, job.data, job.learner, job.outputs, job.say
    steps = c.steps
    last_step = steps if not c.stop_after_steps else min(steps, out.first_step + c.stop_after_steps)
    rows = job.replicas.process_rows(c.global_batch_size)
    batches = train_batches(
        data.train_source, data.sampler, rows, start, last_step, data.train_preprocessing
    )

    def staged(step: int):
        """Batch `step` from the pipeline, put on the devices, and its `ok` rows."""
        images, labels, ok = next(batches, (None, None, None))
        if images is None:
            raise RuntimeError(f"the input pipeline ended before step {step} of {last_step}")
        return learner.step_fn.stage(images, labels, c.global_batch_size), ok

    last_print = window_start = time.time()
    window_steps, results, skipped = 0, {}, 0
    pending = []  # (step, metrics on the device) not read yet
    unreadable_steps = []  # steps with a row of this process substituted, not yet agreed
    agreed = start  # the last step whose stop and unreadable rows the processes agreed on
    upcoming = staged(start + 1) if start < last_step else None
    for step in range(start + 1, last_step + 1):
        heartbeat.at_step(step)  # who fell behind, should a collective time out
        inputs, ok = upcoming
        pending.append((step, learner.step_fn.dispatch_staged(inputs)))
        if step < last_step:
            upcoming = staged(step + 1)  # copied to the devices while this step runs
        if not np.all(ok):
            unreadable_steps.append(step)
        window_steps += 1
        logged = step % c.log_every == 0 or step == steps
        saved = step % c.checkpoint_every == 0 or step == last_step
        evaluated = step % c.eval_every == 0 or step == steps
        now = time.time()
        printed = now - last_print >= c.progress_seconds or step in (start + 1, last_step)
        stop_requested = False
        if logged or saved or evaluated:
            # The same steps on every process: the one collective outside the steps (a
            # stop request, or images unreadable at run time, anywhere), and the steps'
            # metrics read from the device at once.
            # A checkpoint whose centres were being written counts here once all are.
            bad_rows = np.isin(np.arange(agreed + 1, step + 1), unreadable_steps)
            saving = out.checkpoints.progress()
            stop_requested, *agreement = job.replicas.sum_over_processes(
                [stop.requested, *saving, *bad_rows]
            )
            out.checkpoints.settle(np.asarray(agreement[: len(saving)]))
            unreadable_by_step = agreement[len(saving) :]
            for bad_step in np.flatnonzero(unreadable_by_step) + agreed + 1:
                _unreadable_in_step(job, int(bad_step))
            unreadable_steps, agreed = [], step
        if logged or saved or evaluated or printed:
            read = np.asarray(tf.stack([vector for _, vector in pending]))
            for (done, _), vector in zip(pending, read, strict=True):
                skipped += _check_finite(job, metrics_of(vector), done)
            metrics, pending = metrics_of(read[-1]), []
            rate = window_steps * c.global_batch_size / max(now - window_start, 1e-9)
            if logged:
                _log_step(job, step, metrics, rate, skipped)
            if printed:
                _print_progress(job, step, metrics, rate, compiling=step == start + 1)
                last_print, window_start, window_steps = now, now, 0
        if stop_requested and step < last_step:
            out.checkpoints.save(step)  # and straight out: the scheduler's grace is short
            say(
                f"stopped by {stop.signal_name or 'a stop request on another worker'} at "
                f"step {step} of {steps}; checkpoint {out.checkpoints.latest}; run the same "
                "command to continue",
                flush=True,
            )
            out.summaries.flush()
            return results
        train_cosine = _refresh_batchnorm(job, step) if evaluated else None
        if saved:  # with the re-estimated statistics; the last one complete at once
            out.checkpoints.save(step, wait=step == last_step)
        if evaluated:
            results, embeddings = _evaluate(job, step, train_cosine)
        if after_step is not None:
            after_step(step)
    if next(batches, None) is not None:  # also where the pipeline checks its own count
        raise RuntimeError(f"the input pipeline gave more batches than the steps to {last_step}")
    if last_step < steps:
        heartbeat.idle()
        say(
            f"stopped at step {last_step} of {steps} (train.stop_after_steps="
            f"{c.stop_after_steps}); run the same command to continue"
        )
        return results
    if not results:
        final = max(start, steps)
        results, embeddings = _evaluate(job, final, _refresh_batchnorm(job, final))
    out.summaries.flush()
    centres = None
    if learner.centres is not None and out.export_model:
        centres = learner.centres.gathered()["centres"]  # from every process
    heartbeat.idle()  # the last collective is over (the export is the chief's alone)
    if job.replicas.is_chief:
        write_results(out, learner.model, embeddings, data, results, centres)
    say(final_summary(out, results, time.time() - job.started))
    return results


def _run_elastic(job: _Job, stop: StopRequest, commit_every: int) -> dict:
    """`_run` under Horovod's elastic driver: each change of workers restarts it from the
    last commit (in memory), with the step and evaluation retraced for the new ranks."""
    from trainer.backends import elastic  # imports Horovod

    variables = job.learner.state
    state = elastic.TrainingState(
        job.replicas, variables, step=job.outputs.first_step, centres=job.learner.centres
    )

    def commit(step: int) -> None:
        if step % commit_every == 0:
            # The steps up to a commit are never trained again: their TensorBoard events
            # must not sit in the chief's buffer, lost if the chief dies now.
            job.outputs.summaries.flush()
            state.step = step
            state.commit()  # also where a worker waiting to join is let in

    def attempt(state) -> dict:
        replicas = job.replicas
        job.learner.step_fn.retrace()
        job.outputs.evaluate.retrace()
        job.batchnorm.retrace()
        job.outputs.summaries.enabled = replicas.is_chief
        # A worker count that does not divide the batch is not refused here, where losing
        # one worker of 8 would end the job: the first B mod N workers take a row more,
        # and the mining over the gathered batch is exact for any split.
        rows = replicas.replica_rows(job.cadence.global_batch_size)
        uneven = f" ({'/'.join(map(str, rows))} rows)" if len(set(rows)) > 1 else ""
        job.say(
            f"elastic: {replicas.size} worker(s){uneven}, training from step {state.step}",
            flush=True,
        )
        return _run(job, stop, state.step, after_step=commit)

    return elastic.run(attempt, state, job.outputs.workdir)


def _refresh_batchnorm(job: _Job, step: int) -> float | None:
    """Before evaluating at `step`: the training BatchNorm layers' population statistics
    recomputed over the global batches of the last `train.precise_batchnorm_batches`
    steps (0: only measured, over one batch). Returns the training-mode embeddings'
    mean pairwise cosine; None for a model without training BatchNorm."""
    if not job.batchnorm.layers:
        return None
    count = job.cadence.precise_batchnorm_batches
    first = max(step - max(count, 1), 0)
    rows = job.replicas.process_rows(job.cadence.global_batch_size)
    data = job.data
    batches = train_batches(
        data.train_source,
        data.sampler,
        rows,
        first,
        first + max(count, 1),
        data.train_preprocessing,
    )
    done = job.batchnorm(batches, job.cadence.global_batch_size, assign=count > 0)
    if count:
        job.say(
            f"precise BatchNorm: {done['layers']} layer(s) re-estimated over "
            f"{done['batches']} training batches",
            flush=True,
        )
    job.outputs.summaries.scalars(step, {"train/mean_cosine": done["train_mean_cosine"]})
    return done["train_mean_cosine"]


def _evaluate(job: _Job, step: int, train_cosine: float | None):
    """Evaluates at `step` and warns when the evaluation embeddings collapsed while the
    training ones did not (BatchNorm statistics that no training batch had)."""
    results, embeddings = job.outputs.evaluate(step)
    eval_cosine = job.outputs.evaluate.last_mean_cosine
    if train_cosine is not None and eval_cosine > COLLAPSED and train_cosine <= COLLAPSED:
        precise = job.cadence.precise_batchnorm_batches
        job.say(
            f"warning: the evaluation embeddings collapsed (mean pairwise cosine "
            f"{eval_cosine:.3f}) while the training ones did not ({train_cosine:.3f}): "
            "inference runs on BatchNorm statistics that no training batch had. "
            + (
                "Set train.precise_batchnorm_batches > 0 (now 0)"
                if not precise
                else f"Raise train.precise_batchnorm_batches (now {precise})"
            )
            + ", or with pretrained weights use backbone_embedding.batchnorm='frozen'.",
            flush=True,
        )
    return results, embeddings


def _unreadable_in_step(job: _Job, step: int) -> None:
    """Images of step `step` passed the start-up check but cannot be read now (a file
    changed on a shared disk). Their rows were filled with another example of the same
    class on every replica; 'stop' ends the job before this step is checkpointed."""
    source = job.data.train_source
    names = unreadable(source, job.data.sampler.global_batch(step - 1))
    named = listed(names) or "(readable again when checked)"
    if job.data.on_corrupt == "stop":
        raise InputError(
            f"{len(names)} image(s) of {source.name} cannot be read at step {step}, "
            f"although they passed the start-up check: {named}. Nothing of this step was "
            f"saved; last checkpoint: {job.outputs.checkpoints.latest or 'none'}. Fix them "
            "and run the same command, or set verify_images.on_corrupt='skip'."
        )
    job.unreadable_images += len(names)
    job.outputs.summaries.scalars(step, {"data/unreadable_images": job.unreadable_images})
    job.say(f"step {step}: unreadable image(s) {named} replaced by others of their class")


def _check_finite(job: _Job, metrics: dict, step: int) -> int:
    """1 if the step was skipped for non-finite values, 0 if fine; raises to stop the run.

    The step's update was gated by the global finite verdict, so no weight took a NaN.
    With train.nonfinite='skip' it is counted; a loss-scale optimizer's (mixed_float16)
    overflow of the gradients alone is counted too, as it lowers its scale; anything else
    stops the run before saving.
    """
    finite_loss = np.isfinite(metrics["loss"])
    if finite_loss and metrics["finite_gradients"]:
        return 0
    skipping = job.learner.step_fn.skips_nonfinite and (finite_loss or job.cadence.skip_nonfinite)
    if skipping:
        return 1
    what = "loss" if not finite_loss else "gradient"
    raise NumericalError(
        f"non-finite {what} at step {step} (loss {metrics['loss']}); stopped before "
        f"saving. Last good checkpoint: {job.outputs.checkpoints.latest or 'none'}. "
        "train.nonfinite='skip' skips such steps instead (counted in train/skipped_steps)."
    )


def _log_step(job: _Job, step: int, metrics: dict, rate: float, skipped: int) -> None:
    step_fn = job.learner.step_fn
    unwritten = ("finite_gradients",) if job.learner.memory else ("finite_gradients", MEMORY_TAG)
    scalars = {f"train/{k}": v for k, v in metrics.items() if k not in unwritten}
    scalars["train/learning_rate"] = float(job.learner.schedule(step - 1))  # this step's rate
    scalars["train/examples_per_second"] = rate
    scalars["train/replicas"] = job.replicas.size
    if step_fn.skips_nonfinite:
        scalars["train/skipped_steps"] = skipped
    job.outputs.summaries.scalars(step, scalars)
    distances = step_fn.last_distances.items()
    job.outputs.summaries.histograms(step, {f"train/{k}_distances": v for k, v in distances})


def _print_progress(job: _Job, step: int, metrics: dict, rate: float, compiling: bool) -> None:
    c = job.cadence
    left = (c.steps - step) * c.global_batch_size / max(rate, 1e-9)
    pace = "(includes compiling)" if compiling else f"{rate:,.0f} examples/s  {duration(left)} left"
    job.say(
        f"step {step:>6}/{c.steps}  loss {metrics['loss']:.4f}  "
        f"active {metrics['active_triplet_fraction']:.3f}  "
        f"remote negatives {metrics['cross_replica_negative_fraction']:.2f}  "
        + (f"memory negatives {metrics[MEMORY_TAG]:.2f}  " if job.learner.memory else "")
        + pace,
        flush=True,
    )
