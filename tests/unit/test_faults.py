"""trainer/faults.py: faults fire once per run (markers survive a restart), NaN and storage-error counting."""

from __future__ import annotations

import pytest
import torch

from trainer.faults import FaultConfig, FaultInjector


def test_comm_error_fires_once_per_run_even_across_restarts(tmp_path):
    cfg = FaultConfig(at_step=3, comm_error_rank=1)
    first = FaultInjector(cfg, rank=1, run_dir_url=str(tmp_path))
    first.before_step(2)
    with pytest.raises(torch.distributed.DistBackendError, match="rank 1 at step 3"):
        first.before_step(3)
    FaultInjector(cfg, rank=1, run_dir_url=str(tmp_path)).before_step(3)  # the restarted process: no fault
    FaultInjector(cfg, rank=0, run_dir_url=str(tmp_path)).before_step(3)  # another rank: never
    assert (tmp_path / "faults" / "comm_error_rank1_step3").exists()


def test_storage_errors_count_per_rank_over_the_run(tmp_path):
    cfg = FaultConfig(storage_errors=2)
    inj = FaultInjector(cfg, rank=0, run_dir_url=str(tmp_path))
    with pytest.raises(OSError, match="simulated storage error while uploading x"):
        inj.maybe_storage_error("uploading x")
    again = FaultInjector(cfg, rank=0, run_dir_url=str(tmp_path))  # after a restart the count goes on
    with pytest.raises(OSError):
        again.maybe_storage_error("uploading y")
    again.maybe_storage_error("uploading z")
    with pytest.raises(OSError):
        FaultInjector(cfg, rank=1, run_dir_url=str(tmp_path)).maybe_storage_error("rank 1 has its own count")


def test_nan_steps_count_attempts_and_poison_the_targets(tmp_path):
    inj = FaultInjector(FaultConfig(nan_at_step=5, nan_steps=2), rank=0, run_dir_url=str(tmp_path))
    assert [inj.nan_this_step(s) for s in (4, 5, 5, 5, 6)] == [False, True, True, False, False]
    batch = {"state": torch.zeros(2, 32), "actions": torch.zeros(2, 30, 32)}
    poisoned = inj.poison(batch)
    assert torch.isnan(poisoned["actions"]).all() and torch.equal(poisoned["state"], batch["state"])


def test_fault_config_is_checked():
    with pytest.raises(ValueError, match="needs fault.at_step"):
        FaultConfig(kill_rank=1).check()
    with pytest.raises(ValueError, match="go together"):
        FaultConfig(nan_at_step=3).check()
    with pytest.raises(ValueError, match=r"storage_error_rate must be in \[0, 1\)"):
        FaultConfig(storage_error_rate=1.0)
    assert not FaultConfig().enabled and FaultConfig(storage_errors=1).enabled


def test_await_commit_waits_for_the_named_checkpoint_in_rays_snapshot(tmp_path):
    import threading
    import time

    inj = FaultInjector(FaultConfig(await_commit_step=2), rank=0, run_dir_url=str(tmp_path))
    inj.before_step(2)  # not the step after 2: returns at once
    snapshot = tmp_path / "checkpoint_manager_snapshot.json"

    def commit_later() -> None:
        time.sleep(0.5)
        snapshot.write_text('{"checkpoints": [{"path": "checkpoint_000000002"}]}')

    t0 = time.monotonic()
    threading.Thread(target=commit_later).start()
    inj.before_step(3)
    assert time.monotonic() - t0 >= 0.5
    snapshot.write_text('{"checkpoints": [{"path": "checkpoint_000000004"}]}')
    slow = FaultInjector(FaultConfig(await_commit_step=6), rank=0, run_dir_url=str(tmp_path))
    with pytest.raises(TimeoutError, match="checkpoint_000000006 was not committed within 0 s"):
        slow._await_commit(6, timeout_s=0.2)
