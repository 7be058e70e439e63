"""`--set key=value` overrides on nested frozen dataclasses, typed by the target field.

    apply_overrides(cfg, ["optim.peak_lr=3e-4", "strategy=zero2", "data.shards=s3://b/shards"])

Values are parsed by the annotated type of the field (int, float, bool, str, tuples, optional), and every
error names the key, the expected type and the valid keys; the result is re-validated by the dataclasses'
own __post_init__.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any


def _parse(text: str, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _parse(text, args[0], key)
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {key}={text}: expected a boolean (true/false)")
    if tp is float:
        try:
            return float(text)
        except ValueError as e:
            raise ValueError(f"--set {key}={text}: expected a number") from e
    if tp is int:
        try:
            number = float(text)  # accepts 200000 and 2e5
        except ValueError as e:
            raise ValueError(f"--set {key}={text}: expected an integer") from e
        if not number.is_integer():
            raise ValueError(f"--set {key}={text}: expected an integer")
        return int(number)
    if tp is str:
        return text
    if origin is tuple and hasattr(typing.get_args(tp)[0], "from_text"):
        # Records with their own text form, separated by ';' (e.g. subsets=ckpt1:0,1;ckpt2:40).
        return tuple(typing.get_args(tp)[0].from_text(v.strip()) for v in text.split(";") if v.strip())
    if origin is tuple:
        try:
            value = json.loads(text) if text.strip().startswith("[") else [v for v in text.split(",") if v != ""]
        except json.JSONDecodeError as e:
            raise ValueError(f"--set {key}={text}: expected a comma-separated list or a JSON list") from e
        args = typing.get_args(tp)
        item = args[0] if args else str
        if len(args) == 2 and args[1] is Ellipsis or len(args) == 1:
            return tuple(v if not isinstance(v, str) or item is str else _parse(v, item, key) for v in value)
        if len(value) != len(args):
            raise ValueError(f"--set {key}={text}: expected {len(args)} values")
        return tuple(v if not isinstance(v, str) else _parse(v, a, key) for v, a in zip(value, args))
    raise ValueError(f"--set {key}: fields of type {tp} cannot be set from the command line")


def _field_types(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def apply_override(cfg: Any, key: str, text: str) -> Any:
    """Return a copy of `cfg` with dotted field `key` set from `text`."""
    return apply_overrides(cfg, [f"{key}={text}"])


def apply_overrides(cfg: Any, assignments: list[str]) -> Any:
    """Return a copy of `cfg` with every `key=value` applied (a later one for the same key wins).

    All changes to a nested config are applied together before it is validated, so dependent fields can move
    together: `optim.peak_lr=1e-5 optim.final_lr=1e-6` works whatever the recipe's final_lr was.
    """
    changes: dict[str, str] = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        changes.pop(key.strip(), None)  # re-insert: the last assignment of a key wins and keeps its order
        changes[key.strip()] = text.strip()
    return _rebuild(cfg, changes, "")


def _rebuild(cfg: Any, changes: dict[str, str], prefix: str) -> Any:
    names = [f.name for f in dataclasses.fields(cfg)]
    kwargs: dict[str, Any] = {}
    nested: set[str] = set()
    for key, text in changes.items():
        if not key.startswith(prefix):
            continue
        head, _, rest = key[len(prefix):].partition(".")
        if head not in names:
            hint = difflib.get_close_matches(head, names, n=1)
            raise ValueError(f"--set {key}: unknown field {head!r} of {type(cfg).__name__}"
                             + (f"; did you mean {hint[0]!r}?" if hint else f"; fields: {', '.join(names)}"))
        current = getattr(cfg, head)
        if rest:
            if not dataclasses.is_dataclass(current):
                raise ValueError(f"--set {key}: {head!r} is not a nested config")
            nested.add(head)
        elif dataclasses.is_dataclass(current):
            raise ValueError(f"--set {key}: {head!r} is a nested config; set one of its fields, e.g. {key}.<field>")
        else:
            kwargs[head] = _parse(text, _field_types(cfg)[head], key)
    for head in nested:
        kwargs[head] = _rebuild(getattr(cfg, head), changes, f"{prefix}{head}.")
    return dataclasses.replace(cfg, **kwargs) if kwargs else cfg


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of a nested dataclass (for tracking params and config.json)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out
