"""`b1k-train data synth`: write a small synthetic dataset structurally identical to BEHAVIOR-1K 2025 demos.

Layout, file names, meta documents, parquet schema and video encodings follow
`behavior-1k/2025-challenge-demos` (behavior_data_and_protocol.md §1); the content is a learnable goal-reaching
task described in synth_content.py. Output is deterministic for a seed: parquet and JSON bytes are identical
across runs and videos decode to identical frames. Each episode depends only on (seed, episode_index), so
generating more tasks or episodes never changes the ones already generated.

The dataset is written to a local staging directory first and published at the end (a rename for local
output, an fsspec upload for s3://), so a failed run never leaves a half-written OUT behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from data_loaders import behavior_facts as bf
from data_loaders import storage, synth_meta, synth_render
from data_loaders.synth_content import EpisodeContent, generate_episode
from data_loaders.synth_plan import MAX_INSTANCES, instance_ids
from data_loaders.video_encode import DEPTH_SPEC, SEG_SPEC, VideoSpec, VideoWriter, rgb_spec

RESOLUTIONS: dict[str, dict[str, int]] = {
    "full": dict(bf.FULL_RESOLUTION),  # as recorded: head 720x720, wrists 480x480
    "low": {"head": 128, "left_wrist": 96, "right_wrist": 96},  # same structure, fast enough for tests
}
LAYOUTS = ("b1k", "lerobot-v2.1", "lerobot-v3.0")
MIN_FRAMES = bf.ACTION_HORIZON + 1  # one full 30-step action chunk after the first observation


@dataclasses.dataclass(frozen=True)
class SynthReport:
    """What `synthesize` wrote."""

    out: str
    layout: str
    episode_indices: tuple[int, ...]
    num_tasks: int
    num_frames: int
    num_videos: int
    num_bytes: int
    elapsed_s: float

    @property
    def num_episodes(self) -> int:
        return len(self.episode_indices)

    def __str__(self) -> str:
        return (f"synthesized {self.num_episodes} episodes of {self.num_tasks} tasks ({self.num_frames} frames, "
                f"{self.num_videos} videos, {self.num_bytes / 1e6:.1f} MB) in the {self.layout} layout at "
                f"{self.out} in {self.elapsed_s:.1f} s")


def synthesize(out: str, *, tasks: list[int], episodes_per_task: int, frames: int, seed: int,
               resolution: str = "low", layout: str = "b1k", codec: str = "hevc",
               overwrite: bool = False) -> SynthReport:
    """Write a synthetic BEHAVIOR-1K 2025 dataset to `out` (local path, file:// or s3://).

    Args:
        tasks: task ids (0-49) to generate episodes for.
        episodes_per_task: episodes per task, each on a distinct pseudo-random scene instance.
        frames: frames per episode (30 fps), at least MIN_FRAMES.
        seed: episode content and instance ids are a pure function of it.
        resolution: "full" (720/480 as recorded) or "low" (128/96).
        layout: "b1k" (the 2025 layout) or a plain LeRobot layout converted by data_loaders.layouts.
        codec: RGB codec, "hevc" (as recorded), "av1" or "h264"; depth and seg are always HEVC.
        overwrite: replace an existing non-empty `out` (only after the new dataset is complete).
    """
    _validate(tasks, episodes_per_task, frames, seed, resolution, layout)
    rgb_spec(codec)  # fail on a bad codec before touching OUT
    fs, path = storage.resolve(out)
    local = storage.is_local(fs)
    if _exists_nonempty(fs, path, local):
        if not overwrite:
            what = "a file" if local and os.path.isfile(path) else "not empty"
            raise ValueError(f"output {out} already exists and is {what}; pass --overwrite to replace it, or give "
                             "another output directory")
        cwd, target = os.path.realpath(os.getcwd()), os.path.realpath(path)
        if local and (cwd == target or cwd.startswith(target.rstrip("/") + "/")):
            raise ValueError(f"refusing to overwrite {out}: it contains the current directory; pick a dataset "
                             "directory below it")
    start = time.perf_counter()
    # Stage next to a local OUT so publishing is a rename on the same filesystem.
    staging_parent = os.path.dirname(os.path.abspath(path)) if local else None
    if staging_parent:
        os.makedirs(staging_parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".b1k-synth-", dir=staging_parent) as tmp:
        b1k_dir = os.path.join(tmp, "b1k")
        episodes, num_frames = write_b1k_dataset(
            b1k_dir, tasks=sorted(tasks), episodes_per_task=episodes_per_task, frames=frames, seed=seed,
            sizes=RESOLUTIONS[resolution], codec=codec)
        final_dir = b1k_dir
        if layout != "b1k":
            from data_loaders.layouts import convert_b1k_dataset

            final_dir = os.path.join(tmp, layout)
            convert_b1k_dataset(b1k_dir, final_dir, layout)
        written = [os.path.join(d, f) for d, _, files in os.walk(final_dir) for f in files]
        num_bytes = sum(os.path.getsize(f) for f in written)
        num_videos = sum(f.endswith(".mp4") for f in written)  # per layout: v3.0 concatenates episodes
        _publish(final_dir, fs, path, local)
    return SynthReport(out=out, layout=layout, episode_indices=tuple(episodes), num_tasks=len(tasks),
                       num_frames=num_frames, num_videos=num_videos,
                       num_bytes=num_bytes, elapsed_s=time.perf_counter() - start)


def _validate(tasks: list[int], episodes_per_task: int, frames: int, seed: int, resolution: str, layout: str) -> None:
    if not tasks:
        raise ValueError("no tasks given: pass task ids such as --tasks 0,1,40")
    bad = [t for t in tasks if not 0 <= t < bf.NUM_TASKS]
    if bad:
        raise ValueError(f"task ids {bad} are out of range: BEHAVIOR-1K 2025 task ids are 0..{bf.NUM_TASKS - 1}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task ids {tasks} contain duplicates: list each task once")
    if not 1 <= episodes_per_task <= MAX_INSTANCES:
        raise ValueError(f"episodes_per_task must be in 1..{MAX_INSTANCES} (one per scene instance), "
                         f"got {episodes_per_task}")
    if frames < MIN_FRAMES:
        raise ValueError(f"frames must be >= {MIN_FRAMES} (an observation plus one {bf.ACTION_HORIZON}-step action "
                         f"chunk), got {frames}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {resolution!r}: choose one of {sorted(RESOLUTIONS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose one of {list(LAYOUTS)}")


def write_b1k_dataset(root: str, *, tasks: list[int], episodes_per_task: int, frames: int, seed: int,
                      sizes: dict[str, int], codec: str = "hevc") -> tuple[list[int], int]:
    """Write the b1k-layout dataset into the local directory `root`; returns (episode indices, total frames)."""
    spec = rgb_spec(codec)
    plan = [(t, i) for t in tasks for i in instance_ids(seed, t, episodes_per_task)]
    episode_rows, stats_rows, indices, total = [], [], [], 0
    for task_id, instance in tqdm(plan, desc="synth episodes", unit="ep", file=sys.stderr):
        content = generate_episode(task_id, instance, frames, seed)
        _write_episode(root, content, sizes, spec)
        episode_rows.append(synth_meta.episodes_row(content))
        stats_rows.append(synth_meta.episodes_stats_row(content))
        indices.append(content.episode_index)
        total += content.length
    # As in the real 2025 dataset, tasks.jsonl lists all 50 tasks whichever have episodes, and total_tasks counts
    # its lines (not the tasks synthesized).
    task_rows = synth_meta.tasks_rows()
    info = synth_meta.info_json(num_episodes=len(indices), num_frames=total, num_tasks=len(task_rows), sizes=sizes,
                                rgb_codec=spec.encoder)
    storage.write_json_file(os.path.join(root, "meta", "info.json"), info)
    storage.write_jsonl_file(os.path.join(root, "meta", "tasks.jsonl"), task_rows)
    storage.write_jsonl_file(os.path.join(root, "meta", "episodes.jsonl"), episode_rows)
    storage.write_jsonl_file(os.path.join(root, "meta", "episodes_stats.jsonl"), stats_rows)
    return indices, total


def _write_episode(root: str, content: EpisodeContent, sizes: dict[str, int], rgb: VideoSpec) -> None:
    ep, T = content.episode_index, content.length
    table = pd.DataFrame({
        "index": np.arange(T, dtype=np.int64),  # per-episode frame index, as the real generator writes it
        "episode_index": np.full(T, ep, dtype=np.int64),
        "task_index": np.full(T, content.world.task_id, dtype=np.int64),
        "timestamp": np.arange(T, dtype=np.float64) / bf.FPS,
        "observation.state": list(content.proprio),
        "observation.cam_rel_poses": list(content.cam_rel_poses),
        "action": list(content.action),
        "observation.task_info": list(content.task_info),
    })
    data_path = os.path.join(root, synth_meta.episode_path(synth_meta.DATA_PATH, ep))
    os.makedirs(os.path.dirname(data_path), exist_ok=True)
    table.to_parquet(data_path, index=False)

    specs = {"rgb": rgb, "depth": DEPTH_SPEC, "seg_instance_id": SEG_SPEC}
    for cam in bf.INFO_CAMERA_ORDER:
        size = sizes[cam]
        renderer = synth_render.CameraRenderer(content, cam, size)
        with contextlib.ExitStack() as stack:
            writers = []
            for modality in bf.MODALITIES:  # one pass over the frames feeds the camera's three videos
                key = bf.video_key(modality, cam)
                path = os.path.join(root, synth_meta.episode_path(synth_meta.VIDEO_PATH, ep, video_key=key))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                writers.append(stack.enter_context(VideoWriter(
                    path, width=size, height=size, spec=specs[modality],
                    input_format="gray16le" if modality == "depth" else "rgb24")))
            for t in range(T):
                for writer, frame in zip(writers, renderer.frame(t), strict=True):
                    writer.write(frame)

    storage.write_json_file(os.path.join(root, synth_meta.episode_path(synth_meta.METAINFO_PATH, ep)),
                synth_meta.episode_metainfo(content))
    storage.write_json_file(os.path.join(root, synth_meta.episode_path(synth_meta.ANNOTATION_PATH, ep)),
                synth_meta.annotation(content))



def _exists_nonempty(fs: Any, path: str, local: bool) -> bool:
    if local:
        return os.path.isfile(path) or (os.path.isdir(path) and bool(os.listdir(path)))
    fs.invalidate_cache(path)
    try:
        return bool(fs.ls(path, detail=False))
    except FileNotFoundError:
        return False


def _publish(src_dir: str, fs: Any, path: str, local: bool) -> None:
    """Replace `path` by the finished dataset in `src_dir` (emptiness/overwrite was checked up front)."""
    if local:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        os.replace(src_dir, path)
        return
    fs.invalidate_cache(path)
    try:
        old = fs.ls(path, detail=False)
    except FileNotFoundError:
        old = []
    for entry in old:  # children only: `path` may be a bucket root, which must survive
        fs.rm(entry, recursive=True)
    local_files = sorted(os.path.join(d, f) for d, _, files in os.walk(src_dir) for f in files)
    remote = [storage.join(path, os.path.relpath(f, src_dir).replace(os.sep, "/")) for f in local_files]
    storage.with_retries(lambda: fs.put(local_files, remote), what=f"upload to {path}")
