"""In-process recovery inside one training attempt: non-finite steps, rollbacks, and the sample audit.

Process-level failures (crashes, hangs, lost nodes) end the attempt instead; trainer/supervisor.py restarts it.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import torch

from data_loaders import storage

log = logging.getLogger(__name__)


class NonFiniteGuard:
    """Counts non-finite steps. A step whose global grad norm is NaN/Inf has already been skipped by the
    engine (no update, no EMA); after `max_consecutive` of them in a row the loop rolls back."""

    def __init__(self, max_consecutive: int, *, skipped: int = 0, rollbacks: int = 0):
        self.max_consecutive = max_consecutive
        self.skipped, self.rollbacks = skipped, rollbacks
        self.consecutive = 0

    def observe(self, grad_norm: float) -> str:
        """"ok", "skip" (count it and move on to the next data) or "rollback"."""
        if torch.isfinite(torch.tensor(grad_norm)):
            self.consecutive = 0
            return "ok"
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            self.consecutive = 0
            self.rollbacks += 1
            return "rollback"
        return "skip"

    def counters(self) -> dict[str, float]:
        return {"nonfinite/skipped_steps": float(self.skipped), "nonfinite/rollbacks": float(self.rollbacks)}


def agreed_rollback_checkpoint(run_dir_url: str, my_latest_path: str | None) -> str:
    """URL of the newest checkpoint every rank has seen committed. Collective.

    With asynchronous uploads one rank may already see checkpoint n while another still sees n - 1; all
    ranks must load the same one.
    """
    from checkpoints.manager import all_gather

    mine = _step_of(my_latest_path)
    steps = all_gather(mine)
    if any(s is None for s in steps):
        raise FloatingPointError(
            "training produced non-finite gradients repeatedly before the first checkpoint was committed; "
            "lower optim.peak_lr, check the data (b1k-train data stats) or save earlier (--set save_every=...)")
    return storage.join(run_dir_url, f"checkpoint_{min(steps):09d}")


def _step_of(path: str | None) -> int | None:
    if not path:
        return None
    m = re.search(r"checkpoint_(\d{9})", path)
    return int(m.group(1)) if m else None


class SampleAudit:
    """Optional record of which samples each rank consumed at each step: <run>/audit/step_<n>_rank<r>.json.

    On (re)start, records of steps after the restored one are deleted by rank 0 first: they belong to work
    that was lost, and the replayed steps write their own.
    """

    def __init__(self, run_dir_url: str, rank: int, *, enabled: bool):
        self.enabled, self.rank = enabled, rank
        self.fs, self.dir = storage.resolve(storage.join(run_dir_url, "audit"))

    def rewind(self, restored_step: int) -> None:
        if not self.enabled or self.rank != 0 or not self.fs.exists(self.dir):
            return
        for path in self.fs.ls(self.dir, detail=False):
            m = re.search(r"step_(\d+)_rank\d+\.json$", path)
            if m and int(m.group(1)) > restored_step:
                self.fs.rm(path)

    def record(self, step: int, batches: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        ids = [[int(e), int(i)] for b in batches for e, i in zip(b["epoch"].tolist(), b["sample_index"].tolist())]
        path = storage.join(self.dir, f"step_{step:09d}_rank{self.rank}.json")
        if storage.is_local(self.fs):
            self.fs.makedirs(self.dir, exist_ok=True)
        storage.write_bytes_atomic(self.fs, path, json.dumps(ids).encode())


def read_audit(run_dir_url: str) -> dict[int, list[tuple[int, int]]]:
    """{step: [(epoch, sample_index), ...] over all ranks} from a run's audit records."""
    fs, d = storage.resolve(storage.join(run_dir_url, "audit"))
    out: dict[int, list[tuple[int, int]]] = {}
    for path in fs.ls(d, detail=False):
        m = re.search(r"step_(\d+)_rank\d+\.json$", path)
        if m:
            out.setdefault(int(m.group(1)), []).extend(tuple(x) for x in json.loads(fs.cat_file(path)))
    return out
