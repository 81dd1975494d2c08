"""Checks shared by the gin configurables that hold a part's settings (train, optimizer,
checkpoints, ...): a bad value is refused naming its binding, before anything runs."""

from __future__ import annotations

import types
import typing

from data.errors import InputError


def check(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


def check_types(configurable: str, function, values: dict) -> None:
    """Each annotated parameter of the gin-configured `function` has a value of its type
    (a binding like train.steps='abc' is named here, not deep in a traceback)."""
    hints = typing.get_type_hints(getattr(function, "__wrapped__", function))
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
        check(
            matches,
            f"{configurable}.{name} must be {names}, got {value!r} ({type(value).__name__}).",
        )
