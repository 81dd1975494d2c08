"""`python -m trainer.doctor`: the first command to run on a new machine or cluster.

    python -m trainer.doctor                                   # one process
    launch/mirrored.sh doctor                                  # MirroredStrategy, all GPUs
    launch/horovod.sh 8 doctor                                 # 8 Horovod workers
    horovodrun -np 8 python -m trainer.doctor                  # the same, by hand

It prints TensorFlow's build, the device each worker got, Horovod's build, and runs a
short exactness check: `--steps` steps of a small convnet on synthetic images, the loss
and the gradients of this worker set against one device holding the same global batch
(tolerance `--tolerance`), and the step rate. Exit 0 when all is well; 1 with the
reasons when anything is wrong (GPUs the TensorFlow build cannot see, two workers on one
GPU, a distributed step that differs from one device); 2 for a bad setting.
"""

from __future__ import annotations

import os
import socket
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gin  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import losses  # noqa: E402
from data.errors import InputError  # noqa: E402
from trainer.backends.placement import cpu_only_warning, nvidia_smi_gpus  # noqa: E402
from trainer.backends.replicas import make_replicas  # noqa: E402
from trainer.step.global_loss import loss_and_gradients  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_param", [], "distribute.* bindings, e.g. distribute.cpu_replicas=2.")
flags.DEFINE_integer("steps", 20, "Steps of the exactness check.", lower_bound=2)
flags.DEFINE_float("tolerance", 1e-5, "Largest loss or gradient difference allowed.")
flags.DEFINE_integer("rows_per_replica", 16, "Rows of the global batch on each replica.")
flags.DEFINE_enum(
    "mining",
    "global",
    ["global", "per_replica"],
    "global: the trainer's mining. per_replica: each replica mines its own slice, which "
    "differs from one device: shows what a failed check looks like.",
)

IMAGE_SIZE, EXAMPLES_PER_CLASS = 32, 4


def tensorflow_build() -> str:
    build = tf.sysconfig.get_build_info()
    if build.get("is_cuda_build"):
        kind = f"CUDA {build.get('cuda_version')}, cuDNN {build.get('cudnn_version')}"
    else:
        kind = "CPU build"
    return f"TensorFlow {tf.__version__} ({kind}), Keras {keras.__version__}"


def horovod_build() -> str:
    try:
        import horovod
        import horovod.tensorflow as hvd
    except ImportError as error:
        return f"not importable ({error})"
    parts = {
        "NCCL": hvd.nccl_built(),
        "Gloo": hvd.gloo_built(),
        "MPI": hvd.mpi_built(),
        "CUDA": hvd.cuda_built(),
    }
    built = [name for name, on in parts.items() if on]
    return f"{horovod.__version__} with {', '.join(built) or 'nothing'}"


def worker_devices(replicas) -> list[tuple]:
    """(rank, host, local rank, devices) of every worker, in rank order."""
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    mine = [d for d in replicas.local_devices() if d] or gpus or ["CPU"]
    if replicas.name == "horovod":
        hvd = replicas.hvd
        entry = (hvd.rank(), socket.gethostname(), hvd.local_rank(), mine, _physical_gpus())
        return hvd.allgather_object(entry)
    return [(replicas.rank, socket.gethostname(), 0, mine, _physical_gpus())]


def _physical_gpus() -> list[str]:
    """The physical GPUs this process uses, by their bus id where TensorFlow gives one."""
    names = []
    for gpu in tf.config.get_visible_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        names.append(details.get("pci_bus_id") or gpu.name)
    return names


def shared_gpus(workers: list[tuple]) -> list[str]:
    """Problems: two Horovod workers of one host on the same GPU."""
    seen, problems = {}, []
    for rank, host, _, _, physical in workers:
        for gpu in physical:
            other = seen.setdefault((host, gpu), rank)
            if other != rank:
                problems.append(f"workers {other} and {rank} on host {host} share GPU {gpu}")
    return problems


def _model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(32),
            keras.layers.UnitNormalization(),
        ]
    )


