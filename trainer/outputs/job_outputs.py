"""What a job writes to its workdir: checkpoints, TensorBoard, the operative config,
evaluations, and at the end results.json, the projector files and the SavedModel.

Only the chief writes; every process evaluates (the metrics are a collective).
"""

from __future__ import annotations

import dataclasses
import json
import os

import gin
import numpy as np
import tensorflow as tf

from data.pipeline import encoded_images, eval_batches
from trainer.evaluation import Evaluator, format_figures
from trainer.outputs import export
from trainer.outputs.checkpoints import Checkpoints, CheckpointSettings
from trainer.outputs.summaries import Summaries


@dataclasses.dataclass
class Outputs:
    workdir: str
    checkpoints: Checkpoints
    summaries: Summaries
    evaluate: Evaluator
    first_step: int  # the step restored from the last checkpoint (0 for a new job)
    export_model: bool


def open_outputs(
    workdir: str,
    replicas,
    data,
    learner,
    distance: str,
    evaluating,
    say,
    *,
    checkpointing: CheckpointSettings,
    export_model: bool,
    seed: int = 0,
) -> Outputs:
    """Creates the workdir, restores the last checkpoint and records the operative config.
    Called only once the whole configuration has checked out, so a mistake writes nothing."""
    if replicas.is_chief:
        os.makedirs(workdir, exist_ok=True)
    checkpoints = Checkpoints(
        os.path.join(workdir, "checkpoints"),
        replicas,
        checkpointing.keep,
        centres=learner.centres,
        asynchronous=checkpointing.asynchronous and not replicas.elastic,
        model=learner.model,
        optimizer=learner.optimizer,
        **({"memory": learner.memory} if learner.memory is not None else {}),
    )
    first_step = checkpoints.restore(learner.state, broadcast=not replicas.elastic)
    summaries = Summaries(workdir, enabled=replicas.is_chief)
    if data.corrupt:
        summaries.scalars(first_step, {"data/skipped_corrupt_images": data.corrupt})
    if replicas.is_chief:
        operative = gin.operative_config_str()
        with open(os.path.join(workdir, "operative_config.gin"), "w") as f:
            f.write(operative)
        summaries.text("config/operative_config", "```\n" + operative + "\n```", first_step)
    evaluate = Evaluator(learner.model, replicas, data, distance, evaluating, summaries, say, seed)
    return Outputs(workdir, checkpoints, summaries, evaluate, first_step, export_model)


class ExportMismatch(RuntimeError):
    """The exported SavedModel does not give the embeddings that were evaluated."""


def write_results(outputs: Outputs, model, embeddings, data, results: dict, centres=None) -> None:
    """The chief's last outputs: results.json, the projector files, the SavedModel,
    checked to give the evaluated embeddings of the first evaluation batch, and a proxy
    loss's whole `centres` (C·k, D) beside it, for classification."""
    with open(os.path.join(outputs.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    export.projector(outputs.workdir, embeddings, data.eval_source)
    if outputs.export_model:
        path = export.saved_model(
            model,
            os.path.join(outputs.workdir, "saved_model"),
            data.eval_preprocessing,
            distance=outputs.evaluate.distance,
        )
        check_export(path, embeddings, data)
        if centres is not None:
            np.save(os.path.join(outputs.workdir, "class_centres.npy"), centres)


# The serving signatures are traced as one graph with their pre-processing, and
# TensorFlow's constant folding then computes the first layers with other rounding than
# `serve` fed the same pixels: ~1e-7 apart on trained models, 4.2e-5 on a collapsed one
# (test_training_job's collapsed embeddings, whose tiny vectors the L2 norm magnifies).
# A skew in pre-processing (crop, resize, scaling, channels) is orders of magnitude more.
SERVING_TOLERANCE = 1e-4


def check_export(path: str, embeddings, data, rows: int = 64, tolerance: float = 1e-5) -> float:
    """Embeds the first `rows` evaluation images through each signature of the SavedModel
    at `path` and compares them with the evaluation's `embeddings` of them; raises
    ExportMismatch beyond `tolerance`. Returns the largest difference.

    `serve` takes the evaluation's own pre-processed images; `serving_default` their
    files' bytes and `embed` them decoded (image sources). A pixel source has no files:
    its pixels are encoded as PNG here, and those two are compared with `serve` of the
    same quantized pixels."""
    rows = min(rows, len(embeddings))
    source = data.eval_source
    images, _, _ = next(iter(eval_batches(source, [(0, rows)], data.eval_preprocessing)))
    loaded = tf.saved_model.load(path)  # held: its variables live as long as it does
    wanted = {"serve": (loaded.serve(tf.cast(images, tf.float32)).numpy(), embeddings[:rows])}
    serving = loaded.signatures["serving_default"]
    if source.kind == "pixels":
        quantized = tf.cast(tf.round(tf.clip_by_value(images, 0.0, 1.0) * 255.0), tf.uint8)
        encoded = [tf.io.encode_png(image).numpy() for image in quantized]
        reference = loaded.serve(tf.cast(quantized, tf.float32) / 255.0).numpy()
        wanted["embed"] = (_embedded(loaded, list(quantized)), reference)
    else:
        encoded = encoded_images(source, range(rows))
        reference = embeddings[:rows]
        decoded = [tf.io.decode_image(e, channels=3, expand_animations=False) for e in encoded]
        wanted["embed"] = (_embedded(loaded, decoded), reference)
    served = serving(images=tf.constant(encoded))["embeddings"].numpy()
    wanted["serving_default"] = (served, reference)
    worst = 0.0
    for name, (got, want) in wanted.items():
        difference = float(np.max(np.abs(got - want)))
        allowed = tolerance if name == "serve" else max(tolerance, SERVING_TOLERANCE)
        if not difference <= allowed:
            raise ExportMismatch(
                f"the exported model {path} embeds the first {rows} evaluation images "
                f"{difference:.2e} away from the evaluated embeddings through its {name!r} "
                f"signature (tolerance {allowed:g}): what was exported is not what was "
                "evaluated."
            )
        worst = max(worst, difference)
    return worst


def _embedded(loaded, images: list) -> np.ndarray:
    """`embed` of decoded images of any sizes: one call per image (a call takes one size)."""
    return np.concatenate([loaded.embed(image[None])["embeddings"].numpy() for image in images])


def final_summary(outputs: Outputs, results: dict, seconds: float) -> str:
    workdir = outputs.workdir
    figures = format_figures(results)
    lines = [
        f"done in {duration(seconds)}: {figures}",
        f"  workdir      {workdir}",
        f"  tensorboard  tensorboard --logdir {workdir}",
        f"  checkpoints  {os.path.join(workdir, 'checkpoints')}",
        f"  results      {os.path.join(workdir, 'results.json')}",
        f"  projector    {os.path.join(workdir, 'projector')} (TensorBoard's Projector tab)",
    ]
    if outputs.export_model:
        lines.append(f"  saved model  {os.path.join(workdir, 'saved_model')}")
        centres = os.path.join(workdir, "class_centres.npy")
        if os.path.exists(centres):
            lines.append(f"  centres      {centres} (the proxy loss's, one row per class)")
    return "\n".join(lines)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
