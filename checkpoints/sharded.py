"""Sharded training-state checkpoints in one local directory, written by every rank (see trainer/parallel.py).

Layout of `local_dir`:
- `parallel.json` (rank 0): strategy, world size, precision, format ("dcp-safetensors" or "deepspeed"), whether
  EMA is saved.
- DDP/FSDP (format "dcp-safetensors"): torch.distributed.checkpoint through its safetensors storage (one
  `.safetensors` file of shards per rank) holding the tensors of {"model", "optim", "ema"}, and `values.json`
  with the non-tensor values; DCP reshards on load, so any world size can read them. Nothing is pickled.
- ZeRO (format "deepspeed"): DeepSpeed's `latest` + `zero/` (model and optimizer partitions) saved with
  `universal_checkpoint_info`, which ZeRO 1/2 need for conversion to the universal format; `ema/rank_<r>.pt`
  with each rank's EMA tensors (full for ZeRO 1/2, this rank's unpadded partition for ZeRO-3).
  Loading at another world size converts `zero/` to `zero_universal/` (DeepSpeed's ds_to_universal, rank 0)
  and loads that with `load_universal` switched on for the call. DeepSpeed's files are pickles: they are read
  only through torch's weights-only unpickler (checkpoints/safe_load.py), conversion included.

Every function here is Collective.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from checkpoints.safe_load import deepspeed_loads_weights_only, load_torch_state

META_FILE = "parallel.json"
DS_TAG = "zero"
# ZeRO 1/2 checkpoints can only be converted to the universal format when saved with this client state.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}


def read_meta(local_dir: str) -> dict[str, Any]:
    path = os.path.join(local_dir, META_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{local_dir} is not a trainer checkpoint: {META_FILE} is missing")
    with open(path) as f:
        return json.load(f)


def _write_meta(local_dir: str, meta: dict[str, Any]) -> None:
    if dist.get_rank() == 0:
        _write_json(os.path.join(local_dir, META_FILE), meta)


def _check_format(meta: dict[str, Any], fmt: str, local_dir: str) -> None:
    if meta.get("format") != fmt:
        raise ValueError(f"{local_dir} holds a {meta.get('format')!r} checkpoint of strategy {meta.get('strategy')!r}"
                         f"; this engine reads {fmt!r}")


# --- DDP / FSDP: torch.distributed.checkpoint ------------------------------------------------------------------------
# DCP's default format pickles its `.metadata` and any non-tensor value, and its reader unpickles them without
# restriction. We use DCP's safetensors storage instead (every rank writes its shards as one .safetensors file; the
# reader rebuilds the metadata from the files' JSON headers) and keep the few non-tensor values (the optimizer's
# param_groups: learning rates, betas, names) in `values.json`, written by rank 0.

VALUES_FILE = "values.json"


def _split(obj: Any, path: str = "") -> tuple[Any, Any]:
    """(tensors, values): the same nesting with only tensor leaves, and with only the other leaves."""
    if isinstance(obj, torch.Tensor):
        return obj, None
    if isinstance(obj, Mapping):
        tensors, values = {}, {}
        for k, v in obj.items():
            t, o = _split(v, f"{path}.{k}")
            if t is not None and t != {}:
                tensors[k] = t
            if o is not None and o != {}:
                values[k] = o
        return tensors, values
    if isinstance(obj, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in obj):
        raise TypeError(f"{path}: a list holding tensors cannot be split into the checkpoint's tensors and values")
    return None, obj


def _merge(tensors: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(tensors)
    for k, v in values.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, Mapping) else v
    return out


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: dict | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)  # clean FQNs; a fresh optimizer gets zero state
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema
    return state


def dcp_save(local_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer, ema: dict | None, *,
             meta: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    os.makedirs(local_dir, exist_ok=True)
    tensors, values = _split(_dcp_state(model, optimizer, ema))
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(local_dir, save_distributed=True))
    if dist.get_rank() == 0:
        _write_json(os.path.join(local_dir, VALUES_FILE), values)
    _write_meta(local_dir, {**meta, "format": "dcp-safetensors"})
    dist.barrier()


def dcp_load(local_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer, ema: dict | None
             ) -> dict[str, Any]:
    """Load model, optimizer and (when both sides have it) EMA in place; returns the checkpoint's meta."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    meta = read_meta(local_dir)
    _check_format(meta, "dcp-safetensors", local_dir)
    tensors, _ = _split(_dcp_state(model, optimizer, ema if meta["ema"] else None))
    with open(os.path.join(local_dir, VALUES_FILE)) as f:
        values = json.load(f)
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(local_dir))  # fills the tensors in place
    state = _merge(tensors, values)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return meta


