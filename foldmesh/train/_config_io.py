"""``TrainConfig`` to and from nested dicts and TOML text, each key and value checked coming in.

A nested dict (what ``tomllib`` reads from a config file) becomes a ``TrainConfig`` through
``config_from_dict``: each top-level key must be a section of ``TrainConfig``, each key in it a
field of that section, and each value must fit the field's annotation. The one table-valued
field, ``model.overrides``, holds ``ModelConfig`` fields, checked the same way against
``ModelConfig``'s annotations. Mistakes raise ``ConfigError`` naming the key as
``section.field`` (``model.overrides.<field>``) with the allowed values or a close match.

Values are coerced only where nothing can be lost: an integral float to an int field
(``1e3`` -> 1000), an int to a float field, an array to a tuple field. Strings are never
parsed here; the command line does that (``_config_cli``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..models import ModelConfig
from .config import TrainConfig


class ConfigError(ValueError):
    """A bad trainer setting; the message names it as ``section.field`` and says how to fix it."""


SECTIONS: dict[str, type] = typing.get_type_hints(TrainConfig)
"""Section name -> its dataclass, in ``TrainConfig``'s order."""
FIELD_TYPES: dict[str, dict[str, type]] = {s: typing.get_type_hints(c) for s, c in SECTIONS.items()}
"""Section name -> field name -> resolved annotation (``from __future__ import annotations``
leaves them as strings)."""
MODEL_FIELD_TYPES: dict[str, type] = typing.get_type_hints(ModelConfig)
"""``ModelConfig`` field -> resolved annotation: what ``model.overrides`` may hold."""


def did_you_mean(name: str, choices) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _describe(a)
                           for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"an array, each {_describe(typing.get_args(hint)[0])}"
    if dataclasses.is_dataclass(hint):
        return f"a table of {hint.__name__}'s fields ({', '.join(typing.get_type_hints(hint))})"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             dict: "a table ({key = value, ...})"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _unquote_hint(value) -> str:
    """A fix for `steps = "10"`: the value is right but quoted, so TOML made it a string."""
    if isinstance(value, str):
        try:
            if not isinstance(tomllib.loads(f"v = {value}").get("v", ""), str):
                return "; write it without quotes"
        except tomllib.TOMLDecodeError:
            pass
    return ""


def coerce(value, hint, key: str):
    """``value`` as the type ``hint`` asks for, or ``ConfigError`` naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        for arm in typing.get_args(hint):
            if arm is not type(None):
                try:
                    return coerce(value, arm, key)
                except ConfigError:
                    if dataclasses.is_dataclass(arm) and isinstance(value, dict):
                        raise  # the table was meant for it: its own error names the field

    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(coerce(v, typing.get_args(hint)[0], f"{key}[{i}]")
                         for i, v in enumerate(value))
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        # bool is an int subclass: `steps = true` is a mistake, not 1
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif dataclasses.is_dataclass(hint):  # a nested setting, e.g. ModelConfig.rope_scaling
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            fields = typing.get_type_hints(hint)
            for name in value:
                if name not in fields:
                    raise ConfigError(f"{key}.{name} is not a {hint.__name__} field"
                                      f"{did_you_mean(name, fields)} (fields: "
                                      f"{', '.join(fields)})")
            try:
                return hint(**{k: coerce(v, fields[k], f"{key}.{k}") for k, v in value.items()})
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{key}: {e}") from None
    elif isinstance(value, hint):  # str, dict
        return dict(value) if hint is dict else value
    raise ConfigError(f"{key} must be {_describe(hint)}, got {value!r}{_unquote_hint(value)}")


def check_overrides(overrides: dict, key: str = "model.overrides") -> dict:
    """``model.overrides`` with each key checked against ``ModelConfig``'s fields and each
    value coerced to that field's type (arrays become tuples)."""
    out = {}
    for name, value in overrides.items():
        if name not in MODEL_FIELD_TYPES:
            raise ConfigError(
                f"{key}.{name} is not a ModelConfig field{did_you_mean(name, MODEL_FIELD_TYPES)}"
                f" (fields: {', '.join(MODEL_FIELD_TYPES)})"
            )
        out[name] = coerce(value, MODEL_FIELD_TYPES[name], f"{key}.{name}")
    return out


