"""Reading a serving export (the layout of checkpoints/export.py) as untrusted input.

An export may come from object storage or a registry someone else can write to, so every file is checked before
it is used: JSON files are objects whose fields have the types the config dataclasses declare, and the header of
model.safetensors (plain JSON, read here without loading any tensor) must list exactly the tensors of the model
config.json describes, each with that shape and a byte range that fits its dtype and the file. Each failure is
one ValueError naming the file and the field or tensor. Nothing is unpickled: safetensors and JSON only.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
from typing import Any

import torch

from checkpoints.json_fields import build, load_json_object
from data_loaders import storage

MODEL_FILE, CONFIG_FILE, STATE_FILE, NORM_FILE, FAST_DIR = (
    "model.safetensors", "config.json", "state.json", "norm_stats.json", "fast_tokenizer")
# Bytes per element of the safetensors dtypes (safetensors/src/tensor.rs); anything else is refused.
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def _read_json(url: str, name: str, *, missing: str) -> tuple[dict[str, Any], str]:
    """(the JSON object `name` of the export at `url`, its URL for messages)."""
    fs, path = storage.resolve(url)
    where = storage.join(url, name)
    try:
        return load_json_object(fs.cat_file(storage.join(path, name)), where=where), where
    except FileNotFoundError as e:
        raise FileNotFoundError(missing) from e


def _check_type(doc: dict[str, Any], field: str, tp: type, where: str) -> None:
    value = doc.get(field)
    if value is not None and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ValueError(f"{where}: field {field!r} must be {tp.__name__}, got {type(value).__name__} {value!r}")


def read_state(url: str) -> dict[str, Any]:
    """state.json of a complete export (FileNotFoundError naming the fix when it is absent)."""
    from checkpoints.model_uri import resolve_model_url

    url = resolve_model_url(url)
    state, where = _read_json(url, STATE_FILE, missing=f"{url} is not a complete b1k-train export (no "
                              f"{STATE_FILE}); re-run the export")
    _check_type(state, "global_step", int, where)
    return state


def read_config(url: str) -> dict[str, Any]:
    """config.json as a dict whose "model_type" is a string (default pi_behavior)."""
    doc, where = _read_json(url, CONFIG_FILE, missing=f"{storage.join(url, CONFIG_FILE)} is missing; re-run the "
                            f"export")
    doc.setdefault("model_type", "pi_behavior")
    _check_type(doc, "model_type", str, where)
    return doc


def pi_behavior_config(doc: dict[str, Any], *, where: str):
    """The PiBehaviorConfig of a config.json's "model" object, every field type-checked."""
    from models.pi_behavior.config import PiBehaviorConfig

    model = doc.get("model")
    if not isinstance(model, dict):
        raise ValueError(f"{where}: field 'model' must be an object (the architecture), got {type(model).__name__}")
    return build(PiBehaviorConfig, model, where=where, prefix="model.")


def _header(local: str, where: str) -> tuple[dict[str, Any], int]:
    """(tensor entries of the safetensors header, size of the data section)."""
    size = os.path.getsize(local)
    with open(local, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{where}: {size} bytes, too short for a safetensors file; re-export the model")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{where}: the header claims {n} bytes but the file has {size}; the file is truncated "
                             f"or not safetensors: re-export the model")
        header = load_json_object(f.read(n), where=f"{where} (header)")
    header.pop("__metadata__", None)
    return header, size - 8 - n


def _offsets(entry: Any) -> tuple[int, int] | None:
    off = entry.get("data_offsets") if isinstance(entry, dict) else None
    if isinstance(off, list) and len(off) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in off):
        return off[0], off[1]
    return None


def _check_entry(name: str, entry: Any, expected: torch.Tensor | None, data_bytes: int, where: str) -> None:
    if expected is None:
        raise ValueError(f"{where}: tensor {name!r} is not part of the model config.json describes; the weights "
                         f"and the config come from different models: re-export")
    offsets = _offsets(entry)
    if offsets is None or entry.get("dtype") not in _ITEMSIZE or not isinstance(entry.get("shape"), list):
        raise ValueError(f"{where}: tensor {name!r} has a malformed header entry (dtype, shape, data_offsets)")
    shape, (begin, end) = entry["shape"], offsets
    if shape != list(expected.shape):
        raise ValueError(f"{where}: tensor {name!r} has shape {shape}, config.json needs {list(expected.shape)}")
    need = math.prod(shape) * _ITEMSIZE[entry["dtype"]]
    if begin < 0 or end - begin != need:
        raise ValueError(f"{where}: tensor {name!r} ({entry['dtype']} {shape}) needs {need} bytes, its data_offsets "
                         f"{[begin, end]} give {end - begin}")
    if end > data_bytes:
        raise ValueError(f"{where}: tensor {name!r} ends at byte {end} of the data, which has only {data_bytes}: the "
                         f"file is truncated; re-export or re-download it")


def load_weights(local: str, model: torch.nn.Module, *, where: str) -> None:
    """Check `local` (a safetensors file) against `model`'s tensors, then load it into the model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header, data_bytes = _header(local, where)
    expected = model.state_dict()
    # File order, so "the first tensor" is the first one a reader would hit.
    for name, entry in sorted(header.items(), key=lambda kv: (_offsets(kv[1]) or (-1, -1))[0]):
        _check_entry(name, entry, expected.get(name), data_bytes, where)
    missing = [k for k in expected if k not in header]
    if missing:
        raise ValueError(f"{where}: tensor {missing[0]!r} is missing ({len(missing)} of {len(expected)} missing); "
                         f"the weights and the config come from different models: re-export")
    try:
        tensors = load_file(local)
    except SafetensorError as e:
        raise ValueError(f"{where}: not a readable safetensors file ({e}); re-export the model") from e
    model.load_state_dict(tensors, strict=True)


def load_pi_behavior(url: str, *, device: str = "cpu"):
    """(PiBehavior with the exported weights and noise correlation, NormStats, FastTokenizer, config dict) of a
    complete export; the config dict also carries the export's "global_step"."""
    from checkpoints.model_uri import resolve_model_url
    from data_loaders.norm_stats import NormStats
    from models.pi_behavior.fast import FastTokenizer
    from models.pi_behavior.model import PiBehavior

    url = resolve_model_url(url)
    state = read_state(url)
    config = read_config(url)
    config["global_step"] = state.get("global_step")
    model = PiBehavior(pi_behavior_config(config, where=storage.join(url, CONFIG_FILE)))
    fs, path = storage.resolve(url)
    with tempfile.TemporaryDirectory(prefix="b1k-export-read-") as tmp:
        local = os.path.join(tmp, MODEL_FILE)
        fs.get(storage.join(path, MODEL_FILE), local)
        load_weights(local, model, where=storage.join(url, MODEL_FILE))
    norm = NormStats.load(storage.join(url, NORM_FILE))
    model.set_action_correlation(torch.tensor(norm.action_correlation_cholesky))
    fast = FastTokenizer.load(storage.join(url, FAST_DIR))
    return model.to(device).eval(), norm, fast, config

