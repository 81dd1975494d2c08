"""Entry point: `python -m trainer.main [--gin_file=F ...] [--gin_param=B ...] [--workdir=D]`.

With no --gin_file it runs gin/digits.gin, the embedded default job (digits), parsed like
any other config. A --gin_file is a path, or else a shipped config's name (gin/ in a
checkout; see trainer.job_config). A --gin_param that the
assembled job never reads is refused (exit 2). Under horovodrun every worker runs this
same command; `distribute.strategy='auto'` notices.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from trainer.backends import elastic_guard  # noqa: E402  (no TensorFlow)

if __name__ == "__main__" and elastic_guard.wanted():
    # An elastic worker runs under a guard that ends it if it stops answering; the
    # guard is this process, replaced before TensorFlow is loaded into it.
    elastic_guard.become_guard("trainer.main")

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import trainer.config  # noqa: E402, F401  (registers the configurables)
from data.errors import InputError  # noqa: E402
from trainer.backends import collective_timeout, heartbeat  # noqa: E402
from trainer.backends.placement import cpu_only_warning, nvidia_smi_gpus  # noqa: E402
from trainer.backends.replicas import make_replicas  # noqa: E402
from trainer.job_config import (  # noqa: E402
    DEFAULT_JOB,
    UsageError,
    check_params_used,
    parse_config,
)
from trainer.loop import NumericalError  # noqa: E402
from trainer.outputs import disk_space
from trainer.outputs.checkpoints import last_complete  # noqa: E402

FLAGS = flags.FLAGS
# This job's "workdir" and "replicas", once known: a failure's last line names its
# checkpoints, and after a collective timed out, the workers that did not answer.
JOB = {}
flags.DEFINE_multi_string(
    "gin_file", [], "Gin config file: a path, or a shipped config's name (sop, cub200, ...)."
)
flags.DEFINE_multi_string("gin_param", [], "Gin binding, e.g. train.steps=500.")
flags.DEFINE_string(
    "workdir", None, "Checkpoints, TensorBoard events and exports; default runs/<job>-<time>."
)


def gin_files() -> list[str]:
    """The --gin_file flags, or the default job's config."""
    return FLAGS.gin_file or [DEFAULT_JOB]


def default_workdir(files) -> str:
    job = os.path.splitext(os.path.basename(files[-1]))[0]
    run_id = os.environ.get("METRIC_TRAINER_RUN_ID") or time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{job}-{run_id}")


def agreed_default_workdir(replicas) -> str:
    """The default workdir, the same on every worker."""
    if not replicas.elastic:
        return replicas.agree(default_workdir(gin_files()))
    # A worker that joins an elastic job later cannot take part in a collective now.
    if not os.environ.get("METRIC_TRAINER_RUN_ID"):
        raise UsageError(
            "An elastic Horovod job needs --workdir (or METRIC_TRAINER_RUN_ID, which "
            "launch/horovod.sh sets) so that workers joining later find the same one."
        )
    return default_workdir(gin_files())


def run(argv) -> int:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}; use --gin_param for bindings.")
    parse_config(gin_files(), FLAGS.gin_param)
    from trainer.loop import train

    replicas = make_replicas()
    if replicas.is_chief:  # one nvidia-smi call for the job, not one per worker
        warning = cpu_only_warning(nvidia_smi_gpus(), tf.config.list_physical_devices("GPU"))
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    workdir = os.path.abspath(FLAGS.workdir or agreed_default_workdir(replicas))
    JOB.update(workdir=workdir, replicas=replicas)
    if replicas.elastic:  # named by process (ranks change); a silent one is dropped
        beat = heartbeat.start(
            workdir, replicas.rank, replicas.timeout_seconds, name=heartbeat.elastic_name()
        )
        elastic_guard.tell_guard(
            workdir, beat.path, max(beat.silent_after, replicas.wait_for_silent_seconds)
        )
    elif replicas.processes > 1:
        heartbeat.start(
            workdir,
            replicas.rank,
            replicas.timeout_seconds,
            on_stall=lambda: end_timed_out(replicas, workdir, from_watchdog=True),
        )
    if replicas.is_chief:
        print(f"workdir: {workdir}", flush=True)
    try:
        train(workdir, replicas, assembled=lambda: check_params_used(FLAGS.gin_param))
    except (ValueError, TypeError) as error:
        if isinstance(error, InputError) or not built_from_config(error):
            raise  # an InputError says what is wrong itself
        raise UsageError(f"bad value in the gin config: {error}") from error
    return 0


