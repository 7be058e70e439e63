"""The one checkpoint manager: everything a run needs to resume goes through here.

A checkpoint (one Ray Train checkpoint directory, merged from every rank's files) holds:

    engine/                 model + optimizer + EMA, sharded (DCP for ddp/fsdp, DeepSpeed's format for zero*)
    rng/rank_<r>.pt         torch / numpy / python RNG states of rank r
    train_state.json        step, the global data-loader state (every rank's cursors), config, tracking run id,
                            the metrics at save time and the data artifact URLs (rank 0)

Saving is collective: each rank stages its files in a fresh local directory and calls `ray.train.report`
with it; Ray commits the checkpoint only when every rank's upload has finished, so a half-written checkpoint is
never chosen for resume. With `async_upload` the report returns once the files are staged and the upload runs
in Ray's background thread; either way the upload is retried with exponential backoff, and a checkpoint whose
upload finally fails fails the attempt, which restarts from the previous committed checkpoint. Retention:
Ray keeps the last `keep_last`; checkpoints at multiples of `keep_period` are copied to `<run>/kept/step_<n>`
by checkpoints/retention.py.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from checkpoints.safe_load import load_torch_state
from data_loaders import storage
from data_loaders.stream_plan import merge_rank_states

log = logging.getLogger(__name__)
TRAIN_STATE = "train_state.json"


def rng_state() -> dict[str, Any]:
    """torch, numpy and python RNG states as tensors and numbers only, so loading them needs no unpickling of
    arbitrary objects (checkpoints/safe_load.py)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n, p = state["numpy"], state["python"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))


def all_gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class CheckpointManager:
    """Save/restore of engine, RNG, step, loader and run metadata through Ray Train checkpoints."""

    def __init__(self, *, engine: Any, loader: Any, config_dict: dict[str, Any], rank: int, world_size: int,
                 run_dir_url: str, workers_per_rank: int, async_upload: bool = True, upload_retries: int = 5,
                 upload_backoff_s: float = 1.0, before_upload: Callable[[str], None] | None = None):
        self.engine, self.loader = engine, loader
        self.config_dict = config_dict
        self.rank, self.world_size = rank, world_size
        self.run_dir_url = run_dir_url
        self.workers_per_rank = workers_per_rank
        self.async_upload, self.upload_retries, self.upload_backoff_s = async_upload, upload_retries, upload_backoff_s
        self._before_upload = before_upload  # fault injection hook: may raise OSError
        self.upload_failures = 0  # upload attempts that failed and were retried (read by the training loop)
        self._upload_error: BaseException | None = None  # set by a background upload that gave up
        self.tracking_run_id: str | None = None
        self.restored_from: str | None = None
        self.train_state: dict[str, Any] | None = None  # train_state.json of the restored checkpoint

    # --- save ------------------------------------------------------------------------------------------------

    def save(self, step: int, metrics: dict[str, float], *, extra: dict[str, Any] | None = None) -> float:
        """Collective: stage this rank's part of checkpoint `step` and report it to Ray (which commits it once
        every rank's upload is done). Returns the seconds training was blocked."""
        import ray.train
        from ray.train import CheckpointUploadMode

        t0 = time.perf_counter()
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
            # Ray deletes `tmp` once it is uploaded (in the background with ASYNC).
            ray.train.report({**metrics, "step": step}, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{step:09d}",
                             checkpoint_upload_mode=CheckpointUploadMode.ASYNC if self.async_upload
                             else CheckpointUploadMode.SYNC,
                             delete_local_checkpoint_after_upload=True,
                             checkpoint_upload_fn=self._upload_with_retries(ray.train.get_context().get_storage()))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return time.perf_counter() - t0

    def check_uploads(self) -> None:
        """Raise, in the training thread, the error of a background upload that gave up: training on would
        only produce steps that can never be checkpointed (Ray notices the failure too, but seconds later)."""
        if self._upload_error is not None:
            raise self._upload_error

    def _upload_with_retries(self, storage_context: Any) -> Callable[[Any, str], Any]:
        def upload(checkpoint: Any, dir_name: str) -> Any:
            for attempt in range(1, self.upload_retries + 1):
                try:
                    if self._before_upload is not None:
                        self._before_upload(f"uploading {dir_name} (rank {self.rank})")
                    return storage_context.persist_current_checkpoint(checkpoint, dir_name)
                except Exception as e:
                    if attempt == self.upload_retries:
                        self._upload_error = RuntimeError(
                            f"upload of {dir_name} from rank {self.rank} failed {attempt} times (last: "
                            f"{type(e).__name__}: {e}); the previous committed checkpoint stays valid and the run "
                            f"restarts from it. Check the storage endpoint and credentials.")
                        raise self._upload_error from e
                    self.upload_failures += 1
                    delay = self.upload_backoff_s * 2 ** (attempt - 1)
                    log.warning("upload of %s failed (%s: %s); retry %d/%d in %.1f s", dir_name, type(e).__name__,
                                e, attempt, self.upload_retries - 1, delay)
                    time.sleep(delay)
            raise AssertionError("unreachable")

        return upload

    # --- restore ---------------------------------------------------------------------------------------------

    def restore(self, path: str | None = None, *, data: bool = True) -> int:
        """Collective: load checkpoint `path` (a URL), else the latest committed one; returns the start step.

        `data=False` keeps the loader where it is (a rollback continues with the next data)."""
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
                set_rng_state(load_torch_state(rng_file))
            if data:
                self.loader.load_state_dict(state["loader"])
        self.tracking_run_id = state.get("tracking_run_id")
        self.restored_from = ckpt.path
        self.train_state = state
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

