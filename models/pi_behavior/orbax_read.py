"""Read the arrays of an orbax PyTree checkpoint (openpi's `<ckpt>/params`) without JAX: tensorstore only.

On-disk layout read here (orbax-checkpoint's PyTreeCheckpointHandler, as openpi and the 1st-place solution save
`{"params": <EMA params>}`):

    params/_METADATA           JSON: {"tree_metadata": {"('params', 'PaliGemma', ...)": {"key_metadata": [{"key":
                               "params", "key_type": 2}, ...], "value_metadata": {"value_type": "jax.Array", ...}}},
                               "use_zarr3": false, ...}
    params/manifest.ocdbt      the merged OCDBT key-value store; its b-tree points into
    params/ocdbt.process_<i>/  the per-process stores orbax writes first (d/ data files, their own manifest)
    params/_sharding, params/_CHECKPOINT_METADATA, params/array_metadatas/...   (not needed to read values)

Every array is a zarr (v2 by default, zarr3 if `use_zarr3`) array whose key in the store is the tree path joined
by '.', e.g. `params.PaliGemma.llm.layers.attn.q_einsum.w` (or `....w.value` when the tree was an nnx.State). A
checkpoint saved without OCDBT has one directory per array instead; both are read.

The files are untrusted input: _METADATA is parsed as JSON and type-checked, array names must be plain key
paths, only numeric zarr arrays are accepted, and nothing is unpickled or executed.
"""

from __future__ import annotations

import ast
import json
import os
import re
from typing import Any

import numpy as np

METADATA_FILE = "_METADATA"
OCDBT_MANIFEST = "manifest.ocdbt"
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")  # one key of a tree path
_FLOAT_KINDS = "fc"
_MAX_METADATA_BYTES = 64 << 20


class OrbaxFormatError(ValueError):
    """The directory is not a readable orbax PyTree checkpoint; the message names the file and the problem."""


def _tensorstore():
    try:
        import tensorstore as ts
    except ImportError as e:  # a runtime dependency (pyproject.toml); only missing in a broken install
        raise OrbaxFormatError("reading openpi/orbax checkpoints needs the `tensorstore` package "
                               "(pip install tensorstore)") from e
    return ts


def _tree_paths(doc: Any, where: str) -> list[tuple[str, ...]]:
    """Leaf key paths of a _METADATA document (only array leaves)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("tree_metadata"), dict):
        raise OrbaxFormatError(f"{where}: no 'tree_metadata' object; not an orbax PyTree checkpoint")
    paths = []
    for flat, entry in doc["tree_metadata"].items():
        keys = None
        if isinstance(entry, dict) and isinstance(entry.get("key_metadata"), list):
            keys = [k.get("key") if isinstance(k, dict) else None for k in entry["key_metadata"]]
        if keys is None or not all(isinstance(k, str) for k in keys):
            try:  # older metadata: only the "('a', 'b')" string of the path
                parsed = ast.literal_eval(flat)
            except (ValueError, SyntaxError) as e:
                raise OrbaxFormatError(f"{where}: tree entry {flat[:80]!r} has no readable key path") from e
            keys = list(parsed) if isinstance(parsed, tuple) else None
        if not keys or not all(isinstance(k, str) and _NAME.match(k) for k in keys):
            raise OrbaxFormatError(f"{where}: tree entry {flat[:80]!r} is not a path of plain keys")
        value = entry.get("value_metadata", {}) if isinstance(entry, dict) else {}
        value_type = value.get("value_type", "jax.Array") if isinstance(value, dict) else None
        if value_type not in ("jax.Array", "np.ndarray"):
            raise OrbaxFormatError(f"{where}: {'.'.join(keys)} is a {value_type!r}, not an array; a params "
                                   f"checkpoint holds arrays only")
        if isinstance(value, dict) and value.get("skip_deserialize"):
            continue
        paths.append(tuple(keys))
    if not paths:
        raise OrbaxFormatError(f"{where}: the checkpoint holds no arrays")
    return sorted(paths)


class OrbaxParams:
    """The arrays of a local orbax PyTree checkpoint directory, by key path; values are read on demand."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        meta_path = os.path.join(self.directory, METADATA_FILE)
        if not os.path.isfile(meta_path):
            raise OrbaxFormatError(f"{meta_path} is missing: {directory} is not an orbax PyTree checkpoint "
                                   f"(openpi checkpoints keep their weights in <ckpt>/params/)")
        if os.path.getsize(meta_path) > _MAX_METADATA_BYTES:
            raise OrbaxFormatError(f"{meta_path}: implausibly large ({os.path.getsize(meta_path)} bytes)")
        with open(meta_path, "rb") as f:
            try:
                doc = json.loads(f.read())
            except (ValueError, UnicodeDecodeError) as e:
                raise OrbaxFormatError(f"{meta_path}: not valid JSON ({e})") from e
        self.paths = _tree_paths(doc, meta_path)
        use_zarr3 = doc.get("use_zarr3", False)
        if not isinstance(use_zarr3, bool):
            raise OrbaxFormatError(f"{meta_path}: 'use_zarr3' must be true or false, got {use_zarr3!r}")
        self.driver = "zarr3" if use_zarr3 else "zarr"
        self.ocdbt = os.path.isfile(os.path.join(self.directory, OCDBT_MANIFEST))
        ts = _tensorstore()
        self._ts = ts
        self._context = ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})
        self._stores: dict[tuple[str, ...], Any] = {}

    def _spec(self, path: tuple[str, ...]) -> dict[str, Any]:
        name = ".".join(path)
        if self.ocdbt:
            kvstore = {"driver": "ocdbt", "base": {"driver": "file", "path": self.directory},
                       "path": name + "/", "cache_pool": "cache_pool#ocdbt"}
        else:
            kvstore = {"driver": "file", "path": os.path.join(self.directory, name) + "/"}
        return {"driver": self.driver, "kvstore": kvstore}

    def _open(self, path: tuple[str, ...]):
        store = self._stores.get(path)
        if store is None:
            try:
                store = self._ts.open(self._spec(path), open=True, read=True, context=self._context).result()
            except Exception as e:  # tensorstore raises ValueError/RuntimeError subclasses with its own messages
                raise OrbaxFormatError(f"{self.directory}: array {'.'.join(path)} cannot be opened ({e})") from e
            dt = store.dtype.numpy_dtype
            if dt.kind not in _FLOAT_KINDS + "iub" and str(dt) != "bfloat16":
                raise OrbaxFormatError(f"{self.directory}: array {'.'.join(path)} has dtype {store.dtype}")
            self._stores[path] = store
        return store

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(int(d) for d in self._open(path).shape)

    def dtype(self, path: tuple[str, ...]) -> str:
        return str(self._open(path).dtype.numpy_dtype)

    def read(self, path: tuple[str, ...]) -> np.ndarray:
        """The array as numpy; bfloat16 comes back as ml_dtypes.bfloat16 (convert with .astype(np.float32))."""
        try:
            return np.asarray(self._open(path).read().result())
        except OrbaxFormatError:
            raise
        except Exception as e:
            raise OrbaxFormatError(f"{self.directory}: array {'.'.join(path)} cannot be read ({e}); the "
                                   f"checkpoint is damaged or incomplete") from e
