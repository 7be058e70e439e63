"""Sharded training-state checkpoints in one local directory, written by every rank (see trainer/parallel.py).

Layout of `local_dir`:
- `parallel.json` (rank 0): strategy, world size, precision, format ("dcp" or "deepspeed"), whether EMA is saved.
- DDP/FSDP (format "dcp"): torch.distributed.checkpoint files (`__<rank>_0.distcp`, `.metadata`) holding
  {"model", "optim", "ema"}; DCP reshards on load, so any world size can read them.
- ZeRO (format "deepspeed"): DeepSpeed's `latest` + `zero/` (model and optimizer partitions) saved with
  `universal_checkpoint_info`, which ZeRO 1/2 need for conversion to the universal format; `ema/rank_<r>.pt`
  with each rank's EMA tensors (full for ZeRO 1/2, this rank's unpadded partition for ZeRO-3).
  Loading at another world size converts `zero/` to `zero_universal/` (DeepSpeed's ds_to_universal, rank 0)
  and loads that with `load_universal` switched on for the call.

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

from checkpoints.safe_load import load_torch_state

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
        tmp = os.path.join(local_dir, META_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(local_dir, META_FILE))


def _check_format(meta: dict[str, Any], fmt: str, local_dir: str) -> None:
    if meta.get("format") != fmt:
        raise ValueError(f"{local_dir} holds a {meta.get('format')!r} checkpoint of strategy {meta.get('strategy')!r}"
                         f"; this engine reads {fmt!r}")


# --- DDP / FSDP: torch.distributed.checkpoint ------------------------------------------------------------------------

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

    os.makedirs(local_dir, exist_ok=True)
    dcp.save(_dcp_state(model, optimizer, ema), checkpoint_id=local_dir)
    _write_meta(local_dir, {**meta, "format": "dcp"})
    dist.barrier()


def dcp_load(local_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer, ema: dict | None
             ) -> dict[str, Any]:
    """Load model, optimizer and (when both sides have it) EMA in place; returns the checkpoint's meta."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    meta = read_meta(local_dir)
    _check_format(meta, "dcp", local_dir)
    state = _dcp_state(model, optimizer, ema if meta["ema"] else None)
    dcp.load(state, checkpoint_id=local_dir)  # EMA tensors are filled in place
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return meta


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
        path, _ = ds_engine.load_checkpoint(local_dir, tag=meta["tag"], load_lr_scheduler_states=False)
    else:
        tag = meta["tag"] + "_universal"
        if dist.get_rank() == 0 and not os.path.isdir(os.path.join(local_dir, tag)):
            to_universal(os.path.join(local_dir, meta["tag"]), os.path.join(local_dir, tag))
        dist.barrier()
        config = ds_engine._config  # the flag is only read while loading; it is restored right after
        previous, config.load_universal_checkpoint = config.load_universal_checkpoint, True
        try:
            path, _ = ds_engine.load_checkpoint(local_dir, tag=tag, load_lr_scheduler_states=False)
        finally:
            config.load_universal_checkpoint = previous
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {local_dir}")
    return meta


def to_universal(input_folder: str, output_folder: str) -> None:
    """Convert one DeepSpeed checkpoint tag folder to the universal (per-parameter, world-size-free) format."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", input_folder,
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