def _unknown_section(section: str) -> ConfigError:
    owners = [s for s, f in FIELD_TYPES.items() if section in f]
    hint = (f"; put it under [{owners[0]}] ({owners[0]}.{section})" if owners
            else did_you_mean(section, SECTIONS))
    return ConfigError(f"unknown section {section!r}{hint} (sections: {', '.join(SECTIONS)})")


def field_type(section: str, name: str) -> type:
    """The annotation of ``section.name``; ``ConfigError`` with a suggestion when unknown."""
    if section not in SECTIONS:
        raise _unknown_section(section)
    fields = FIELD_TYPES[section]
    if name not in fields:
        elsewhere = [s for s, f in FIELD_TYPES.items() if name in f]
        hint = (f"; it belongs to [{elsewhere[0]}]: {elsewhere[0]}.{name}" if elsewhere
                else did_you_mean(name, fields))
        raise ConfigError(f"unknown setting {section}.{name}{hint} ([{section}] has: "
                          f"{', '.join(fields)})")
    return fields[name]


def config_from_dict(d: dict) -> TrainConfig:
    """A ``TrainConfig`` from nested ``{section: {field: value}}`` (missing ones keep their
    defaults). Raises ``ConfigError`` for an unknown section or key, or a value of the wrong
    type."""
    if not isinstance(d, dict):
        raise ConfigError(f"a config is a table of sections ({', '.join(SECTIONS)}), "
                          f"got {type(d).__name__}")
    sections = {}
    for section, body in d.items():
        if section not in SECTIONS:
            raise _unknown_section(section)
        if not isinstance(body, dict):
            raise ConfigError(f"section [{section}] must be a table of settings, got "
                              f"{body!r}; write `[{section}]` then `field = value` lines")
        values = {}
        for name, value in body.items():
            key = f"{section}.{name}"
            values[name] = coerce(value, field_type(section, name), key)
            if key == "model.overrides":
                values[name] = check_overrides(values[name])
        sections[section] = SECTIONS[section](**values)
    return TrainConfig(**sections)


def config_to_dict(cfg: TrainConfig) -> dict:
    """``{section: {field: value}}`` in ``TrainConfig``'s order (a deep copy)."""
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------- TOML output
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def _toml_str(s: str) -> str:
    # TOML basic strings forbid raw control characters (and DEL): escape them as \uXXXX
    return '"' + "".join(
        _ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
        for c in s
    ) + '"'


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_str(k)


def toml_value(v, key: str) -> str:
    """One TOML value (inline tables and arrays for nested ones); ``key`` names it in errors."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, dict):
        items = ", ".join(f"{_toml_key(k)} = {toml_value(x, f'{key}.{k}')}" for k, x in v.items())
        return f"{{ {items} }}" if items else "{}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x, f"{key}[{i}]") for i, x in enumerate(v)) + "]"
    raise ConfigError(f"{key} = {v!r} cannot be written as TOML (it has no None); leave the key "
                      "out of model.overrides to keep the preset's value")


def format_config(cfg: TrainConfig) -> str:
    """``cfg`` as TOML text: every section in order, one ``field = value`` line per field.
    ``tomllib.loads`` of it gives back ``config_to_dict(cfg)`` (tuples as lists)."""
    lines = []
    for section, body in config_to_dict(cfg).items():
        lines += ["", f"[{section}]"] if lines else [f"[{section}]"]
        lines += [f"{name} = {toml_value(v, f'{section}.{name}')}" for name, v in body.items()]
    return "\n".join(lines) + "\n"
