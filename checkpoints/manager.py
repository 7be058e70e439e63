"""The one checkpoint manager: everything a run needs to resume goes through here.

A checkpoint (one Ray Train checkpoint directory, merged from every rank's files) holds:

    engine/                 model + optimizer + EMA, sharded (DCP for ddp/fsdp, DeepSpeed's format for zero*)
    rng/rank_<r>.pt         torch / numpy / python RNG states of rank r
    train_state.json        step, the global data-loader state (every rank's cursors), config, tracking run id,
                            the metrics at save time and the data artifact URLs (rank 0)

Saving is collective: each rank writes its files into a fresh local directory and calls `ray.train.report`
with it; Ray commits the checkpoint only when every rank has reported, so a half-written checkpoint is never
chosen for resume. Retention: Ray keeps the last `keep_last`; checkpoints at multiples of `keep_period` are
also copied to `<run>/kept/step_<n>` (never deleted).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_loaders import storage
from data_loaders.stream_plan import merge_rank_states

log = logging.getLogger(__name__)
TRAIN_STATE = "train_state.json"


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def all_gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class CheckpointManager:
    """Save/restore of engine, RNG, step, loader and run metadata through Ray Train checkpoints."""

    def __init__(self, *, engine: Any, loader: Any, config_dict: dict[str, Any], rank: int, world_size: int,
                 run_dir_url: str, keep_period: int, workers_per_rank: int):
        self.engine, self.loader = engine, loader
        self.config_dict = config_dict
        self.rank, self.world_size = rank, world_size
        self.run_dir_url = run_dir_url
        self.keep_period = keep_period
        self.workers_per_rank = workers_per_rank
        self.tracking_run_id: str | None = None
        self.restored_from: str | None = None

    # --- save ------------------------------------------------------------------------------------------------

    def save(self, step: int, metrics: dict[str, float], *, extra: dict[str, Any] | None = None) -> None:
        """Collective: write this rank's part of checkpoint `step` and report it to Ray (which commits it)."""
        import ray.train

        loader_states = all_gather(self.loader.state_dict())
        tmp = tempfile.mkdtemp(prefix=f"b1k-ckpt-{step}-r{self.rank}-")
        try:
            self.engine.save(os.path.join(tmp, "engine"))
            os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
            torch.save(rng_state(), os.path.join(tmp, "rng", f"rank_{self.rank}.pt"))
            if self.rank == 0:
                state = {
                    "step": step,
                    "world_size": self.world_size,
                    "loader": merge_rank_states(loader_states,
                                                num_workers_per_rank=[self.workers_per_rank] * self.world_size),
                    "config": self.config_dict,
                    "tracking_run_id": self.tracking_run_id,
                    "metrics": {k: float(v) for k, v in metrics.items()},
                    **(extra or {}),
                }
                with open(os.path.join(tmp, TRAIN_STATE), "w") as f:
                    json.dump(state, f, indent=1, sort_keys=True)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "step": step}, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{step:09d}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.rank == 0 and self.keep_period and step % self.keep_period == 0:
            self._keep_forever(step)

    def _keep_forever(self, step: int) -> None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return
        dest = storage.join(self.run_dir_url, "kept", f"step_{step:09d}")
        fs, path = storage.resolve(dest)
        with ckpt.as_directory() as d:
            fs.put(d, path, recursive=True)
        log.info("kept checkpoint of step %d at %s", step, dest)

    # --- restore ---------------------------------------------------------------------------------------------

    def restore(self, path: str | None = None) -> int:
        """Collective: load checkpoint `path` (a URL), else the latest committed one; returns the start step."""
        import ray.train

        if path is not None:
            fs, p = storage.resolve(path)
            if not fs.exists(storage.join(p, TRAIN_STATE)):
                raise FileNotFoundError(f"{path} is not a committed b1k-train checkpoint (no {TRAIN_STATE})")
            ckpt = ray.train.Checkpoint(p, filesystem=None if storage.is_local(fs) else _pyarrow_fs(fs))
        else:
            ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return 0
        with ckpt.as_directory() as d:
            with open(os.path.join(d, TRAIN_STATE)) as f:
                state = json.load(f)
            self.engine.load(os.path.join(d, "engine"))
            rng_file = os.path.join(d, "rng", f"rank_{self.rank}.pt")
            if state["world_size"] == self.world_size and os.path.exists(rng_file):
                # weights_only=False: numpy/python RNG states are plain tuples the safe loader refuses.
                set_rng_state(torch.load(rng_file, weights_only=False))
            self.loader.load_state_dict(state["loader"])
        self.tracking_run_id = state.get("tracking_run_id")
        self.restored_from = ckpt.path
        log.info("resumed from %s at step %d", ckpt.path, state["step"])
        return int(state["step"])


def _pyarrow_fs(fs):
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def read_train_state(checkpoint_dir: str) -> dict[str, Any]:
    """train_state.json of a checkpoint directory (local path or URL)."""
    fs, path = storage.resolve(storage.join(checkpoint_dir, TRAIN_STATE))
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{checkpoint_dir} is not a b1k-train checkpoint (no {TRAIN_STATE})") from e

