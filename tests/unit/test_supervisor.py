"""trainer/supervisor.py decisions, checkpoints/retention.py orphan sweep and trainer/watchdog.py, without
a cluster: failures are real Ray Train exception objects, storage is a local directory."""

from __future__ import annotations

import errno
import json
import os
import threading
import time

import pytest
from ray.train import WorkerGroupError

from checkpoints.retention import committed_checkpoints, copy_checkpoint, sweep_orphans
from trainer.config import ResilienceConfig
from trainer.supervisor import RunFailedError, check_worker_range, parse_workers, supervise
from trainer.watchdog import ProgressWatchdog


def crash(msg: str = "Connection closed by peer", exc: type[BaseException] = RuntimeError) -> WorkerGroupError:
    return WorkerGroupError(msg, {0: exc(msg)})


def flaky(errors: list[BaseException], result: str = "done"):
    calls = []

    def attempt(n: int) -> str:
        calls.append(n)
        if errors:
            raise errors.pop(0)
        return result

    return attempt, calls


def test_restarts_until_success_and_logs_each_failure(tmp_path):
    attempt, calls = flaky([crash(), crash("Timed out waiting 15000ms for recv")])
    swept = []
    assert supervise(attempt, run_dir_url=str(tmp_path), resilience=ResilienceConfig(),
                     before_attempt=lambda: swept.append(1)) == "done"
    assert calls == [1, 2, 3] and len(swept) == 3
    log = [json.loads(line) for line in open(tmp_path / "failures.jsonl")]
    assert [e["attempt"] for e in log] == [1, 2] and "Timed out" in log[1]["error"]


def test_deterministic_error_stops_at_once_naming_it(tmp_path):
    attempt, calls = flaky([crash("shard 3 sample 7: bad image bytes", ValueError)])
    with pytest.raises(RunFailedError, match=r"a restart would repeat(.|\n)*bad image bytes"):
        supervise(attempt, run_dir_url=str(tmp_path), resilience=ResilienceConfig())
    assert calls == [1]


def test_circuit_breaker_opens_on_too_many_failures_in_the_window(tmp_path):
    attempt, calls = flaky([crash(f"boom {i}") for i in range(10)])
    res = ResilienceConfig(max_failures_in_window=2, failure_window_s=600)
    with pytest.raises(RunFailedError, match=r"circuit breaker: 3 failures within 600 s(.|\n)*boom 2"):
        supervise(attempt, run_dir_url=str(tmp_path), resilience=res)
    assert calls == [1, 2, 3]


def test_old_failures_outside_the_window_do_not_count(tmp_path):
    old = [{"time": time.time() - 7200, "attempt": i, "error": "old"} for i in range(5)]
    (tmp_path / "failures.jsonl").write_text("".join(json.dumps(e) + "\n" for e in old))
    attempt, calls = flaky([crash()])
    res = ResilienceConfig(max_failures_in_window=1, failure_window_s=3600)
    assert supervise(attempt, run_dir_url=str(tmp_path), resilience=res) == "done"


def test_failures_of_an_earlier_invocation_do_not_use_up_this_ones_budget(tmp_path):
    """A user re-runs after fixing a cause: 5 failures a minute ago are history, not this invocation's budget."""
    recent = [{"time": time.time() - 60, "attempt": i, "error": "earlier run"} for i in range(5)]
    (tmp_path / "failures.jsonl").write_text("".join(json.dumps(e) + "\n" for e in recent) + "not json\n")
    attempt, calls = flaky([crash(), crash()])
    res = ResilienceConfig(max_failures_in_window=2, failure_window_s=3600)
    assert supervise(attempt, run_dir_url=str(tmp_path), resilience=res) == "done"
    assert calls == [1, 2, 3]
    log = [line for line in open(tmp_path / "failures.jsonl")]
    assert len(log) == 7  # the history stays; the damaged line is dropped


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   OSError(errno.EDQUOT, "Disk quota exceeded"),
                                   OSError(errno.EROFS, "Read-only file system")])
def test_full_or_read_only_storage_stops_at_once_with_one_line(tmp_path, error):
    attempt, calls = flaky([WorkerGroupError("upload", {0: error})])
    with pytest.raises(RunFailedError) as info:
        supervise(attempt, run_dir_url=str(tmp_path), resilience=ResilienceConfig())
    assert calls == [1]
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message and errno.errorcode[error.errno] in message, message
    assert "no checkpoint was committed yet" in message


