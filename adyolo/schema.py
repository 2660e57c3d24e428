"""Typed config sections: build a dataclass from a plain mapping and reject bad input early.

Every config section in adyolo is a dataclass whose fields carry the defaults. A YAML file (or a
`key=value` override) produces plain dicts; `from_mapping` turns one into the dataclass, checking
unknown keys and value types against the annotations, so that a typo fails before any model is
built or any data is loaded. Value checks that need more than a type (ranges, divisibility) live in
each dataclass's `__post_init__` and raise `ConfigError` too.

This module needs only the standard library, so the model package can use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong. `key` is the dotted path (e.g. `model.img_size`)."""

    def __init__(self, key: str, message: str, *, location: str | None = None):
        self.key = key
        self.message = message
        self.location = location
        where = f"{location}: " if location else ""
        super().__init__(f"{where}{key}: {message}")

    def at(self, location: str) -> ConfigError:
        """The same error, placed at `file:line` (the YAML loader knows where each key was written)."""
        return ConfigError(self.key, self.message, location=location)

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key nested under `prefix` (a section checked on its own)."""
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.message, location=self.location)


def from_mapping(cls: type[T], data: Mapping[str, Any] | T | None, prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, validating keys and types.

    `data` may already be an instance of `cls` (returned unchanged) or None (all defaults).
    Errors name the full dotted key, e.g. `model.fusion`.
    """
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(prefix or "<root>", f"expected a mapping of keys to values, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(path, f"unknown key{hint} Valid keys: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(prefix) from None


def to_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) as plain dicts/lists, ready for YAML or a tracker."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _coerce(annotation: Any, value: Any, path: str) -> Any:
    """Check `value` against `annotation`; return it converted where the conversion is lossless."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        return from_mapping(annotation, value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"{_show(value)} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, path)
            except ConfigError as err:
                errors.append(err.message)
        raise ConfigError(path, " or ".join(errors))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {_show(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(path, f"expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {_show(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {_show(value)}")
        return value
    if annotation is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, which reads exponent numerals without a dot (5e-4, 1e30) as
            # strings; accept those, since that is how learning rates and decays are written.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {_show(value)}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {_show(value)}")
        return value
    raise TypeError(f"{path}: unsupported annotation {annotation!r} in a config dataclass")


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"
