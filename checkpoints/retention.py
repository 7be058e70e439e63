"""What stays in a run directory: committed checkpoints, kept-forever copies, and nothing half-written.

Ray Train commits a checkpoint by listing it in `checkpoint_manager_snapshot.json` once every rank's files
are uploaded; it deletes all but the newest `keep_last` itself. Two things are ours:

- `KeepPeriodCallback` (runs on the Ray Train controller) copies every committed checkpoint whose step is a
  multiple of `keep_period` to `<run>/kept/step_<n>/`, train_state.json last, so a kept copy is complete
  whenever its train_state.json exists.
- `sweep_orphans` removes `checkpoint_*` directories the snapshot does not list: uploads cut short by a crash,
  or a checkpoint fully uploaded but never registered because the controller lost the report. They would
  otherwise look complete and collide with the replayed step's checkpoint of the same name.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ray.train import UserCallback

from data_loaders import storage

log = logging.getLogger(__name__)
SNAPSHOT = "checkpoint_manager_snapshot.json"
TRAIN_STATE = "train_state.json"
_CHECKPOINT_DIR = re.compile(r"checkpoint_(\d{9})")


def committed_checkpoints(run_dir_url: str) -> list[str]:
    """Names of the checkpoints Ray has committed for the run, oldest first ([] before the first commit)."""
    fs, path = storage.resolve(run_dir_url)
    snapshot = storage.join(path, SNAPSHOT)
    if not fs.exists(snapshot):
        return []
    steps = sorted({int(s) for s in _CHECKPOINT_DIR.findall(fs.cat_file(snapshot).decode())})
    return [f"checkpoint_{s:09d}" for s in steps]


def sweep_orphans(run_dir_url: str) -> list[str]:
    """Delete checkpoint directories that are not committed; returns their names. Run it only while no
    attempt of the run is writing (the driver calls it before each attempt)."""
    fs, path = storage.resolve(run_dir_url)
    if not fs.exists(path):
        return []
    committed = set(committed_checkpoints(run_dir_url))
    orphans = []
    for entry in fs.ls(path, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] == "directory" and _CHECKPOINT_DIR.fullmatch(name) and name not in committed:
            fs.rm(storage.join(path, name), recursive=True)
            orphans.append(name)
    if orphans:
        log.warning("removed %d uncommitted checkpoint dir(s) left by an interrupted attempt: %s",
                    len(orphans), ", ".join(sorted(orphans)))
    return sorted(orphans)


def copy_checkpoint(src_url: str, dest_url: str) -> None:
    """Copy a checkpoint directory within its storage (server-side on S3), train_state.json last: it is the
    copy's commit marker."""
    fs, src = storage.resolve(src_url)
    _, dst = storage.resolve(dest_url)
    files = [f for f in fs.find(src) if not f.endswith("/" + TRAIN_STATE)]
    for f in [*files, storage.join(src, TRAIN_STATE)]:
        target = storage.join(dst, f[len(src.rstrip("/")) + 1:])
        if storage.is_local(fs):
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.copy(f, target)


class KeepPeriodCallback(UserCallback):
    """On the controller, once Ray has committed a checkpoint: say so in one line (the workers' own "Checkpoint
    successfully created" lines come before the commit and are silenced in trainer/loop.py), and copy it to
    <run>/kept/ when its step is a multiple of `keep_period`."""

    def __init__(self, run_dir_url: str, keep_period: int):
        self.run_dir_url, self.keep_period = run_dir_url, keep_period

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is None or not metrics:
            return
        step = int(metrics[0].get("step", 0))
        name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
        print(f"[checkpoint] step {step} committed: {storage.join(self.run_dir_url, name)}", flush=True)
        if not self.keep_period or step <= 0 or step % self.keep_period:
            return
        dest = storage.join(self.run_dir_url, "kept", f"step_{step:09d}")
        try:
            copy_checkpoint(storage.join(self.run_dir_url, name), dest)
            log.info("kept checkpoint of step %d at %s", step, dest)
        except Exception:  # noqa: BLE001 - a failed extra copy must not fail the run; the original is committed
            log.exception("could not keep checkpoint of step %d at %s", step, dest)
