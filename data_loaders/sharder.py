"""`b1k-train data shard SRC OUT`: convert a LeRobot/BEHAVIOR dataset into webdataset shards and a manifest.

One sample per timestep (three 224x224 RGB images, the 23-d state, the 30-step future action chunk, meta.json;
see sample_format.py). One job = one episode, run in a process pool; shard_writer.py does the per-episode work
and documents the files under OUT.

Kill-safety and idempotence: every file is written atomically, an episode counts as done only once its record
exists and all the shards it lists exist with the recorded sizes, and `manifest.json` is assembled from the
records and written last. A killed conversion therefore never leaves anything that looks complete, and a re-run
converts only what is missing and produces the same manifest bytes as an uninterrupted run.

Full, read-only or forbidden storage stops the run with storage.StorageWriteError (one line naming the file);
a failed write removes its temp file, the temp files of the killed workers are swept at once, and every run
starts by sweeping temp files of writers that are gone (storage_errors.sweep_stale_temp_files).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import posixpath
import queue as queue_lib
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Iterator

from fsspec import AbstractFileSystem
from tqdm import tqdm

from data_loaders import manifest as manifest_lib
from data_loaders import storage
from data_loaders.episode import DatasetError, EpisodeRef, EpisodeSource
from data_loaders.sample_format import DEFAULT_IMAGE_FORMAT, DEFAULT_IMAGE_QUALITY
from data_loaders.shard_writer import (
    PARTS_DIR,
    SETTINGS_NAME,
    ShardSettings,
    convert_episode,
    json_bytes,
    write_skipped,
)

log = logging.getLogger(__name__)

BAD_EPISODE_POLICIES = ("error", "skip")


def shard_dataset(
    src: str,
    out: str,
    *,
    workers: int,
    samples_per_shard: int = 512,
    image_format: str = DEFAULT_IMAGE_FORMAT,
    quality: int = DEFAULT_IMAGE_QUALITY,
    on_bad_episode: str = "error",
    image_size: int = 224,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert every episode of `src` into shards under `out` and return the raw manifest (manifest.py layout).

    `out` may be a local path, file:// or s3:// (AWS_ENDPOINT_URL is honoured by botocore). Re-running resumes a
    killed conversion and converts only episodes without a valid record (episodes added to the source since are
    converted too); if `out` already holds a manifest with the same settings covering every source episode, it is
    returned without any work. The manifest bytes depend only on the source and the settings, never on `workers`
    or on interruptions.

    Raises ValueError for bad arguments or when `out` was started with different settings or another source, and
    the source's DatasetError (naming the file) for a bad episode unless on_bad_episode="skip", which leaves the
    episode out, records it in `_parts/skipped_*.json` and lists it, with the reason, in skipped_episodes.
    Recorded skips are kept by later "skip" runs and retried by "error" runs.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if on_bad_episode not in BAD_EPISODE_POLICIES:
        raise ValueError(f"on_bad_episode must be one of {BAD_EPISODE_POLICIES}, got {on_bad_episode!r}")
    settings = ShardSettings(samples_per_shard=samples_per_shard, image_format=image_format, quality=quality,
                             image_size=image_size)
    skip_bad = on_bad_episode == "skip"

    from data_loaders.lerobot_source import LeRobotSource  # heavy imports (pyarrow, av) only when used

    started_at = time.time()
    source = LeRobotSource(src)
    fs, out_path = storage.resolve(out)
    fs.invalidate_cache()  # another process (an earlier or killed run) may have written here since we last listed
    _sweep_temp_files(fs, out_path, started_at)  # left by a killed earlier run; never a live writer's
    wanted = {"settings": settings.to_json(), "source": {"url": source.url, "layout": source.layout}}
    existing = manifest_lib.read_manifest_fs(fs, out_path)
    _check_or_record_settings(fs, out_path, out, wanted, existing)
    refs = sorted(source.episodes(), key=lambda r: r.episode_index)
    if existing is not None and _is_complete(existing, refs, skip_bad=skip_bad):
        log.info("%s is already complete (%d samples); nothing to do", out, existing["num_samples"])
        return existing

    ref_ids = {r.episode_index for r in refs}
    records, skipped = _scan_parts(fs, out_path)
    records = {e: r for e, r in records.items() if e in ref_ids}
    skipped = {e: r for e, r in skipped.items() if e in ref_ids and e not in records} if skip_bad else {}
    todo = [r for r in refs if r.episode_index not in records and r.episode_index not in skipped]
    num_done = sum(s["num_samples"] for rec in records.values() for s in rec["shards"])
    total = num_done + sum(r.length for r in todo)
    log.info("%s: %d episodes, %d already converted, %d skipped, %d to convert with %d workers",
             src, len(refs), len(records), len(skipped), len(todo), min(workers, max(len(todo), 1)))

    start, num_new = time.monotonic(), 0
    bar = tqdm(total=total, initial=num_done, unit="sample", desc="shard", file=sys.stderr,
               disable=not progress, mininterval=0.5, smoothing=0.05)
    try:
        if todo:
            for result in _run_pool(src, out, settings, todo, workers=min(workers, len(todo)), skip_bad=skip_bad,
                                    bar=bar):
                if "record" in result:
                    records[result["episode_index"]] = result["record"]
                    num_new += sum(s["num_samples"] for s in result["record"]["shards"])
                else:
                    skipped[result["episode_index"]] = result["skipped"]
                    log.warning("skipped episode %d: %s", result["episode_index"], result["skipped"]["reason"])
    except BaseException:
        # The pool's workers are dead by now; temp files they were writing when killed go with them.
        _sweep_temp_files(fs, out_path, time.time())
        raise
    finally:
        bar.close()
    elapsed = time.monotonic() - start
    if todo:
        log.info("converted %d samples in %.1f s (%.1f samples/s)", num_new, elapsed, num_new / max(elapsed, 1e-9))

    raw = _assemble_manifest(source, wanted, refs, records, skipped)
    # The commit point: written last, so its presence means every listed shard is complete.
    storage.write_bytes_atomic(fs, storage.join(out_path, manifest_lib.MANIFEST_NAME),
                               manifest_lib.manifest_to_bytes(raw))
    return raw


def _sweep_temp_files(fs: AbstractFileSystem, out_path: str, started_at: float) -> None:
    removed = [p for d in (out_path, storage.join(out_path, PARTS_DIR))
               for p in storage.sweep_stale_temp_files(fs, d, started_at=started_at)]
    if removed:
        log.info("removed %d temp files of interrupted writers under %s", len(removed), out_path)


def _is_complete(existing: dict[str, Any], refs: list[EpisodeRef], *, skip_bad: bool) -> bool:
    """Whether a finished manifest already covers every source episode under the requested bad-episode policy.

    Under "error" a manifest that skipped episodes does not count (those episodes are retried); episodes added to
    the source since the manifest was written are converted incrementally.
    """
    covered = {e["episode_index"] for e in existing["episodes"]}
    skipped = {e["episode_index"] for e in existing["skipped_episodes"]}
    return bool(skip_bad or not skipped) and covered | skipped == {r.episode_index for r in refs}


def _check_or_record_settings(fs: AbstractFileSystem, out_path: str, out: str, wanted: dict[str, Any],
                              existing: dict[str, Any] | None) -> None:
    """Refuse to mix shards of different settings or sources in one OUT; record the settings on the first run."""
    spath = storage.join(out_path, PARTS_DIR, SETTINGS_NAME)
    recorded = json.loads(fs.cat_file(spath)) if fs.exists(spath) else None
    if recorded is None and existing is not None:
        recorded = {"settings": existing["settings"],
                    "source": {"url": existing["source"]["url"], "layout": existing["source"]["layout"]}}
    if recorded is None:
        storage.write_bytes_atomic(fs, spath, json_bytes(wanted))
        return
    if recorded != wanted:
        diff = {f"{group}.{k}": (recorded.get(group, {}).get(k), v)
                for group in ("settings", "source") for k, v in wanted[group].items()
                if recorded.get(group, {}).get(k) != v}
        raise ValueError(
            f"{out} holds a conversion with different settings or source (field: (recorded, requested)): {diff}; "
            f"re-run with the recorded settings, use a new OUT, or delete {out}")


def _scan_parts(fs: AbstractFileSystem, out_path: str) -> tuple[dict[int, dict], dict[int, dict]]:
    """Episode records whose shards all exist with the recorded sizes, and skip records, keyed by episode.

    Anything else under OUT (temp files of killed writers, shards without a record, records whose shards are
    missing or truncated) is ignored, which makes those episodes convert again.
    """
    sizes = {posixpath.basename(e["name"].rstrip("/")): e.get("size") for e in _ls(fs, out_path)}
    names = [e["name"] for e in _ls(fs, storage.join(out_path, PARTS_DIR)) if e.get("type") != "directory"]
    wanted = [n for n in names if posixpath.basename(n).startswith(("episode_", "skipped_"))
              and n.endswith(".json")]
    contents: dict[str, bytes] = fs.cat(wanted) if wanted else {}
    records: dict[int, dict] = {}
    skipped: dict[int, dict] = {}
    for path, data in sorted(contents.items()):
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            continue  # cannot happen with atomic writes; treat as absent rather than trust it
        if posixpath.basename(path).startswith("skipped_"):
            skipped[obj["episode_index"]] = obj
        elif all(sizes.get(s["name"]) == s["bytes"] for s in obj["shards"]):
            records[obj["episode_index"]] = obj
    return records, skipped


def _ls(fs: AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    try:
        return fs.ls(path, detail=True)
    except FileNotFoundError:
        return []


def _assemble_manifest(source: EpisodeSource, wanted: dict[str, Any], refs: list[EpisodeRef],
                       records: dict[int, dict], skipped: dict[int, dict]) -> dict[str, Any]:
    """The manifest as a pure function of the records, so interrupted and uninterrupted runs give equal bytes."""
    episodes, shards, skipped_out = [], [], []
    for ref in refs:
        ep = ref.episode_index
        if ep in records:
            rec = records[ep]
            episodes.append({"episode_index": ep, "task_index": rec["task_index"], "length": rec["length"],
                             "shards": [s["name"] for s in rec["shards"]]})
            shards.extend(rec["shards"])
        else:
            skipped_out.append({"episode_index": ep, "reason": skipped[ep]["reason"]})
    info = getattr(source, "info", {}) or {}
    return {
        "format": manifest_lib.FORMAT_NAME,
        "version": manifest_lib.FORMAT_VERSION,
        "settings": wanted["settings"],
        "source": {**wanted["source"], "codebase_version": info.get("codebase_version"),
                   "fps": getattr(source, "fps", None)},
        "tasks": {str(k): v for k, v in sorted(source.task_instructions().items())},
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_episodes": len(episodes),
        "episodes": episodes,
        "shards": shards,
        "skipped_episodes": skipped_out,
    }


# --- process pool ------------------------------------------------------------------------------------------


def _run_pool(src: str, out: str, settings: ShardSettings, todo: list[EpisodeRef], *, workers: int,
              skip_bad: bool, bar: tqdm) -> Iterator[dict[str, Any]]:
    """Convert `todo` in a spawn-context pool; yield one result per episode as it finishes.

    Spawn, not fork: every worker builds its own source and filesystem, so no fsspec/s3 client (with its
    threads and connection pools) crosses a fork. Workers report each stored shard through a queue for the
    progress bar. On any error (or KeyboardInterrupt) the workers are killed at once; that is safe because
    every file is written atomically.
    """
    ctx = multiprocessing.get_context("spawn")
    progress_q = ctx.Queue()
    lengths = {r.episode_index: r.length for r in todo}
    reported: dict[int, int] = {}
    finished_skipped: set[int] = set()

    def drain() -> None:
        while True:
            try:
                ep, n = progress_q.get_nowait()
            except queue_lib.Empty:
                return
            if ep not in finished_skipped:
                reported[ep] = reported.get(ep, 0) + n
                bar.update(n)

    ex = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(src, out, settings, progress_q, os.getpid()))
    try:
        pending: set[Future] = {ex.submit(_convert_one, r.episode_index, skip_bad) for r in todo}
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            drain()
            for fut in done:
                result = fut.result()  # re-raises a worker's exception, e.g. the source's DatasetError
                if "skipped" in result:
                    ep = result["episode_index"]
                    finished_skipped.add(ep)
                    bar.total -= lengths[ep]
                    bar.n -= reported.pop(ep, 0)
                    bar.refresh()
                yield result
        drain()
    except BaseException:
        _kill_workers(ex)
        raise
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        progress_q.close()


def _kill_workers(ex: ProcessPoolExecutor) -> None:
    # Python 3.14 has ProcessPoolExecutor.kill_workers(); before that the process table is only reachable
    # through the private `_processes`. Without this, shutdown() would wait for every running episode.
    kill = getattr(ex, "kill_workers", None)
    if kill is not None:
        kill()
        return
    for proc in list((getattr(ex, "_processes", None) or {}).values()):
        proc.kill()


_worker: dict[str, Any] = {}


def _init_worker(src: str, out: str, settings: ShardSettings, progress_q: Any, parent_pid: int) -> None:
    """Per-process setup. The source is built lazily by the first job so its errors reach the caller intact."""
    _exit_when_orphaned(parent_pid)
    fs, out_path = storage.resolve(out)
    _worker.update(src=src, fs=fs, out_path=out_path, settings=settings, progress_q=progress_q)


def _exit_when_orphaned(parent_pid: int) -> None:
    """Exit when the parent dies (e.g. SIGKILL): pool workers otherwise block on the task queue forever."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)  # a write in progress leaves at most a temp file or an unpublished upload

    threading.Thread(target=watch, name="orphan-watchdog", daemon=True).start()


def _convert_one(episode_index: int, skip_bad: bool) -> dict[str, Any]:
    """Pool job: convert one episode; under skip_bad a DatasetError becomes a skip record instead of an error."""
    if "source" not in _worker:
        from data_loaders.lerobot_source import LeRobotSource

        _worker["source"] = LeRobotSource(_worker["src"])
    fs, out_path, progress_q = _worker["fs"], _worker["out_path"], _worker["progress_q"]
    try:
        record = convert_episode(_worker["source"], fs, out_path, episode_index, _worker["settings"],
                                 on_shard=lambda n: progress_q.put((episode_index, n)))
    except DatasetError as e:
        if not skip_bad:
            raise
        return {"episode_index": episode_index, "skipped": write_skipped(fs, out_path, episode_index, str(e))}
    return {"episode_index": episode_index, "record": record}
