"""Failures a run survives, on a real local Ray cluster with 2 gloo workers: a SIGKILLed worker, flaky S3
uploads, a rank hung in a collective, a rank hung outside one (watchdog), a communication-backend error, NaN
losses, and a lost node with elastic 2 -> 1 -> 2 workers. Each run finishes by itself; with the same worker
count its final weights equal an uninterrupted run's bit for bit."""

from __future__ import annotations

import collections
import json
import os
import time

import pytest
import torch

from checkpoints.manager import read_train_state
from checkpoints.retention import committed_checkpoints
from tests.fit_support import assert_same_weights, debug_config, exported_weights, prepare
from trainer.launch import fit
from trainer.recovery import read_audit

pytestmark = [pytest.mark.slow, pytest.mark.integration]
STEPS = 6
COMMON = ("strategy=ddp", "save_every=2", "resilience.upload_backoff_s=0.05", "data.audit=true")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, s3_endpoint):
    return prepare(tmp_path_factory.mktemp("faults"))


def config(prepared, *extra: str, steps: int = STEPS):
    return debug_config(prepared, *COMMON, *extra, steps=steps)


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    summary = fit(config(prepared), run_name="uninterrupted", storage_url=str(tmp_path_factory.mktemp("ref")),
                  num_workers=2)
    return exported_weights(summary["run_dir"])


def failures(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "failures.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_audit_complete(run_dir: str, *, steps: int, global_batch: int = 8) -> None:
    """Every step 1..steps recorded once with a full global batch, and no sample twice within an epoch."""
    audit = read_audit(run_dir)
    assert sorted(audit) == list(range(1, steps + 1))
    assert all(len(ids) == global_batch for ids in audit.values()), {s: len(v) for s, v in audit.items()}
    per_epoch = collections.Counter(pair for ids in audit.values() for pair in ids)
    assert max(per_epoch.values()) == 1, [p for p, n in per_epoch.items() if n > 1][:5]


def test_killed_worker_and_failing_s3_uploads(prepared, reference, s3_bucket):
    """Each rank's first 4 checkpoint upload tries to S3 fail: the step-2 upload gives up after 3 tries (the
    attempt fails and restarts from scratch), the next one succeeds on its second try. Then rank 1 SIGKILLs
    itself before step 5 and the run resumes from its last committed checkpoint. (Synchronous uploads make the
    order of the two failures deterministic; the other tests upload asynchronously.)"""
    from safetensors.torch import load

    from data_loaders import storage

    cfg = config(prepared, "fault.kill_rank=1", "fault.at_step=5", "fault.storage_errors=4",
                 "resilience.upload_retries=3", "resilience.async_checkpoint=false")
    summary = fit(cfg, run_name="killed", storage_url=s3_bucket, num_workers=2)
    assert read_train_state(summary["checkpoint"])["step"] == STEPS
    fs, path = storage.resolve(f"{summary['run_dir']}/failures.jsonl")
    log = [json.loads(line)["error"] for line in fs.cat_file(path).decode().splitlines()]
    assert len(log) == 2, log
    assert "upload of checkpoint_000000002" in log[0] and "failed 3 times" in log[0], log
    assert "upload" not in log[1], log  # the SIGKILL: a dead actor / peer, not storage
    # Nothing uncommitted is left behind that could look like a checkpoint.
    listed = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(storage.resolve(summary["run_dir"])[1])}
    assert {n for n in listed if n.startswith("checkpoint_0")} == set(committed_checkpoints(summary["run_dir"]))
    fs, export = storage.resolve(f"{summary['run_dir']}/export/model.safetensors")
    assert_same_weights(load(fs.cat_file(export)), reference)
    assert_audit_complete(summary["run_dir"], steps=STEPS)


def test_rank_hung_in_a_collective_times_out_and_restarts(prepared, reference, tmp_path):
    cfg = config(prepared, "fault.hang_rank=1", "fault.at_step=5", "resilience.collective_timeout_s=15",
                 "resilience.watchdog_s=0")
    t0 = time.monotonic()
    summary = fit(cfg, run_name="hung", storage_url=str(tmp_path), num_workers=2)
    log = failures(summary["run_dir"])
    assert len(log) == 1, log
    assert "timed out" in log[0]["error"].lower(), log  # gloo: "Timed out waiting 15000ms for recv"
    assert time.monotonic() - t0 < 300
    assert_same_weights(exported_weights(summary["run_dir"]), reference)
    assert_audit_complete(summary["run_dir"], steps=STEPS)


def test_watchdog_ends_a_rank_without_progress(prepared, reference, tmp_path):
    """The collective timeout is far away (10 min); the 20 s progress watchdog ends the stuck processes."""
    cfg = config(prepared, "fault.hang_rank=0", "fault.at_step=3", "resilience.collective_timeout_s=600",
                 "resilience.watchdog_s=20")
    summary = fit(cfg, run_name="watchdog", storage_url=str(tmp_path), num_workers=2)
    log = failures(summary["run_dir"])
    assert len(log) == 1, log
    assert_same_weights(exported_weights(summary["run_dir"]), reference)


