"""Fault injection for tests and benchmarks: off unless configured (`--set fault.kill_rank=1 fault.at_step=7`).

Each process fault (kill, hang, communication error) fires once per run: before firing, the rank writes a
marker under `<run>/faults/`, and a restarted attempt that finds the marker does not fire again, exactly as a
one-off crash in production would not recur. NaN injection counts step attempts in the process, and
storage errors are drawn from a generator seeded per rank.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import time

import torch

from data_loaders import storage

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FaultConfig:
    at_step: int = 0  # the step before which kill/hang/comm-error faults fire (0 = never)
    kill_rank: int = -1  # this rank SIGKILLs its own process (a crashed worker / OOM kill)
    hang_rank: int = -1  # this rank sleeps forever (a hung rank: its peers block in the next collective)
    comm_error_rank: int = -1  # this rank raises torch.distributed.DistBackendError (e.g. an NCCL error)
    storage_errors: int = 0  # the first N checkpoint upload attempts of each rank in the run fail (OSError)
    storage_error_rate: float = 0.0  # then each upload attempt fails with this probability
    nan_at_step: int = 0  # from this step on the loss is NaN on every rank... (0 = never)
    nan_steps: int = 0  # ...for this many consecutive steps (counted per process)
    # Before step N+1, wait (up to 120 s) until Ray has committed checkpoint N: pins an order the async upload
    # and the controller otherwise leave to timing (e.g. "checkpoint N is committed before the disk fills").
    await_commit_step: int = 0

    def __post_init__(self) -> None:
        if min(self.at_step, self.nan_at_step, self.nan_steps, self.storage_errors, self.await_commit_step) < 0:
            raise ValueError("fault.at_step, nan_at_step, nan_steps, storage_errors and await_commit_step must be "
                             ">= 0")
        if not 0.0 <= self.storage_error_rate < 1.0:
            raise ValueError(f"fault.storage_error_rate must be in [0, 1), got {self.storage_error_rate}")

    def check(self) -> None:
        """Cross-field checks, run when a run starts (overrides are applied one field at a time)."""
        if self.at_step == 0 and max(self.kill_rank, self.hang_rank, self.comm_error_rank) >= 0:
            raise ValueError("a kill/hang/comm-error fault needs fault.at_step >= 1 (the step before which it fires)")
        if bool(self.nan_at_step) != bool(self.nan_steps):
            raise ValueError("fault.nan_at_step and fault.nan_steps go together (both >= 1)")

    @property
    def enabled(self) -> bool:
        return bool(self.at_step or self.storage_errors or self.storage_error_rate or self.nan_at_step
                    or self.await_commit_step)


class FaultInjector:
    """Fires the configured faults on `rank`; every method is a no-op when nothing is configured."""

    def __init__(self, cfg: FaultConfig, *, rank: int, run_dir_url: str, seed: int = 0):
        self.cfg, self.rank, self.run_dir_url = cfg, rank, run_dir_url
        self._nan_fired = 0
        # Salted with the pid: a restarted attempt must not replay the exact failures that ended the last one.
        self._storage_rng = random.Random(f"{seed}-{rank}-{os.getpid()}-storage")  # noqa: S311 - test faults

    def before_step(self, step: int) -> None:
        """Call at the start of optimizer step `step` (1-based: the step about to be computed)."""
        c = self.cfg
        if c.await_commit_step and step == c.await_commit_step + 1:
            self._await_commit(c.await_commit_step)
        if not c.at_step or step != c.at_step:
            return
        if self.rank == c.kill_rank and self._claim("kill"):
            log.error("fault injection: rank %d SIGKILLs itself before step %d", self.rank, step)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.rank == c.hang_rank and self._claim("hang"):
            log.error("fault injection: rank %d hangs before step %d", self.rank, step)
            while True:  # the watchdog or the peers' collective timeout ends this process
                time.sleep(3600)
        if self.rank == c.comm_error_rank and self._claim("comm_error"):
            raise torch.distributed.DistBackendError(
                f"fault injection: simulated communication backend failure on rank {self.rank} at step {step}")

    def nan_this_step(self, step: int) -> bool:
        """True for the first `nan_steps` optimizer-step attempts at or after `nan_at_step` in this process
        (a skipped step is attempted again with the next data, and counts again)."""
        c = self.cfg
        if c.nan_at_step and step >= c.nan_at_step and self._nan_fired < c.nan_steps:
            self._nan_fired += 1
            return True
        return False

    @staticmethod
    def poison(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch with NaN action targets: the loss and the gradients become NaN, as with a corrupt sample."""
        return {**batch, "actions": torch.full_like(batch["actions"], float("nan"))}

    def maybe_storage_error(self, what: str) -> None:
        """Raise OSError for the first `storage_errors` calls of this rank in the run (markers under faults/
        count them across restarts), then with probability `storage_error_rate`."""
        c = self.cfg
        counted = any(self._claim(f"storage_error_{k}") for k in range(c.storage_errors)
                      if not self._exists(f"storage_error_{k}"))
        if counted or (c.storage_error_rate and self._storage_rng.random() < c.storage_error_rate):
            raise OSError(f"fault injection: simulated storage error while {what}")

    def _await_commit(self, step: int, timeout_s: float = 120.0) -> None:
        from checkpoints.retention import committed_checkpoints

        name = f"checkpoint_{step:09d}"
        deadline = time.monotonic() + timeout_s
        while name not in committed_checkpoints(self.run_dir_url):
            if time.monotonic() > deadline:
                raise TimeoutError(f"fault injection: {name} was not committed within {timeout_s:.0f} s")
            time.sleep(0.05)
        log.info("fault injection: rank %d saw %s committed before step %d", self.rank, name, step + 1)

    # --- once-per-run markers ----------------------------------------------------------------------------

    def _marker(self, name: str) -> tuple[object, str]:
        name = f"{name}_rank{self.rank}_step{self.cfg.at_step}"
        return storage.resolve(storage.join(self.run_dir_url, "faults", name))

    def _exists(self, name: str) -> bool:
        fs, path = self._marker(name)
        return fs.exists(path)

    def _claim(self, name: str) -> bool:
        """Write the marker first, so a fault that kills the process is still recorded; False if already fired."""
        fs, path = self._marker(name)
        if fs.exists(path):
            return False
        storage.write_bytes_atomic(fs, path, json.dumps({"time": time.time(), "pid": os.getpid()}).encode())
        return True
