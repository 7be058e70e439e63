"""The one checkpoint manager: everything a run needs to resume goes through here.

A checkpoint (one Ray Train checkpoint directory, merged from every rank's files) holds:

    engine/                 model + optimizer + EMA, sharded (DCP for ddp/fsdp, DeepSpeed's format for zero*)
    rng/rank_<r>.pt         torch / numpy / python RNG states of rank r
    train_state.json        step, the global data-loader state (every rank's cursors), config, tracking run id,
                            the metrics at save time and the data artifact URLs (rank 0)
    integrity/rank_<r>.json size and SHA-256 of every file rank r contributed (checkpoints/integrity.py)

Saving is collective: each rank stages its files in a fresh local directory and calls `ray.train.report`
with it; Ray commits the checkpoint only when every rank's upload has finished, so a half-written checkpoint is
never chosen for resume. With `async_upload` the report returns once the files are staged and the upload runs
in Ray's background thread; either way the upload is retried with exponential backoff, and a checkpoint whose
upload finally fails fails the attempt, which restarts from the previous committed checkpoint.

Restoring verifies the checkpoint first (every file's size, checksum and a pickle-free parse, split over the
ranks and agreed collectively). A committed checkpoint that fails verification or cannot be loaded is skipped
with one warning naming the file and the reason and marked (DAMAGED.json) so later attempts skip it at once,
and the next older committed one is tried; the replay does not save into the damaged directory. Retention:
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

from checkpoints import integrity
from checkpoints.safe_load import load_torch_state
from data_loaders import storage
from data_loaders.stream_plan import merge_rank_states

log = logging.getLogger(__name__)
TRAIN_STATE = "train_state.json"
DAMAGED_FILE = "DAMAGED.json"


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
        self.damaged: set[str] = set()  # checkpoint dirs restore skipped: a replayed step must not write into them

    # --- save ------------------------------------------------------------------------------------------------

    def save(self, step: int, metrics: dict[str, float], *, extra: dict[str, Any] | None = None) -> float:
        """Collective: stage this rank's part of checkpoint `step` and report it to Ray (which commits it once
        every rank's upload is done). Returns the seconds training was blocked."""
        import ray.train
        from ray.train import CheckpointUploadMode

        t0 = time.perf_counter()
        if f"checkpoint_{step:09d}" in self.damaged:
            # Its directory (still listed by Ray) holds the damaged checkpoint we fell back from: writing the replay
            # into it would let Ray's retention of the old entry later delete the new one. The next save goes on.
            if self.rank == 0:
                log.warning("not saving step %d: checkpoint_%09d holds a damaged checkpoint", step, step)
            return 0.0
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
            # In the upload thread, not the training thread: checksumming a large shard takes seconds.
            integrity.write_record(checkpoint.path, self.rank)
            for attempt in range(1, self.upload_retries + 1):
                try:
                    if self._before_upload is not None:
                        self._before_upload(f"uploading {dir_name} (rank {self.rank})")
                    return storage_context.persist_current_checkpoint(checkpoint, dir_name)
                except Exception as e:
                    permanent = storage.storage_write_error(e, storage.join(self.run_dir_url, dir_name))
                    if permanent:  # full, over quota, read-only, forbidden: retrying only wastes the backoff
                        self._upload_error = storage.StorageWriteError(
                            f"{permanent} (rank {self.rank}); the previous committed checkpoint stays valid")
                        raise self._upload_error from e
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
        """Collective: load checkpoint `path` (a URL), else the newest intact committed one; returns the start
        step (0 when there is none). `data=False` keeps the loader where it is (a rollback continues with the next
        data).

        An explicit `path` that fails verification raises CheckpointUnusableError. Without one, a damaged
        checkpoint is skipped (one warning, marked DAMAGED.json) and the previous committed one is tried."""
        import ray.train

        if path is not None:
            problem = self._load_verified(self._checkpoint_at(path), data)
            if problem:
                raise CheckpointUnusableError(f"cannot restore {path}: {problem}")
            return int(self.train_state["step"])
        latest = ray.train.get_checkpoint()
        if latest is None:
            return 0
        skipped = []
        for ckpt in [latest, *self._older_committed(latest.path)]:
            name = ckpt.path.rstrip("/").rsplit("/", 1)[-1]
            problem = self._load_verified(ckpt, data)
            if problem is None:
                if skipped and self.rank == 0:
                    log.warning("resumed from %s after skipping %d damaged checkpoint(s)", name, len(skipped))
                return int(self.train_state["step"])
            skipped.append(f"{name}: {problem}")
            self.damaged.add(name)
            if self.rank == 0:
                log.warning("skipping damaged checkpoint %s: %s; trying the previous committed one", name, problem)
                mark_damaged(self.run_dir_url, name, problem)
        raise CheckpointUnusableError(
            f"no intact committed checkpoint under {self.run_dir_url}: " + "; ".join(skipped) +
            ". Restore a good copy (e.g. from <run>/kept/) or start again under a new --run-name")

    def _checkpoint_at(self, url: str) -> Any:
        import ray.train

        fs, p = storage.resolve(url)
        if not fs.exists(storage.join(p, TRAIN_STATE)):
            raise FileNotFoundError(f"{url} is not a committed b1k-train checkpoint (no {TRAIN_STATE})")
        return ray.train.Checkpoint(p, filesystem=None if storage.is_local(fs) else _pyarrow_fs(fs))

    def _older_committed(self, latest_path: str) -> list[Any]:
        """Committed checkpoints older than `latest_path`, newest first."""
        from checkpoints.retention import committed_checkpoints

        latest = latest_path.rstrip("/").rsplit("/", 1)[-1]
        names = [n for n in committed_checkpoints(self.run_dir_url) if n < latest]
        fs, run_dir = storage.resolve(self.run_dir_url)
        out = []
        for name in reversed(names):
            if fs.exists(storage.join(run_dir, name, TRAIN_STATE)):
                out.append(self._checkpoint_at(storage.join(self.run_dir_url, name)))
        return out

    def _load_verified(self, ckpt: Any, data: bool) -> str | None:
        """Collective: verify `ckpt`, then load it; None on success, else the agreed first problem."""
        with ckpt.as_directory() as d:
            state, problem = None, None
            try:
                if os.path.exists(os.path.join(d, DAMAGED_FILE)):
                    with open(os.path.join(d, DAMAGED_FILE)) as f:
                        problem = f"marked damaged by an earlier attempt: {json.load(f)['problem']}"
                else:
                    with open(os.path.join(d, TRAIN_STATE)) as f:
                        state = json.load(f)
                    problem = integrity.verify(d, int(state["world_size"]), rank=self.rank,
                                               world_size=self.world_size)
            except (OSError, ValueError, KeyError, TypeError) as e:
                problem = f"{TRAIN_STATE}: unreadable ({type(e).__name__}: {e})"
            problem = next((p for p in all_gather(problem) if p), None)
            if problem:
                return problem
            try:
                self.engine.load(os.path.join(d, "engine"))
                rng_file = os.path.join(d, "rng", f"rank_{self.rank}.pt")
                if state["world_size"] == self.world_size and os.path.exists(rng_file):
                    set_rng_state(load_torch_state(rng_file))
                if data:
                    self.loader.load_state_dict(state["loader"])
            except Exception as e:  # noqa: BLE001 - whatever the reader raised, this checkpoint is not usable
                problem = f"loading failed ({_first_line(e)})"
            problem = next((p for p in all_gather(problem) if p), None)
            if problem:
                return problem
        self.tracking_run_id = state.get("tracking_run_id")
        self.restored_from = ckpt.path
        self.train_state = state
        log.info("resumed from %s at step %d", ckpt.path, state["step"])
        return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


class CheckpointUnusableError(ValueError):
    """No checkpoint that could be used (a restart would find the same files): the supervisor stops at once."""


def mark_damaged(run_dir_url: str, name: str, problem: str) -> None:
    """Leave DAMAGED.json in checkpoint `name` so later attempts skip it without verifying it again. The
    directory itself stays (Ray's snapshot lists it; Ray's retention deletes it in turn)."""
    fs, path = storage.resolve(storage.join(run_dir_url, name, DAMAGED_FILE))
    try:
        storage.write_bytes_atomic(fs, path, json.dumps({"problem": problem, "time": time.time()}).encode())
    except Exception as e:  # noqa: BLE001 - the marker only saves time; verification finds the damage anyway
        log.warning("could not mark %s as damaged (%s)", name, e)


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

