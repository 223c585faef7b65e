"""Config values read against type hints: the one rule set for run configs and method options.

:mod:`vlprompt.engine.config` builds its dataclasses with it and :mod:`vlprompt.methods.options` checks each
method's options with it; it sits below both so that neither imports the other for it.
"""

from __future__ import annotations

import copy
import types
import typing
from typing import Any, Mapping

from vlprompt.errors import ConfigError


def coerce_to_type(value: Any, hint: Any, key: str) -> Any:
    """``value`` (from YAML or the command line) as type ``hint``, or a :class:`ConfigError` naming ``key``: an
    integer is a valid float, a comma-separated text a valid list, ``None`` fits an optional type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce_to_type(value, option, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if origin is dict and isinstance(value, Mapping):
        return copy.deepcopy(dict(value))
    if origin is list and isinstance(value, (list, tuple)):
        return [coerce_to_type(item, args[0], key) for item in value] if args else list(value)
    if origin is list and isinstance(value, str):  # "a,b,c" from the command line
        return [coerce_to_type(item.strip(), args[0], key) for item in value.split(",") if item.strip()]
    expected = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key} must be of type {expected}, got {value!r}")


__all__ = ["coerce_to_type"]