def test_communication_backend_error_restarts(prepared, reference, tmp_path):
    cfg = config(prepared, "fault.comm_error_rank=0", "fault.at_step=4")
    summary = fit(cfg, run_name="comm", storage_url=str(tmp_path), num_workers=2)
    log = failures(summary["run_dir"])
    assert len(log) == 1 and "DistBackendError" in log[0]["error"], log
    assert_same_weights(exported_weights(summary["run_dir"]), reference)
    # The failed attempt flushed steps 1-3; the replay after the resume from step 2 does not log step 3 again.
    from mlflow import MlflowClient

    run_id = read_train_state(summary["checkpoint"])["tracking_run_id"]
    client = MlflowClient(f"sqlite:///{summary['run_dir']}/mlflow/mlflow.db")
    steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert steps == list(range(1, STEPS + 1)), steps


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_nan_steps_are_skipped_then_rolled_back(prepared, tmp_path, strategy):
    """Three NaN steps in a row from step 5 with a limit of 2: skip, skip -> roll back to step 4, skip, go on.
    (DeepSpeed skips a non-finite fp32 update itself; DDP/FSDP through our engine.)"""
    cfg = config(prepared, "fault.nan_at_step=5", "fault.nan_steps=3", "resilience.nan_max_consecutive=2",
                 "resilience.async_checkpoint=false", f"strategy={strategy}")
    summary = fit(cfg, run_name=f"nan-{strategy}", storage_url=str(tmp_path), num_workers=2)
    state = read_train_state(summary["checkpoint"])
    assert (state["step"], state["nonfinite_skipped"], state["nonfinite_rollbacks"]) == (STEPS, 3, 1)
    assert summary["metrics"]["nonfinite/skipped_steps"] == 3 and summary["metrics"]["nonfinite/rollbacks"] == 1
    weights = exported_weights(summary["run_dir"])
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not os.path.exists(os.path.join(summary["run_dir"], "failures.jsonl"))


def test_a_damaged_newest_checkpoint_is_skipped_and_the_older_one_used(prepared, reference, tmp_path):
    """A run stops at step 4 (checkpoints 2 and 4 committed); then the newest one's engine shard is replaced by a
    pickle that would create a marker file. Continuing the run to step 6 verifies checkpoint 4, skips it with one
    warning naming the file, marks it DAMAGED.json, resumes from step 2 and still ends bitwise equal to the
    uninterrupted run. Nothing is unpickled, and the replay does not write into the damaged directory."""
    from tests.hostile_files import plant_pickle

    marker = tmp_path / "MARKER"
    storage_url = str(tmp_path / "runs")
    first = fit(config(prepared, steps=4), run_name="damaged", storage_url=storage_url, num_workers=2)
    run_dir = first["run_dir"]
    assert committed_checkpoints(run_dir)[-2:] == ["checkpoint_000000002", "checkpoint_000000004"]
    newest = os.path.join(run_dir, "checkpoint_000000004")
    shard = next(os.path.join(d, n) for d, _, ns in os.walk(os.path.join(newest, "engine")) for n in ns
                 if n.endswith(".safetensors"))
    plant_pickle(shard, str(marker))
    summary = fit(config(prepared), run_name="damaged", storage_url=storage_url, num_workers=2)
    assert not marker.exists()
    assert read_train_state(summary["checkpoint"])["step"] == STEPS
    if os.path.exists(newest):  # unless Ray's retention has deleted it since
        with open(os.path.join(newest, "DAMAGED.json")) as f:
            assert ".safetensors: " in json.load(f)["problem"]
    assert not os.path.exists(os.path.join(run_dir, "failures.jsonl"))  # skipped, not failed
    assert_same_weights(exported_weights(run_dir), reference)
    assert_audit_complete(run_dir, steps=STEPS)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs: room for one debug checkpoint (about 10 MB) and the run's bookkeeping, not for two."""
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)  # noqa: S603,S607
    yield str(mount)
    subprocess.run(["umount", "-l", str(mount)], check=False)  # noqa: S603,S607


def test_full_storage_stops_the_run_with_one_line_and_keeps_the_last_checkpoint(prepared, small_disk):
    """ENOSPC is not retried as if transient: one attempt, one line naming the storage, and the committed
    checkpoint of step 2 stays intact (its integrity record verifies)."""
    from checkpoints import integrity
    from trainer.supervisor import RunFailedError

    # Checkpoint 2 is committed before step 3 (not left to the race between its async upload, the controller's
    # commit and checkpoint 4 filling the disk, which CI lost once under load).
    cfg = config(prepared, "resilience.upload_backoff_s=5", "keep_last=3", "fault.await_commit_step=2")
    t0 = time.monotonic()
    with pytest.raises(RunFailedError) as info:
        fit(cfg, run_name="full", storage_url=small_disk, num_workers=2)
    message = str(info.value)
    assert "\n" not in message and small_disk in message and "ENOSPC" in message, message
    assert "checkpoint_000000002, is intact" in message, message
    assert time.monotonic() - t0 < 120  # no 5 s, 10 s, 20 s ... backoff
    run_dir = os.path.join(small_disk, "full")
    assert committed_checkpoints(run_dir) == ["checkpoint_000000002"]
    assert integrity.verify(os.path.join(run_dir, "checkpoint_000000002"), 2) is None
