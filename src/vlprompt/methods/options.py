"""The options each method accepts and their types: one check for every method, before anything is built.

A method declares its options in :data:`vlprompt.methods.OPTIONS` as one or more sources: a dataclass (its
annotated fields) or a mapping of defaults (an option named like an :class:`~vlprompt.methods.align.AlignConfig`
field has that field's type, any other the type of its default). :func:`check_options` reads user values against
those types with the config's own rules (:func:`vlprompt.values.coerce_to_type`: an integer is a valid float,
a comma-separated text a valid list) and one rule more: a number is never read as text (``text_ctx_init=123`` is
a mistake, not the words "123"). A wrong name, type or choice is one :class:`~vlprompt.errors.ConfigError` naming
the option and what is allowed, raised by ``vlprompt train --print-config`` as well as before a run starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

from vlprompt.errors import ConfigError
from vlprompt.values import coerce_to_type


def option_types(*sources: Any) -> dict[str, Any]:
    """``{option: type hint}`` from dataclasses and mappings of defaults (later sources win)."""
    from vlprompt.methods.align import AlignConfig

    align_types = typing.get_type_hints(AlignConfig)
    result: dict[str, Any] = {}
    for source in sources:
        if dataclasses.is_dataclass(source):
            hints = typing.get_type_hints(source)
            result.update({field.name: hints[field.name] for field in dataclasses.fields(source)})
        else:
            result.update({name: align_types.get(name, _type_of_default(default))
                           for name, default in source.items()})
    return result


def option_choices(*sources: Any) -> dict[str, tuple]:
    """``{option: allowed values}`` declared by the dataclass sources (their ``CHOICES``)."""
    choices: dict[str, tuple] = {}
    for source in sources:
        choices.update(getattr(source, "CHOICES", None) or {})
    return choices


def check_options(method: str, options: Mapping[str, Any], prefix: str = "method.options.") -> dict[str, Any]:
    """``options`` of ``method`` read as their declared types (``2`` for a float option becomes ``2.0``).

    Raises:
        ConfigError: an unknown option (the message lists the allowed ones), a value of the wrong type or outside
            the option's choices; the message names the option as ``prefix + name``.
    """
    from vlprompt.methods import OPTIONS

    sources = OPTIONS.get(method)
    if sources is None:
        return dict(options)  # not declared: the method's factory checks its own options
    if not isinstance(options, Mapping):
        raise ConfigError(f"{prefix.rstrip('. ')} must be a mapping of option names to values, got {options!r}")
    declared = option_types(*sources)
    unknown = sorted(set(options) - set(declared))
    if unknown:
        raise ConfigError(f"{method}: unknown option(s) {unknown}; allowed: {', '.join(sorted(declared))}")
    choices = option_choices(*sources)
    checked = {}
    for name, value in options.items():
        key, hint = f"{prefix}{name}", declared[name]
        if _is_number(value) and not _takes_numbers(hint):
            raise ConfigError(f"{key} must be {describe(hint)}, got the number {value!r}")
        try:
            checked[name] = value if hint in (Any, list) else coerce_to_type(value, hint, key)
        except ConfigError:
            raise ConfigError(f"{key} must be {describe(hint)}, got {value!r}") from None
        if name in choices and checked[name] not in choices[name]:
            allowed = ", ".join("null" if c is None else str(c) for c in choices[name])
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
    return checked


def describe(hint: Any) -> str:
    """What a type hint allows, in words: ``int | None`` → ``"an integer or null"``."""
    if hint is Any:
        return "any value"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (Any,)
        return f"a list of {_PLURALS.get(item, 'values')}"
    if typing.get_origin(hint) is dict:
        return "a mapping"
    return _WORDS.get(hint, getattr(hint, "__name__", str(hint)))


_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text", type(None): "null"}
_PLURALS = {bool: "true/false values", int: "integers", float: "numbers", str: "texts"}


def _type_of_default(default: Any) -> Any:
    """The type a default stands for: ``None`` allows anything, a list its items' type (``[7.0, 3.0]``:
    ``list[float]``)."""
    if default is None:
        return Any
    if isinstance(default, list):
        item_types = {type(item) for item in default}
        return list[item_types.pop()] if len(item_types) == 1 else list
    return type(default)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _takes_numbers(hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_takes_numbers(option) for option in typing.get_args(hint))
    return hint in (int, float, Any)


__all__ = ["check_options", "describe", "option_choices", "option_types"]