def built_from_config(error: Exception) -> bool:
    """Whether `error` came from building a configured object (a loss, model or source),
    which gin names in the message: a bad value in the config, not a bug."""
    named = re.findall(r"In call to configurable '([^']+)'", str(error))
    return any(name != "train" for name in named)


def main(argv) -> None:
    try:
        sys.exit(run(argv))
    except NumericalError as error:  # diverged: say where, and what is safe to resume
        report(error)
        sys.exit(3)
    except InputError as error:  # the user's to fix: one message, no traceback
        report(error)
        sys.exit(2)
    except Exception as error:
        workdir = JOB.get("workdir") or os.getcwd()
        full = disk_space.out_of_space(error)
        if full is not None:  # a full disk or quota: where, and what to do; nothing is lost
            report(OSError(disk_space.message(*full, workdir)))
            sys.exit(disk_space.EXIT_STATUS)
        replicas = JOB.get("replicas")
        if (
            replicas is not None
            and replicas.processes > 1
            and not replicas.elastic  # (its own failures are Horovod's to handle)
            and collective_timeout.collective_failed(error)
        ):
            end_timed_out(replicas, workdir)
        # A crash: its cause in one line first, then the traceback.
        report(error, f"{type(error).__name__}: ", limit=500)
        raise


_TIMED_OUT = threading.Lock()  # held by whichever of the watchdog or the main thread reports


def end_timed_out(replicas, workdir: str, from_watchdog: bool = False) -> None:
    """Ends the job after a collective waited past the timeout: one line, exit status 5.

    From the watchdog (trainer/backends/heartbeat.py), the main thread is blocked in the wait: the
    process ends at once, as it must (what is complete is on disk; the checkpoint that
    a write was making is not counted, see trainer/outputs/checkpoints.py).
    """
    if not _TIMED_OUT.acquire(blocking=False):
        threading.Event().wait()  # the other one reports and ends the process
    report(TimeoutError(timed_out_message(replicas, workdir)))
    if from_watchdog:
        os._exit(collective_timeout.EXIT_STATUS)
    sys.exit(collective_timeout.EXIT_STATUS)


def timed_out_message(replicas, workdir: str) -> str:
    """After a collective gave up: who did not answer, at which step, and what to do."""
    silent = heartbeat.unanswering(
        workdir, replicas.processes, replicas.rank, replicas.timeout_seconds
    )
    return collective_timeout.message(
        silent, heartbeat.current_step(), replicas.timeout_seconds, last_complete(workdir)
    )


def report(error: Exception, kind: str = "", limit: int | None = None) -> None:
    """The error's message on stderr, one line, without gin's "In call to configurable"
    lines.

    Every worker reports its own error, named by rank and host when there are several:
    a cause only one rank meets (data not mounted on one node) must reach the user.
    `launch/horovod.sh` shows the first such line and drops the others' repeats.
    """
    lines = str(error).splitlines()
    message = " ".join(line for line in lines if "In call to configurable" not in line)
    if limit is not None and len(message) > limit:
        message = message[:limit] + " ..."
    print(f"error: {worker_name()}{kind}{message}", file=sys.stderr, flush=True)


def worker_name() -> str:
    """'rank R on host H: ' under horovodrun (R as Horovod knows it now, which an
    elastic job changes), else ''."""
    rank = os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK"))
    if rank is None:
        return ""
    try:
        import horovod.tensorflow as hvd

        rank = hvd.rank()
    except (ImportError, ValueError):  # not initialized yet (a mistake found before it started)
        pass
    return f"rank {rank} on host {socket.gethostname()}: "


if __name__ == "__main__":
    app.run(main)
