"""The model, its optimizer and learning-rate schedule, and the compiled training step.

Built inside the replicas' scope, so that variables are mirrored (MirroredStrategy) or
broadcast from the chief (Horovod) like any Keras model's.
"""

from __future__ import annotations

import dataclasses

import gin
import keras

from data.errors import InputError
from losses import PROXY_LOSS_CLASSES
from trainer.model import batchnorm_layers, sync_batchnorm
from trainer.settings import check, check_types
from trainer.step.class_centres import ShardedCentres
from trainer.step.key_memory import KeyMemory
from trainer.step.train_step import TrainStep

OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": keras.optimizers.SGD,
}
PRECISIONS = (None, "float32", "mixed_float16", "mixed_bfloat16")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer's settings (the gin configurable `optimizer`)."""

    name: str = "adam"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    scale_learning_rate: bool = False
    reference_batch_size: int = 256
    centre_learning_rate_multiplier: float = 1.0

    def base_rate(self, global_batch_size: int) -> float:
        """optimizer.learning_rate, or with optimizer.scale_learning_rate the linear
        scaling rule: the rate × global batch / optimizer.reference_batch_size. It depends
        on the global batch alone, never on the replica count (replica-count invariance)."""
        if not self.scale_learning_rate:
            return self.learning_rate
        return self.learning_rate * global_batch_size / self.reference_batch_size


