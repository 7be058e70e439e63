"""`data shard` and the serving export on full, read-only or forbidden storage: one line naming the file that
could not be written, no traceback, no temp file or partial file left behind, and the next run (with space
again) finishes from what was kept. A real full filesystem (a small tmpfs, mounted as root as CI runs) plus
OSErrors injected into the writer for the errnos a tmpfs cannot produce."""

from __future__ import annotations

import errno
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoints.export import STATE_FILE, publish_staged
from data_loaders import storage
from data_loaders.sharder import shard_dataset
from data_loaders.storage_errors import FOREIGN_TEMP_GRACE_S, StorageWriteError, temp_name
from data_loaders.synth import synthesize

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FRAMES, SPS = 40, 16


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("src") / "ds")
    synthesize(out, tasks=[0], episodes_per_task=2, frames=FRAMES, seed=1, resolution="low")
    return out


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs: the shards of one episode do not fit. Needs root (CI runs as root); anywhere else the
    test fails with the reason instead of silently skipping the only real full-disk check."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0777", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {mnt} ({done.stderr.strip() or done.returncode}): this test needs "
                    "root (as in CI) to create a real full filesystem")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _temp_files(root) -> list[str]:
    return glob.glob(f"{root}/**/.tmp-*", recursive=True)


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_shard_onto_a_full_disk_is_one_line_then_resumes(src, small_fs):
    out = small_fs / "shards"
    cmd = [sys.executable, "-m", "trainer", "data", "shard", src, str(out), "--workers", "2",
           "--samples-per-shard", str(SPS)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr
    (line,) = _error_lines(done.stderr)
    assert line.startswith(f"error: cannot write {out}/"), line
    assert "no space left on the storage (ENOSPC); free space" in line, line
    assert _temp_files(out) == [], "temp files of the failed writes must be removed"
    assert not (out / "manifest.json").exists()

    # Space again: the re-run keeps what was written and finishes.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 2 * FRAMES and _temp_files(out) == []


def test_export_onto_a_full_disk_leaves_no_partial_file(tmp_path, small_fs):
    staging = tmp_path / "staging"
    (staging / "fast_tokenizer").mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(os.urandom(400 * 1024))  # larger than the filesystem
    (staging / "config.json").write_text("{}")
    (staging / "fast_tokenizer" / "tokenizer.json").write_text("{}")
    out = small_fs / "export"
    with pytest.raises(StorageWriteError) as e:
        publish_staged(str(staging), str(out), step=7)
    assert str(e.value).startswith(f"cannot write {out}/model.safetensors: no space left on the storage (ENOSPC)")
    assert "\n" not in str(e.value)
    assert not (out / "model.safetensors").exists() and not (out / STATE_FILE).exists()
    assert _temp_files(small_fs) == []


def test_export_staging_on_a_full_disk_is_one_line(small_fs):
    import torch

    from checkpoints.export import export_artifact

    staging = small_fs / "staging"
    staging.mkdir()
    with pytest.raises(StorageWriteError) as e:  # safetensors raises its own type: still classified by errno
        export_artifact(str(small_fs / "unused"), state_dict={"w": torch.zeros(200_000)}, model_config_name="x",
                        model_config=None, train_config={}, norm_stats_url="", fast_tokenizer_url="", step=1,
                        keep_copy_in=str(staging))
    assert str(e.value).startswith(f"cannot write the export's local staging copy at {staging}: no space left")


# --- injected failures (no mount needed) -------------------------------------------------------------------


def _failing_fsync(monkeypatch, code: int, *, after: int = 0) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) > after:
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    return calls


@pytest.mark.parametrize("code,reason", [
    (errno.ENOSPC, "no space left on the storage (ENOSPC)"),
    (errno.EDQUOT, "the storage quota is exceeded (EDQUOT)"),
    (errno.EROFS, "the storage is read-only (EROFS)"),
    (errno.EACCES, "permission denied (EACCES)"),
])
def test_permanent_write_errors_are_not_retried_and_leave_no_temp_file(tmp_path, monkeypatch, code, reason):
    calls = _failing_fsync(monkeypatch, code)
    fs, path = storage.resolve(str(tmp_path / "out" / "x.json"))
    with pytest.raises(StorageWriteError) as e:
        storage.with_retries(lambda: storage.write_bytes_atomic(fs, path, b"{}"), what="writing x.json",
                             base_delay_s=0)
    assert str(e.value).startswith(f"cannot write {path}: {reason}; "), str(e.value)
    assert len(calls) == 1, "a full, read-only or forbidden storage must not be retried"
    assert os.listdir(tmp_path / "out") == []


