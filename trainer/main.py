"""Entry point: `python -m trainer.main [--gin_file=F ...] [--gin_param=B ...] [--workdir=D]`.

With no flags it runs the embedded default job (digits, gin/digits.gin's settings are
the code defaults). A bare --gin_file name is looked up in gin/. Under horovodrun every
worker runs this same command; `distribute.strategy='auto'` notices.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gin  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import trainer.config  # noqa: E402, F401  (registers the configurables)
from data.errors import InputError  # noqa: E402
from trainer.loop import NumericalError  # noqa: E402
from trainer.replicas import make_replicas  # noqa: E402

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin config file; a bare name is looked up in gin/.")
flags.DEFINE_multi_string("gin_param", [], "Gin binding, e.g. train.steps=500.")
flags.DEFINE_string(
    "workdir", None, "Checkpoints, TensorBoard events and exports; default runs/<job>-<time>."
)


class UsageError(InputError):
    """A mistake on the command line."""


def resolve_gin_file(name: str) -> str:
    """`name` as given if it exists, else gin/<name> or gin/<name>.gin."""
    candidates = [name, os.path.join(GIN_DIR, name), os.path.join(GIN_DIR, name + ".gin")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise UsageError(f"--gin_file {name!r} not found (looked for {', '.join(candidates)}).")


def parse_config(files, params) -> None:
    paths = [resolve_gin_file(f) for f in files]
    gin.add_config_file_search_path(GIN_DIR)  # so configs can `include 'base.gin'`
    logging.set_verbosity(logging.FATAL)  # gin logs an error before it tries the search path
    try:
        gin.parse_config_files_and_bindings(paths, params, finalize_config=True)
    except (ValueError, KeyError, SyntaxError, NameError) as error:  # gin's own errors
        raise UsageError(f"bad gin config: {error}") from error
    finally:
        logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines drown the progress


def default_workdir(files) -> str:
    job = os.path.splitext(os.path.basename(files[-1]))[0] if files else "digits"
    run_id = os.environ.get("METRIC_TRAINER_RUN_ID") or time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{job}-{run_id}")


def agreed_default_workdir(replicas) -> str:
    """The default workdir, the same on every worker."""
    if not replicas.elastic:
        return replicas.agree(default_workdir(FLAGS.gin_file))
    # A worker that joins an elastic job later cannot take part in a collective now.
    if not os.environ.get("METRIC_TRAINER_RUN_ID"):
        raise UsageError(
            "An elastic Horovod job needs --workdir (or METRIC_TRAINER_RUN_ID, which "
            "launch/horovod.sh sets) so that workers joining later find the same one."
        )
    return default_workdir(FLAGS.gin_file)


def run(argv) -> int:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}; use --gin_param for bindings.")
    parse_config(FLAGS.gin_file, FLAGS.gin_param)
    from trainer.loop import train

    replicas = make_replicas()
    workdir = os.path.abspath(FLAGS.workdir or agreed_default_workdir(replicas))
    if replicas.is_chief:
        print(f"workdir: {workdir}", flush=True)
    train(workdir, replicas)
    return 0


def main(argv) -> None:
    try:
        sys.exit(run(argv))
    except NumericalError as error:  # diverged: say where, and what is safe to resume
        report(error)
        sys.exit(3)
    except InputError as error:  # the user's to fix: one message, no traceback
        report(error)
        sys.exit(2)


def report(error: Exception) -> None:
    """The error's message on stderr, without gin's "In call to configurable" lines.

    Every worker meets the same error; under horovodrun only the chief reports it.
    """
    if not _is_chief_process():
        return
    lines = str(error).splitlines()
    message = "\n".join(line for line in lines if "In call to configurable" not in line)
    print(f"error: {message}", file=sys.stderr)


def _is_chief_process() -> bool:
    """HOROVOD_RANK is the rank a worker started with; in an elastic job ranks change,
    so Horovod is asked when it is running."""
    if os.environ.get("HOROVOD_RANK") is None:
        return True
    try:
        import horovod.tensorflow as hvd

        return hvd.rank() == 0
    except ValueError:  # not initialized yet (a mistake found before it started)
        return os.environ["HOROVOD_RANK"] == "0"


if __name__ == "__main__":
    app.run(main)
