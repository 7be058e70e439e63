"""Rewrite a BEHAVIOR-layout ("b1k-v2.1") dataset into stock LeRobot v2.1 or v3.0 layout.

Used to produce test data for the stock layouts from the synthetic BEHAVIOR generator, so all three layouts can be
read and compared on identical content. What changes:
- episodes are renumbered 0..N-1 in source order (stock LeRobot indexes episode meta by position), task indices
  stay the BEHAVIOR task ids and the tasks file lists all 50 tasks so position == task_index;
- parquet gains `frame_index` (0..T-1) and a global `index`; all source columns (incl. float64 timestamps) are
  kept unchanged;
- stock layouts carry no annotations; per-episode stats cover the fixed-width float features.
v2.1 copies each episode's mp4 files; v3.0 decodes them and re-encodes each video key's episodes back to back into
one file (a new file once `video_files_size_in_mb` of source video is exceeded), recording [from, to) timestamps.
"""

from __future__ import annotations

import math
import os
import shutil
from fractions import Fraction
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_loaders import storage, video_decode
from data_loaders.behavior_facts import FPS, NUM_TASKS, TASK_INSTRUCTIONS
from data_loaders.episode import DatasetError
from data_loaders.lerobot_source import LeRobotSource

STOCK_LAYOUTS = ("lerobot-v2.1", "lerobot-v3.0")
CHUNKS_SIZE = 1000
V21_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V30_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V30_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V30_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DATA_FILE_MB, VIDEO_FILE_MB = 100, 500  # LeRobot v3.0 defaults
# LeRobot's own per-frame bookkeeping columns (`DEFAULT_FEATURES`).
BOOKKEEPING_FEATURES = {
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
STATS_FEATURES = ("action", "observation.state", "observation.cam_rel_poses")
# info.json key order as LeRobot writes it (`create_empty_dataset_info` of each version).
V21_INFO_KEYS = ("codebase_version", "robot_type", "total_episodes", "total_frames", "total_tasks", "total_videos",
                 "total_chunks", "chunks_size", "fps", "splits", "data_path", "video_path", "features")
V30_INFO_KEYS = ("codebase_version", "robot_type", "total_episodes", "total_frames", "total_tasks", "chunks_size",
                 "data_files_size_in_mb", "video_files_size_in_mb", "fps", "splits", "data_path", "video_path",
                 "features")
COLOR_OPTIONS = {"preset": "veryfast", "crf": "10"}
DEPTH_OPTIONS = {"preset": "ultrafast", "x265-params": "lossless=1:log-level=none"}


def _stats(values: np.ndarray) -> dict[str, list]:
    return {"min": values.min(0).tolist(), "max": values.max(0).tolist(), "mean": values.mean(0).tolist(),
            "std": values.std(0).tolist(), "count": [int(values.shape[0])]}


def _aggregate(per_episode: list[dict[str, list]]) -> dict[str, list]:
    """Pool per-episode stats: weighted mean, and std from the pooled second moment (as LeRobot aggregates)."""
    n = np.array([s["count"][0] for s in per_episode], dtype=np.float64)[:, None]
    mean = np.array([s["mean"] for s in per_episode])
    second = np.array([s["std"] for s in per_episode]) ** 2 + mean**2
    total_mean = (n * mean).sum(0) / n.sum()
    total_std = np.sqrt(np.maximum((n * second).sum(0) / n.sum() - total_mean**2, 0.0))
    return {"min": np.min([s["min"] for s in per_episode], 0).tolist(),
            "max": np.max([s["max"] for s in per_episode], 0).tolist(),
            "mean": total_mean.tolist(), "std": total_std.tolist(), "count": [int(n.sum())]}


def _episode_stats(table: pa.Table) -> dict[str, dict[str, list]]:
    out = {}
    for name in STATS_FEATURES:
        if name in table.column_names:
            col = table.column(name).combine_chunks()
            values = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float64)
            out[name] = _stats(values.reshape(table.num_rows, -1))
    return out



def _stock_table(table: pa.Table, *, episode_index: int, task_index: int, first_index: int) -> pa.Table:
    """Source rows with LeRobot bookkeeping: frame_index, renumbered episode_index, global index, task_index."""
    n = table.num_rows
    if "frame_index" in table.column_names:
        table = table.sort_by("frame_index")
    keep = [c for c in table.column_names if c not in BOOKKEEPING_FEATURES]
    # Drop pandas' schema metadata: it describes the source columns and would mislead pandas readers.
    out = table.select(keep).replace_schema_metadata(None)
    for name, values in (("frame_index", np.arange(n)), ("episode_index", np.full(n, episode_index)),
                         ("index", np.arange(first_index, first_index + n)), ("task_index", np.full(n, task_index))):
        out = out.append_column(name, pa.array(values, pa.int64()))
    return out


def _video_keys(src: LeRobotSource, episodes: list[int]) -> list[str]:
    """Video features of the source that have a file for every episode (the generator may omit depth/seg)."""
    keys = []
    for key, feat in src.info["features"].items():
        if feat.get("dtype") != "video":
            continue
        present = [os.path.exists(_src_video(src, key, ep)) for ep in episodes]
        if all(present):
            keys.append(key)
        elif any(present):
            missing = _src_video(src, key, episodes[present.index(False)])
            raise DatasetError(f"video {missing} is missing while other episodes have {key}; regenerate the source")
    return keys


