"""Frozen config dataclasses rebuilt from JSON files someone else wrote (exports, serving.json), with every field's
type checked first: a wrong type then fails here with one line naming the file and the field, instead of deep
inside model construction with a message that names neither."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def load_json_object(data: bytes | str, *, where: str) -> dict[str, Any]:
    """A JSON document that must be an object (ValueError naming `where` otherwise)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not valid JSON ({e}); re-export the model") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _convert(tp: Any, value: Any, field: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: field {field!r} must be an object, got {_describe(value)}")
        return build(tp, value, where=where, prefix=f"{field}.")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, field, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: field {field!r} must be a list, got {_describe(value)}")
        item = args[0]  # tuple[X, ...] is the only tuple form our configs use
        return tuple(_convert(item, v, f"{field}[{i}]", where) for i, v in enumerate(value))
    # bool is an int in Python, and JSON has no int/float distinction for 2.0: accept exactly what we write.
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}.get(tp)
    if ok is None:
        raise TypeError(f"json_fields cannot check {tp!r} (field {field!r})")
    if not ok(value):
        raise ValueError(f"{where}: field {field!r} must be {tp.__name__}, got {_describe(value)}")
    return float(value) if tp is float else value


def build(cls: type[T], doc: dict[str, Any], *, where: str, prefix: str = "") -> T:
    """`cls(**doc)` after checking that every key is a field of `cls` of the right type (nested dataclasses,
    tuples and optionals included). Missing fields take their defaults; ValueError names file and field."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(doc) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field {prefix}{unknown[0]!r}; known: {sorted(fields)}")
    missing = [n for n, f in fields.items() if n not in doc and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where}: field {prefix}{missing[0]!r} is missing")
    kwargs = {name: _convert(hints[name], value, prefix + name, where) for name, value in doc.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # the class's own range checks (__post_init__)
        raise ValueError(f"{where}: {prefix.rstrip('.') + ': ' if prefix else ''}{e}") from e