def test_transient_errors_are_still_retried(tmp_path, monkeypatch):
    calls = _failing_fsync(monkeypatch, errno.EIO, after=0)
    fs, path = storage.resolve(str(tmp_path / "x.json"))
    with pytest.raises(OSError, match="failed after 3 attempts") as e:
        storage.with_retries(lambda: storage.write_bytes_atomic(fs, path, b"{}"), what="w", attempts=3,
                             base_delay_s=0)
    assert not isinstance(e.value, StorageWriteError) and len(calls) == 3
    assert _temp_files(tmp_path) == []


def test_shard_with_enospc_injected_in_the_parent_cleans_up(src, tmp_path, monkeypatch):
    # The settings record is the parent's first write; ENOSPC there must be one StorageWriteError too.
    _failing_fsync(monkeypatch, errno.ENOSPC)
    out = tmp_path / "shards"
    with pytest.raises(StorageWriteError, match=r"cannot write .*_parts/settings\.json: no space left"):
        shard_dataset(src, str(out), workers=1, samples_per_shard=SPS, progress=False)
    assert _temp_files(out) == []


def test_export_with_enospc_mid_copy_leaves_no_partial_file(tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"x" * 1000)
    out = tmp_path / "export"
    publish_staged(str(staging), str(out), step=1)  # an earlier, complete export at the same place
    real = storage.shutil.copyfileobj

    def half_then_full(fsrc, fdst, length=0):
        fdst.write(fsrc.read(10))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.shutil, "copyfileobj", half_then_full)
    with pytest.raises(StorageWriteError, match="model.safetensors: no space left"):
        publish_staged(str(staging), str(out), step=2)
    monkeypatch.setattr(storage.shutil, "copyfileobj", real)
    # The old state.json is withdrawn before files are replaced: the mix is never taken for a complete export.
    assert not (out / STATE_FILE).exists()
    assert sorted(os.listdir(out)) == ["model.safetensors"] and (out / "model.safetensors").read_bytes() == b"x" * 1000


# --- sweeping temp files of writers that are gone ----------------------------------------------------------


def test_sweep_removes_only_temp_files_of_writers_that_are_gone(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.05)
        now = time.time()
        ours = temp_name("a.tar")  # this host, this process
        files = {
            "dead_writer": temp_name("b.tar").replace(f"-{os.getpid()}-", f"-{dead.pid}-", 1),
            "live_writer": temp_name("c.tar").replace(f"-{os.getpid()}-", f"-{live.pid}-", 1),
            "foreign_recent": ".tmp-deadbeef-12-" + "0" * 32 + "-d.tar",
            "foreign_old": ".tmp-deadbeef-13-" + "0" * 32 + "-e.tar",
            "new_since_start": ours.replace("a.tar", "f.tar"),
            "earlier_run_of_this_process": ours,
        }
        mtimes = {"dead_writer": now - 5, "live_writer": now - 0.01, "foreign_recent": now - 60,
                  "foreign_old": now - FOREIGN_TEMP_GRACE_S - 60, "new_since_start": now + 1,
                  "earlier_run_of_this_process": now - 5}
        for key, name in files.items():
            (tmp_path / name).write_bytes(b"partial")
            os.utime(tmp_path / name, (mtimes[key], mtimes[key]))
        (tmp_path / "shard-00000000-0000.tar").write_bytes(b"done")
        fs, path = storage.resolve(str(tmp_path))
        removed = {os.path.basename(p) for p in storage.sweep_stale_temp_files(fs, path, started_at=now)}
        assert removed == {files[k] for k in ("dead_writer", "foreign_old", "earlier_run_of_this_process")}
        assert sorted(os.listdir(tmp_path)) == sorted(
            [files[k] for k in ("live_writer", "foreign_recent", "new_since_start")] + ["shard-00000000-0000.tar"])
    finally:
        live.kill()
        live.wait()


def test_next_shard_run_sweeps_a_killed_writers_temp_file(src, tmp_path):
    out = tmp_path / "shards"
    (out / "_parts").mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = out / temp_name("shard-00000000-0000.tar").replace(f"-{os.getpid()}-", f"-{dead.pid}-", 1)
    stale.write_bytes(b"half a shard")
    os.utime(stale, (time.time() - 30, time.time() - 30))
    shard_dataset(src, str(out), workers=1, samples_per_shard=SPS, progress=False)
    assert _temp_files(out) == [] and (out / "manifest.json").exists()