def _batch(step: int, size: int):
    rng = np.random.default_rng(step)
    labels = np.repeat(np.arange(size // EXAMPLES_PER_CLASS), EXAMPLES_PER_CLASS)
    # Each class a mean colour pattern plus noise, so mining has real positives.
    centres = rng.uniform(0, 255, (labels.max() + 1, 1, 1, 3))
    noise = rng.normal(0, 40, (size, IMAGE_SIZE, IMAGE_SIZE, 3))
    images = np.clip(centres[labels] + noise, 0, 255).astype(np.float32)
    return images, labels.astype(np.int64)


def exactness(replicas, steps: int, rows_per_replica: int, global_mining: bool):
    """Per step: the loss's and the largest gradient entry's absolute difference
    against one device; and the distributed steps' rate (steps/s, after the first)."""
    size = rows_per_replica * replicas.size
    loss = losses.TripletSemiHardLoss(margin=0.2, distance="cosine")
    keras.utils.set_random_seed(0)
    reference = _model()
    with replicas.scope():
        model = _model()
    model.set_weights(reference.get_weights())
    rows = replicas.replica_rows(size)

    @tf.function
    def distributed(local_x, local_labels):
        result = loss_and_gradients(
            loss,
            replicas,
            model,
            model.trainable_variables,
            local_x,
            local_labels,
            global_mining,
            replica_rows=rows,
        )
        return result.loss, replicas.sum_gradients(result.grads)

    @tf.function
    def single(x, labels):
        with tf.GradientTape() as tape:
            value = loss(labels, reference(x))
        return value, tape.gradient(value, reference.trainable_variables)

    differences, timed = [], 0.0
    for step in range(steps):
        images, labels = _batch(step, size)
        began = time.perf_counter()
        value, grads = replicas.run(distributed, replicas.split(images, labels))
        first = lambda v: replicas.local_results(v)[0]  # noqa: E731
        value, grads = float(first(value)), [first(g).numpy() for g in grads]
        if step:  # the first step compiles
            timed += time.perf_counter() - began
        expected, expected_grads = single(tf.constant(images), tf.constant(labels))
        expected_grads = [e.numpy() for e in expected_grads]
        gradient_gap = max(
            float(np.max(np.abs(g - e))) for g, e in zip(grads, expected_grads, strict=True)
        )
        differences.append((abs(value - float(expected)), gradient_gap))
        # Both models take the one-device SGD step, so every step checks the same weights.
        weights = reference.get_weights()
        updated = [w - 0.5 * g for w, g in zip(weights, expected_grads, strict=True)]
        reference.set_weights(updated)
        model.set_weights(updated)
    rate = (steps - 1) / timed
    return np.array(differences), rate, size


def run(argv) -> int:
    if len(argv) > 1:
        raise InputError(f"unexpected arguments {argv[1:]}")
    if FLAGS.rows_per_replica < EXAMPLES_PER_CLASS or FLAGS.rows_per_replica % EXAMPLES_PER_CLASS:
        raise InputError(
            f"--rows_per_replica must be a positive multiple of {EXAMPLES_PER_CLASS}, "
            f"got {FLAGS.rows_per_replica}"
        )
    import trainer.config  # noqa: F401  (registers distribute.*)

    logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines drown the report

    try:
        gin.parse_config(FLAGS.gin_param)
    except (ValueError, KeyError, SyntaxError, NameError) as error:
        raise InputError(f"bad --gin_param: {error}") from error
    driver_gpus = nvidia_smi_gpus()
    replicas = make_replicas()
    chief = replicas.is_chief
    say = print if chief else (lambda *a, **k: None)
    problems = []
    say(f"tensorflow:  {tensorflow_build()}")
    say(f"driver:      {len(driver_gpus)} GPU(s) listed by nvidia-smi")
    warning = cpu_only_warning(driver_gpus, tf.config.list_physical_devices("GPU"))
    if warning:
        problems.append(warning)
    say(f"backend:     {replicas.name}, {replicas.size} replica(s)")
    workers = worker_devices(replicas)
    for rank, host, local_rank, devices, _ in workers:
        say(f"worker {rank}:    host {host}, local rank {local_rank}, {', '.join(devices)}")
    problems += shared_gpus(workers)
    say(f"horovod:     {horovod_build()}")
    if replicas.name == "horovod" and tf.config.list_logical_devices("GPU"):
        if not replicas.hvd.nccl_built():
            say("             (no NCCL: all-reduce between GPUs goes through host memory)")
    steps = FLAGS.steps
    differences, rate, size = exactness(
        replicas, steps, FLAGS.rows_per_replica, FLAGS.mining == "global"
    )
    loss_gap, gradient_gap = differences.max(axis=0)
    verdict = "ok" if max(loss_gap, gradient_gap) <= FLAGS.tolerance else "FAILED"
    say(
        f"exactness:   {steps} steps, global batch {size}, against one device: largest loss "
        f"difference {loss_gap:.2e}, gradient difference {gradient_gap:.2e} "
        f"(tolerance {FLAGS.tolerance:g}): {verdict}"
    )
    if verdict != "ok":
        worst = int(np.argmax(differences.max(axis=1)))
        problems.append(
            f"the {replicas.size}-replica step differs from one device (worst at step "
            f"{worst + 1}: loss {differences[worst, 0]:.2e}, gradient {differences[worst, 1]:.2e})"
        )
    say(f"step rate:   {rate:.1f} steps/s, {rate * size:,.0f} images/s (small convnet, 32 px)")
    if problems:
        for problem in problems:
            say(f"problem:     {problem}", file=sys.stderr)
        say(f"doctor: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    say("doctor: all is well")
    return 0


def main(argv) -> None:
    try:
        sys.exit(run(argv))
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