def test_supervisor_survives_a_failure_log_it_cannot_write(tmp_path, capsys):
    """The failures.jsonl write hits a full disk: the supervisor says so once and carries on with the restart."""
    import data_loaders.storage as storage

    real = storage.write_bytes_atomic

    def full(fs, path, data):
        if path.endswith("failures.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fs, path, data)

    storage.write_bytes_atomic = full
    try:
        attempt, calls = flaky([crash()])
        assert supervise(attempt, run_dir_url=str(tmp_path), resilience=ResilienceConfig()) == "done"
    finally:
        storage.write_bytes_atomic = real
    assert calls == [1, 2]
    out = capsys.readouterr().out
    assert "could not record the failure (cannot write failures.jsonl at" in out and "ENOSPC" in out, out


def test_total_failure_budget(tmp_path):
    attempt, _ = flaky([crash() for _ in range(5)])
    res = ResilienceConfig(max_failures=2, max_failures_in_window=100)
    with pytest.raises(RunFailedError, match="failed 3 times"):
        supervise(attempt, run_dir_url=str(tmp_path), resilience=res)


def test_workers_spec_and_batch_divisibility():
    from trainer.overrides import apply_overrides
    from trainer.recipes import get_recipe

    assert parse_workers("3") == (3, 3) and parse_workers("2:8") == (2, 8) and parse_workers(2) == (2, 2)
    for bad in ("0", "3:2", "a:b"):
        with pytest.raises(ValueError, match="--workers"):
            parse_workers(bad)
    cfg = apply_overrides(get_recipe("pi_behavior_debug"), ["global_batch_size=8", "micro_batch_size=2"])
    check_worker_range(cfg, 1, 2)
    with pytest.raises(ValueError, match=r"cannot be split over \[3\] workers.*\[1, 2, 4\]"):
        check_worker_range(cfg, 2, 4)


def make_checkpoint(run: str, name: str) -> str:
    d = os.path.join(run, name)
    os.makedirs(os.path.join(d, "engine"))
    open(os.path.join(d, "engine", "shard.bin"), "wb").write(b"x" * 10)
    open(os.path.join(d, "train_state.json"), "w").write('{"step": 1}')
    return d


def test_sweep_removes_only_uncommitted_checkpoints(tmp_path):
    run = str(tmp_path)
    assert sweep_orphans(run) == []
    for s in (2, 4, 6):
        make_checkpoint(run, f"checkpoint_{s:09d}")
    os.makedirs(os.path.join(run, "kept", "step_000000002"))
    snapshot = {"checkpoints": [{"path": f"{run}/checkpoint_000000002"}, {"path": f"{run}/checkpoint_000000004"}]}
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    assert committed_checkpoints(run) == ["checkpoint_000000002", "checkpoint_000000004"]
    assert sweep_orphans(run) == ["checkpoint_000000006"]
    assert sorted(os.listdir(run)) == ["checkpoint_000000002", "checkpoint_000000004",
                                       "checkpoint_manager_snapshot.json", "kept"]


def test_copy_checkpoint_copies_everything(tmp_path):
    src = make_checkpoint(str(tmp_path), "checkpoint_000000004")
    copy_checkpoint(src, str(tmp_path / "kept" / "step_000000004"))
    assert open(tmp_path / "kept" / "step_000000004" / "engine" / "shard.bin", "rb").read() == b"x" * 10
    assert json.load(open(tmp_path / "kept" / "step_000000004" / "train_state.json")) == {"step": 1}


def test_watchdog_fires_without_beats_and_not_with_them():
    fired = threading.Event()
    messages = []

    def on_expire(message: str) -> None:
        messages.append(message)
        fired.set()

    dog = ProgressWatchdog(0.4, what="training on rank 0", on_expire=on_expire, poll_s=0.05)
    for _ in range(10):  # 1 s of regular progress
        time.sleep(0.1)
        dog.beat()
    assert not fired.is_set()
    assert fired.wait(2.0)
    assert "no training on rank 0 progress" in messages[0]
    dog.stop()