def _write_json(path: str, obj: Any) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# --- ZeRO: DeepSpeed checkpoints + per-rank EMA --------------------------------------------------------------------

def _ema_file(local_dir: str, rank: int) -> str:
    return os.path.join(local_dir, "ema", f"rank_{rank:05d}.pt")


def deepspeed_save(local_dir: str, ds_engine: Any, ema: dict | None, *, meta: dict[str, Any]) -> None:
    os.makedirs(os.path.join(local_dir, "ema"), exist_ok=True)
    ds_engine.save_checkpoint(local_dir, tag=DS_TAG, client_state=dict(UNIVERSAL_INFO))
    if ema is not None:
        torch.save({n: t.detach().cpu() for n, t in ema.items()}, _ema_file(local_dir, dist.get_rank()))
    _write_meta(local_dir, {**meta, "format": "deepspeed", "tag": DS_TAG})
    dist.barrier()


def deepspeed_load(local_dir: str, ds_engine: Any, strategy: str) -> dict[str, Any]:
    """Load model + optimizer; at a new world size via the universal format. Returns the checkpoint's meta."""
    meta = read_meta(local_dir)
    _check_format(meta, "deepspeed", local_dir)
    if meta["strategy"] != strategy:
        raise ValueError(f"{local_dir} was saved by {meta['strategy']}, not {strategy}")
    if meta["world_size"] == dist.get_world_size():
        with deepspeed_loads_weights_only():
            path, _ = ds_engine.load_checkpoint(local_dir, tag=meta["tag"], load_lr_scheduler_states=False)
    else:
        tag = meta["tag"] + "_universal"
        if dist.get_rank() == 0 and not os.path.isdir(os.path.join(local_dir, tag)):
            to_universal(os.path.join(local_dir, meta["tag"]), os.path.join(local_dir, tag))
        dist.barrier()
        config = ds_engine._config  # the flag is only read while loading; it is restored right after
        previous, config.load_universal_checkpoint = config.load_universal_checkpoint, True
        try:
            with deepspeed_loads_weights_only():
                path, _ = ds_engine.load_checkpoint(local_dir, tag=tag, load_lr_scheduler_states=False)
        finally:
            config.load_universal_checkpoint = previous
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {local_dir}")
    return meta


def to_universal(input_folder: str, output_folder: str) -> None:
    """Convert one DeepSpeed checkpoint tag folder to the universal (per-parameter, world-size-free) format."""
    # Through our wrapper: DeepSpeed's converter unpickles every file of the checkpoint without restriction.
    cmd = [sys.executable, "-m", "checkpoints.ds_universal", "--input_folder", input_folder,
           "--output_folder", output_folder, "--num_extract_workers", "1", "--num_merge_workers", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True)  # noqa: S603 - our interpreter, our own paths
    if out.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def load_rank_ema(local_dir: str, shadow: dict[str, torch.Tensor], *,
                  zero3_layout: Mapping[str, Mapping[str, Any]] | None) -> None:
    """Fill this rank's EMA tensors in place. `zero3_layout` (name -> numel, shape, partition) describes the
    current engine's ZeRO-3 partitioning, or is None for full tensors (ZeRO 1/2)."""
    meta = read_meta(local_dir)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    saved_zero3 = meta.get("zero3_layout") is not None
    if meta["world_size"] == world_size and saved_zero3 == (zero3_layout is not None):
        saved = load_torch_state(_ema_file(local_dir, rank))
        for name, t in shadow.items():
            t.copy_(saved[name])
        return
    full = _full_ema(local_dir, meta)
    for name, t in shadow.items():
        if zero3_layout is None:
            t.copy_(full[name])
        else:
            start = rank * zero3_layout[name]["partition"]
            t.copy_(full[name].reshape(-1)[start:start + t.numel()])


def _full_ema(local_dir: str, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    layout = meta.get("zero3_layout")
    if layout is None:
        return load_torch_state(_ema_file(local_dir, 0))
    parts = [load_torch_state(_ema_file(local_dir, r)) for r in range(meta["world_size"])]
    return {name: torch.cat([p[name] for p in parts])[:info["numel"]].reshape(info["shape"])
            for name, info in layout.items()}