@gin.configurable("optimizer")
def optimizer_settings(
    name: str = "adam",
    learning_rate: float = 1e-4,
    weight_decay: float = 0.0,
    scale_learning_rate: bool = False,
    reference_batch_size: int = 256,
    centre_learning_rate_multiplier: float = 1.0,
) -> OptimizerSettings:
    """The optimizer's settings, checked (gin/base.gin documents each)."""
    check_types("optimizer", optimizer_settings, dict(locals()))
    check(name in OPTIMIZERS, f"Unknown optimizer.name {name!r}; valid: {tuple(OPTIMIZERS)}.")
    check(learning_rate > 0, f"optimizer.learning_rate must be > 0, got {learning_rate}.")
    check(weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {weight_decay}.")
    check(
        reference_batch_size >= 1,
        f"optimizer.reference_batch_size must be >= 1, got {reference_batch_size}.",
    )
    check(
        centre_learning_rate_multiplier > 0,
        "optimizer.centre_learning_rate_multiplier must be > 0, got "
        f"{centre_learning_rate_multiplier}.",
    )
    return OptimizerSettings(**locals())


@gin.configurable("precision")
def precision_policy(policy: str | None = None) -> str | None:
    """The Keras mixed-precision policy of the model (None: float32)."""
    check(policy in PRECISIONS, f"Unknown precision.policy {policy!r}; valid: {PRECISIONS}.")
    return policy


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


@dataclasses.dataclass
class Learner:
    model: keras.Model  # the embedding model
    optimizer: keras.optimizers.Optimizer
    schedule: object  # step -> learning rate, for the logs
    step_fn: TrainStep  # one step on every replica, the loss mined over the global batch
    centres: ShardedCentres | None = None  # a proxy loss's class centres, one shard a replica

    @property
    def memory(self) -> KeyMemory | None:
        """Past global batches, mined as extra keys (train.cross_batch_memory)."""
        return self.step_fn.memory

    @property
    def state(self) -> list:
        """Every variable a checkpoint or an elastic commit keeps and a start broadcasts."""
        memory = self.memory.state if self.memory is not None else []
        return [*self.model.variables, *self.optimizer.variables, *memory]


class FlooredLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras' dynamic loss scaling (halved at a non-finite step, doubled after 2,000 good
    ones) with the scale never below 1. Bad data (NaN inputs) is not an overflow, yet
    halves the scale too: ~165 such steps would take it to 0 in float32, and every later
    step would be skipped."""

    def _stateful_handle_non_finite_grads(self):  # Keras' hook for a skipped step
        self.step_counter.assign(0)
        self.dynamic_scale.assign(keras.ops.maximum(self.dynamic_scale * 0.5, 1.0))


def build_learner(
    replicas,
    *,
    model,
    loss,
    optimizer: OptimizerSettings,
    global_batch_size: int,
    steps: int,
    seed: int,
    say,
    cross_replica_mining: bool = True,
    precision: str | None = None,
    synchronized_batchnorm: bool = False,
    nonfinite: str = "stop",
    cross_batch_memory: int = 0,
    jit_compile_model: bool = False,
    num_classes: int | None = None,
    embedding_chunk_size: int | None = None,
    mining_memory_mb: int = 256,
) -> Learner:
    """`model()` under `precision`, seeded, with `optimizer`'s optimizer on the
    warm-up/cosine schedule. `nonfinite='skip'` wraps the optimizer in a loss-scale
    optimizer of scale 1, whose skipping of non-finite steps is what 'skip' needs.
    `cross_batch_memory` > 0 keeps that many examples of past global batches as extra
    keys. `jit_compile_model` compiles the model's forward and backward passes with XLA
    (not the mining). A proxy loss gets its centres sharded over the replicas:
    `num_classes` (the training data's) unless the loss sets it, the width of the model's
    embeddings. `embedding_chunk_size`: see trainer/step/grad_cache.py (refused with
    synchronized BatchNorm, which a chunk cannot be exact with). `mining_memory_mb`: the
    budget of one replica's mining arrays."""
    keras.mixed_precision.set_global_policy(precision or "float32")
    keras.utils.set_random_seed(seed)
    with replicas.scope():
        embedding_model = model()
        synchronized = synchronized_batchnorm or getattr(
            embedding_model, "synchronized_batchnorm", False
        )
        if embedding_chunk_size is not None:
            _check_chunkable(embedding_model, synchronized, embedding_chunk_size, say)
        if synchronized:
            say(f"synchronized BatchNorm in {sync_batchnorm(embedding_model, replicas)} layers")
        schedule = learning_rate_schedule(optimizer.base_rate(global_batch_size), steps)
        decay = optimizer.weight_decay
        opt = OPTIMIZERS[optimizer.name](
            learning_rate=schedule, **({"weight_decay": decay} if decay else {})
        )
        if precision == "mixed_float16":
            # Skipping without float16 needs no scale: the step's global finite verdict
            # leaves a bad step out (train_step.replica_step).
            opt = FlooredLossScaleOptimizer(opt)
        memory = None
        if cross_batch_memory:
            width = _embedding_width(embedding_model, "train.cross_batch_memory")
            memory = KeyMemory(cross_batch_memory, width)
    centres = None
    if isinstance(loss, PROXY_LOSS_CLASSES):
        multiplier = optimizer.centre_learning_rate_multiplier

        def centre_schedule(step):
            return schedule(step) * multiplier

        centres = _sharded_centres(
            loss, replicas, embedding_model, num_classes, optimizer.name, centre_schedule,
            optimizer.weight_decay,
        )  # fmt: skip
        say(
            f"class centres: {loss.num_classes:,} classes × {loss.rows_per_class} × "
            f"{centres.embedding_dim}, {centres.local_bytes() / 2**20:,.1f} MiB with their "
            f"optimizer slots on this process ({replicas.size} shards"
            + (f", Partial FC sample rate {loss.sample_rate}" if loss.sample_rate < 1 else "")
            + (f", learning rate × {multiplier:g}" if multiplier != 1 else "")
            + ")"
        )
    step_fn = TrainStep(
        embedding_model, opt, loss, replicas, cross_replica_mining, memory, jit_compile_model,
        centres, skip_nonfinite=nonfinite == "skip", embedding_chunk_size=embedding_chunk_size,
        mining_budget_bytes=mining_memory_mb * 2**20,
    )  # fmt: skip
    return Learner(embedding_model, opt, schedule, step_fn, centres)


def _check_chunkable(model, synchronized: bool, chunk_size: int, say) -> None:
    """Synchronized BatchNorm takes its moments over the global batch, which no chunk
    holds, so chunking it cannot be exact: refused. 'batch' BatchNorm is said plainly."""
    layers = batchnorm_layers(model)
    synchronized_layers = [layer.name for layer in layers if getattr(layer, "synchronized", 0)]
    if layers and (synchronized or synchronized_layers):
        raise InputError(
            f"train.embedding_chunk_size={chunk_size} cannot be combined with synchronized "
            f"BatchNorm ({len(layers)} layers): a chunk sees only its own rows' moments, never "
            "the global batch's. Use batchnorm='frozen' (exact) or 'batch' (per-chunk "
            "statistics), or leave train.embedding_chunk_size unset."
        )
    if layers:
        say(
            f"train.embedding_chunk_size={chunk_size}: the {len(layers)} BatchNorm layers "
            f"take their statistics over each chunk of up to {chunk_size} rows (ghost "
            "batches), not the replica's slice; frozen BatchNorm would be exact"
        )


def _sharded_centres(loss, replicas, model, num_classes, optimizer, schedule, weight_decay):
    """The proxy loss's centres, sharded; its num_classes and width checked against the
    training data's classes and the model's embeddings."""
    name = type(loss).__name__
    if loss.num_classes is not None and num_classes and loss.num_classes < num_classes:
        raise InputError(
            f"{name}.num_classes={loss.num_classes} but the training data has labels up to "
            f"{num_classes - 1}; leave it unset to take the data's."
        )
    classes = loss.num_classes or num_classes
    if not classes:
        raise InputError(f"{name}.num_classes is not set and the training data has no labels")
    width = _embedding_width(model, f"train.loss = {name}")
    if loss.embedding_dim is not None and loss.embedding_dim != width:
        raise InputError(
            f"{name}.embedding_dim={loss.embedding_dim} but the model's embeddings are "
            f"{width} wide; leave it unset to take the model's."
        )
    loss.num_classes, loss.embedding_dim = classes, width
    return ShardedCentres(loss, replicas, classes, width, optimizer, schedule, weight_decay)


def _embedding_width(model, needed_by: str) -> int:
    width = model.output_shape[-1] if model.built else None
    if not isinstance(width, int):
        raise InputError(
            f"{needed_by} needs a model whose embedding width is known once "
            f"built; {model.name} gives output shape {getattr(model, 'output_shape', None)}."
        )
    return width