def _src_video(src: LeRobotSource, key: str, ep: int) -> str:
    chunk = ep // int(src.info.get("chunks_size", CHUNKS_SIZE))
    rel = src.info["video_path"].format(episode_chunk=chunk, video_key=key, episode_index=ep)
    return os.path.join(src.url, rel)


def convert_b1k_dataset(src_dir: str, out_dir: str, layout: str) -> None:
    """Write the b1k-layout dataset at local `src_dir` to local `out_dir` in stock `layout` (see module docstring).

    `out_dir` must not exist or be empty. The result reads back through `LeRobotSource` with identical proprio,
    actions, timestamps and (within codec loss for v3.0) RGB frames.
    """
    if layout not in STOCK_LAYOUTS:
        raise ValueError(f"layout must be one of {STOCK_LAYOUTS}, got {layout!r}")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} is not empty; remove it or pick another output directory")
    src = LeRobotSource(src_dir)
    if src.layout != "b1k-v2.1":
        raise ValueError(f"{src_dir} is in layout {src.layout!r}; convert_b1k_dataset expects 'b1k-v2.1'")
    source_tasks = src.task_instructions()
    tasks = [source_tasks.get(i, TASK_INSTRUCTIONS[i]) for i in range(NUM_TASKS)]
    refs = src.episodes()
    keys = _video_keys(src, [r.episode_index for r in refs])
    tables, stats, first = [], [], 0
    for new_ep, ref in enumerate(refs):
        table = pq.read_table(os.path.join(src_dir, src.data_file(ref.episode_index)))
        tables.append(_stock_table(table, episode_index=new_ep, task_index=ref.task_index, first_index=first))
        stats.append(_episode_stats(table))
        first += table.num_rows
    info = dict(src.info)
    features = {k: v for k, v in src.info["features"].items() if v.get("dtype") != "video" or k in keys}
    features.update({k: v for k, v in BOOKKEEPING_FEATURES.items() if k not in features})
    info.update(total_episodes=len(refs), total_frames=first, total_tasks=NUM_TASKS, chunks_size=CHUNKS_SIZE,
                splits={"train": f"0:{len(refs)}"}, features=features)
    os.makedirs(out_dir, exist_ok=True)
    if layout == "lerobot-v2.1":
        _write_v21(src, out_dir, info, tasks, refs, keys, tables, stats)
    else:
        _write_v30(src, out_dir, info, tasks, refs, keys, tables, stats)


def _write_v21(src: LeRobotSource, out: str, info: dict, tasks: list[str], refs: list, keys: list[str],
               tables: list[pa.Table], stats: list[dict]) -> None:
    for new_ep, (ref, table) in enumerate(zip(refs, tables)):
        chunk = new_ep // CHUNKS_SIZE
        path = os.path.join(out, V21_DATA_PATH.format(episode_chunk=chunk, episode_index=new_ep))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(table, path)
        for key in keys:
            dst = os.path.join(out, V21_VIDEO_PATH.format(episode_chunk=chunk, video_key=key, episode_index=new_ep))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(_src_video(src, key, ref.episode_index), dst)
    info.update(codebase_version="v2.1", total_videos=len(refs) * len(keys),
                total_chunks=math.ceil(len(refs) / CHUNKS_SIZE), data_path=V21_DATA_PATH,
                video_path=V21_VIDEO_PATH if keys else None)
    storage.write_json_file(os.path.join(out, "meta/info.json"), {k: info.get(k) for k in V21_INFO_KEYS})
    storage.write_jsonl_file(os.path.join(out, "meta/tasks.jsonl"),
                             [{"task_index": i, "task": t} for i, t in enumerate(tasks)])
    storage.write_jsonl_file(os.path.join(out, "meta/episodes.jsonl"), [
        {"episode_index": i, "tasks": [tasks[r.task_index]], "length": r.length} for i, r in enumerate(refs)])
    storage.write_jsonl_file(os.path.join(out, "meta/episodes_stats.jsonl"),
                 [{"episode_index": i, "stats": s} for i, s in enumerate(stats)])


