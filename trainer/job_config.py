"""A job's gin config: where a --gin_file name is found, parsing it, and refusing a
--gin_param binding that the assembled job never reads.

Kept apart from trainer.main (which defines absl flags at import) so that trainer.index,
trainer.doctor and tests use it without defining flags twice.
"""

from __future__ import annotations

import os

import gin
from absl import logging

from data.errors import InputError

DEFAULT_JOB = "digits"  # digits.gin: the embedded default job
# Bindings that moved, and where to: a config that still uses the old name is told.
MOVED = {
    "train.recall_k": "evaluation.recall_k",
    "train.eval_chunk_size": "evaluation.chunk_size",
    "train.optimizer": "optimizer.name",
    "train.learning_rate": "optimizer.learning_rate",
    "train.weight_decay": "optimizer.weight_decay",
    "train.scale_learning_rate": "optimizer.scale_learning_rate",
    "train.reference_batch_size": "optimizer.reference_batch_size",
    "train.centre_learning_rate_multiplier": "optimizer.centre_learning_rate_multiplier",
    "train.keep_checkpoints": "checkpoints.keep",
    "train.export_model": "export.enabled",
    "train.precision": "precision.policy",
    "train.synchronized_batchnorm": "batchnorm.synchronized",
}


class UsageError(InputError):
    """A mistake on the command line."""


def shipped_config_dir() -> str:
    """The folder of the job configs this project ships.

    An installed wheel carries gin/ as trainer/configs/; a checkout (run in place or
    installed editable) has it beside trainer/. (Beside an installed trainer/ lies the
    gin-config library's own `gin` package, so the folder must hold a config to count.)
    """
    package = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(package, "configs"), os.path.join(os.path.dirname(package), "gin")):
        if os.path.isfile(os.path.join(folder, DEFAULT_JOB + ".gin")):
            return folder
    raise UsageError(f"the shipped job configs are missing: no {DEFAULT_JOB}.gin under {package}")


def resolve_gin_file(name: str) -> str:
    """`name` as a path if that file exists, else the shipped config `name` or `name`.gin."""
    shipped = shipped_config_dir()
    candidates = [name, os.path.join(shipped, name), os.path.join(shipped, name + ".gin")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    available = sorted(f[: -len(".gin")] for f in os.listdir(shipped) if f.endswith(".gin"))
    raise UsageError(
        f"--gin_file {name!r} not found (looked for {', '.join(candidates)}); the shipped "
        f"configs are {', '.join(available)}."
    )


def parse_config(files, params) -> None:
    """Parses the job's config files and bindings; gin's errors become one UsageError."""
    paths = [resolve_gin_file(f) for f in files]
    gin.add_config_file_search_path(shipped_config_dir())  # so configs can `include 'base.gin'`
    logging.set_verbosity(logging.FATAL)  # gin logs an error before it tries the search path
    try:
        gin.parse_config_files_and_bindings(paths, params, finalize_config=True)
    except (ValueError, KeyError, SyntaxError, NameError) as error:  # gin's own errors
        for old, new in MOVED.items():
            configurable, parameter = old.split(".")
            if f"'{configurable}' doesn't have a parameter named '{parameter}'" in str(error):
                raise UsageError(f"{old} is now {new}: rename it in the config.") from error
        raise UsageError(f"bad gin config: {error}") from error
    finally:
        logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines drown the progress


def _scope(scope_str: str) -> list[str]:
    return scope_str.split("/") if scope_str else []


def binding_is_read(parsed, operative) -> bool:
    """Whether gin applied the binding `parsed` to any call the job made.

    gin applies a binding scoped `a` (or unscoped) to every call made in a scope that
    starts with it (`a/b`, or any scope), so `image_folder.root` reaches both
    `train_split/image_folder` and `eval_split/image_folder`. `operative` is gin's
    operative config: {(scope of the call, configurable): {parameter: value}}.
    """
    scope = _scope(parsed.scope)
    return any(
        selector == parsed.complete_selector
        and parsed.arg_name in values
        and _scope(call_scope)[: len(scope)] == scope
        for (call_scope, selector), values in operative.items()
    )


def check_params_used(params, operative=None) -> None:
    """Refuses a --gin_param binding that no configurable of the assembled job read.

    A binding outside gin's operative config would silently change nothing. Bindings
    from config files are not held to this (base.gin binds what a given job may not use).
    """
    if operative is None:
        operative = gin.config._OPERATIVE_CONFIG
    for param in params:
        key = param.split("=", 1)[0].strip()
        if "." not in key or key.startswith(("%", "import", "include")):
            continue  # a macro, an import or an include: not a configurable's parameter
        try:
            parsed = gin.config.ParsedBindingKey.parse(key)
        except ValueError:
            continue  # gin refused it already when parsing, or it names no configurable
        if binding_is_read(parsed, operative):
            continue
        called_in = sorted(
            call_scope or "(no scope)"
            for call_scope, selector in operative
            if selector == parsed.complete_selector
        )
        where = f"; it is called in scope {', '.join(called_in)}" if called_in else ""
        raise UsageError(
            f"--gin_param {param!r} is never read: nothing in this job calls "
            f"{key.rsplit('.', 1)[0]!r}{where} (check the name and the scope, or the config "
            "that the job runs)."
        )
