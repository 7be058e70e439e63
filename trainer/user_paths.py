"""Paths a user types, made absolute on the driver.

Ray workers run in a Ray session directory, not in the directory the command was started from, so a relative
`--storage ./runs` or `--set data.shards=shards` would name a different place (or nothing) on them. Every command
resolves what the user typed here, once, before any URL is handed to Ray; URLs with a scheme (s3://, file://,
models:/, http://) are left as they are.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import TypeVar

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # s3://, file://, models:/NAME@alias, http://
# init_from values are "<kind>:<path>" (trainer/config.py); the path part is the user's.
_INIT_KINDS = ("export", "paligemma", "pi05", "openpi", "xvla")
_OPENPI = "openpi:"
T = TypeVar("T")


def is_url(text: str) -> bool:
    """s3://..., file://..., models:/..., openpi:<dir> (anything but a plain local path)."""
    return bool(_SCHEME.match(text)) or text.startswith(_OPENPI)


def absolute_url(url: str | None) -> str | None:
    """`url` with a relative or ~ local path made absolute against the current directory; URLs unchanged."""
    if not url or _SCHEME.match(url):
        return url
    if url.startswith(_OPENPI):  # serve --model openpi:<dir> (checkpoints/model_uri.py)
        return _OPENPI + (absolute_url(url[len(_OPENPI):]) or "")
    return os.path.abspath(os.path.expanduser(url))


def absolute_init_from(value: str) -> str:
    kind, sep, rest = value.partition(":")
    if sep and kind in _INIT_KINDS and rest:
        return f"{kind}:{absolute_url(rest)}"
    return value


def absolute_config_paths(cfg: T) -> T:
    """Copy of a TrainConfig (or of a config holding one as `train`, e.g. PipelineConfig) with its path fields
    (data.shards, data.norm_stats, data.fast_tokenizer, init_from) absolute."""
    from trainer.config import TrainConfig

    if isinstance(cfg, TrainConfig):
        data = dataclasses.replace(cfg.data, shards=absolute_url(cfg.data.shards),
                                   norm_stats=absolute_url(cfg.data.norm_stats),
                                   fast_tokenizer=absolute_url(cfg.data.fast_tokenizer))
        return dataclasses.replace(cfg, data=data, init_from=absolute_init_from(cfg.init_from))
    train = getattr(cfg, "train", None)
    if dataclasses.is_dataclass(cfg) and isinstance(train, TrainConfig):
        return dataclasses.replace(cfg, train=absolute_config_paths(train))
    return cfg


def check_local_storage(url: str, *, flag: str = "--storage") -> None:
    """Raise one line when a local `url` cannot be a directory: it, or the nearest part of it that exists, is a
    file. Remote URLs are checked by writing to them (trainer/launch.py)."""
    if _SCHEME.match(url) and not url.startswith("file://"):
        return
    path = os.path.abspath(url.removeprefix("file://"))
    existing = path
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = f"{flag} {url} is" if existing == path else f"{flag} {url}: {existing} is"
        raise ValueError(f"{what} a file, not a directory; pass a directory (created if missing), file:// or "
                         f"s3://bucket/prefix")