def _file_groups(sizes: list[int], limit_bytes: int) -> list[tuple[int, int]]:
    """(chunk_index, file_index) per item, starting a new file once the current one holds over `limit_bytes`."""
    out, file_idx, used = [], 0, 0
    for size in sizes:
        if used and used + size > limit_bytes:
            file_idx, used = file_idx + 1, 0
        out.append((file_idx // CHUNKS_SIZE, file_idx % CHUNKS_SIZE))
        used += size
    return out


def _reencode(src: LeRobotSource, key: str, episodes: list[int], lengths: list[int], dst: str) -> None:
    """Decode `episodes`' videos of `key` and encode them back to back into `dst` (frame counts must match rows).

    Decoded frames go to the encoder in their native pixel format (no RGB round trip). Colour videos become
    H.264 at CRF 10 with B-frames, close to the source but still a lossy, reordered stream like real v3.0 files;
    depth stays lossless 10-bit HEVC because its values are quantised metres.
    """
    depth = ".depth." in key
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with av.open(dst, mode="w", format="mp4") as out:
        stream = out.add_stream("libx265" if depth else "libx264", rate=FPS)
        stream.options = dict(DEPTH_OPTIONS if depth else COLOR_OPTIONS)
        n_out = 0
        for ep, length in zip(episodes, lengths):
            path = _src_video(src, key, ep)
            n = 0
            with video_decode.open_video(path) as container:
                for frame in container.decode(container.streams.video[0]):
                    if n_out == 0:
                        stream.width, stream.height, stream.pix_fmt = frame.width, frame.height, frame.format.name
                    frame.pts, frame.time_base = n_out, Fraction(1, FPS)
                    frame.pict_type = av.video.frame.PictureType.NONE  # let the encoder choose frame types
                    out.mux(stream.encode(frame))
                    n, n_out = n + 1, n_out + 1
            if n != length:
                raise DatasetError(f"video {path} has {n} frames but its parquet has {length} rows; fix the source")
        out.mux(stream.encode(None))


def _write_v30(src: LeRobotSource, out: str, info: dict, tasks: list[str], refs: list, keys: list[str],
               tables: list[pa.Table], stats: list[dict]) -> None:
    import pandas as pd  # LeRobot stores tasks as a pandas frame indexed by task text; pandas ships with ray

    fps = int(info["fps"])
    rows: list[dict[str, Any]] = [
        {"episode_index": i, "tasks": [tasks[r.task_index]], "length": r.length} for i, r in enumerate(refs)]
    data_files = _file_groups([t.nbytes for t in tables], DATA_FILE_MB * 2**20)
    first = 0
    for i, (table, (chunk, file)) in enumerate(zip(tables, data_files)):
        rows[i].update({"data/chunk_index": chunk, "data/file_index": file, "dataset_from_index": first,
                        "dataset_to_index": first + table.num_rows})
        first += table.num_rows
    for chunk, file in sorted(set(data_files)):
        path = os.path.join(out, V30_DATA_PATH.format(chunk_index=chunk, file_index=file))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # One row group per episode, so readers can skip to an episode by row-group statistics.
        with pq.ParquetWriter(path, tables[0].schema) as writer:
            for table, where in zip(tables, data_files):
                if where == (chunk, file):
                    writer.write_table(table.cast(tables[0].schema))
    for key in keys:
        sources = [_src_video(src, key, r.episode_index) for r in refs]
        video_files = _file_groups([os.path.getsize(p) for p in sources], VIDEO_FILE_MB * 2**20)
        for where in sorted(set(video_files)):
            members = [i for i, w in enumerate(video_files) if w == where]
            offset = 0.0
            for i in members:  # from/to are seconds inside the shared file, as LeRobot v3.0 records them
                rows[i].update({f"videos/{key}/chunk_index": where[0], f"videos/{key}/file_index": where[1],
                                f"videos/{key}/from_timestamp": offset,
                                f"videos/{key}/to_timestamp": offset + refs[i].length / fps})
                offset += refs[i].length / fps
            dst = os.path.join(out, V30_VIDEO_PATH.format(video_key=key, chunk_index=where[0], file_index=where[1]))
            _reencode(src, key, [refs[i].episode_index for i in members], [refs[i].length for i in members], dst)
        written = video_decode.probe(os.path.join(out, V30_VIDEO_PATH.format(video_key=key, chunk_index=0,
                                                                             file_index=0)))
        feature_info = dict(info["features"][key].get("info", {}))
        feature_info.update({"video.codec": written.codec, "video.pix_fmt": written.pix_fmt, "video.fps": float(fps)})
        info["features"][key] = {**info["features"][key], "info": feature_info}
    for i, s in enumerate(stats):
        for feature, values in s.items():
            rows[i].update({f"stats/{feature}/{name}": v for name, v in values.items()})
        rows[i].update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
    episodes_path = os.path.join(out, V30_EPISODES_PATH.format(chunk_index=0, file_index=0))
    os.makedirs(os.path.dirname(episodes_path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), episodes_path)
    pd.DataFrame({"task_index": range(len(tasks))}, index=tasks).to_parquet(os.path.join(out, "meta/tasks.parquet"))
    for k, feat in info["features"].items():
        if feat.get("dtype") != "video":
            info["features"][k] = {**feat, "fps": fps}
    info.update(codebase_version="v3.0", fps=fps, data_files_size_in_mb=DATA_FILE_MB,
                video_files_size_in_mb=VIDEO_FILE_MB, data_path=V30_DATA_PATH,
                video_path=V30_VIDEO_PATH if keys else None)
    storage.write_json_file(os.path.join(out, "meta/info.json"), {k: info.get(k) for k in V30_INFO_KEYS})
    features = sorted({f for s in stats for f in s})
    storage.write_json_file(os.path.join(out, "meta/stats.json"),
                {f: _aggregate([s[f] for s in stats if f in s]) for f in features})
