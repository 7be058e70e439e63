"""Turn one source episode into webdataset shards plus its episode record (the per-job work of the sharder).

Files under OUT (all written with storage.write_bytes_atomic, so a killed writer leaves each path either absent
or complete; a failed write removes its temp file, and a full, read-only or forbidden OUT raises
storage.StorageWriteError at once instead of being retried):

    shard-{episode:08d}-{part:04d}.tar   frames [part*S, min((part+1)*S, T)) of the episode, S = samples_per_shard
    _parts/episode_{episode:08d}.json    written after every shard of the episode: their names, sizes and sha256
    _parts/skipped_{episode:08d}.json    a bad episode left out under on_bad_episode="skip", with the reason
    _parts/settings.json                 the settings and source of the conversion (written by sharder.py)

A shard without an episode record is a leftover of a killed run: it is never listed and gets rewritten (with
identical bytes, since encoding and tar layout are deterministic) when its episode is converted again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Iterator

import numpy as np
from fsspec import AbstractFileSystem

from data_loaders import storage
from data_loaders.behavior_facts import (
    ACTION_HORIZON,
    CAMERAS,
    MODEL_IMAGE_SIZE,
    SKILL_INDEX,
    TASK_NUM_STAGES,
    stage_label,
)
from data_loaders.episode import DatasetError, Episode, EpisodeSource
from data_loaders.manifest import write_tar
from data_loaders.sample_format import (
    DEFAULT_IMAGE_FORMAT,
    DEFAULT_IMAGE_QUALITY,
    IMAGE_FORMATS,
    encode_sample,
    sample_key,
)

PARTS_DIR = "_parts"
SETTINGS_NAME = "settings.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardSettings:
    """Everything that changes the bytes of the shards; recorded in `_parts/settings.json` and the manifest."""

    samples_per_shard: int = 512
    """Samples (timesteps) per tar; an episode's last shard holds the remainder, shards never span episodes."""
    image_format: str = DEFAULT_IMAGE_FORMAT
    """One of sample_format.IMAGE_FORMATS."""
    quality: int = DEFAULT_IMAGE_QUALITY
    """JPEG/WebP quality 1..100 (ignored by PNG but still recorded)."""
    image_size: int = MODEL_IMAGE_SIZE
    """Square side the source resizes every camera frame to."""

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {self.image_format!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")

    def to_json(self) -> dict[str, Any]:
        """The manifest's `settings` object (action_horizon is fixed by the sample format, recorded for readers)."""
        return {**dataclasses.asdict(self), "action_horizon": ACTION_HORIZON}


def shard_name(episode_index: int, part: int) -> str:
    return f"shard-{episode_index:08d}-{part:04d}.tar"


def record_path(out_path: str, episode_index: int) -> str:
    return storage.join(out_path, PARTS_DIR, f"episode_{episode_index:08d}.json")


def skipped_path(out_path: str, episode_index: int) -> str:
    return storage.join(out_path, PARTS_DIR, f"skipped_{episode_index:08d}.json")


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON for the files under `_parts/` (identical content gives identical bytes)."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def action_chunk(actions: np.ndarray, frame: int, horizon: int = ACTION_HORIZON) -> tuple[np.ndarray, np.ndarray]:
    """actions[frame:frame+horizon] with steps past the episode end repeating the last action, and the mask
    that is True exactly where the step exists in the episode."""
    steps = frame + np.arange(horizon)
    length = actions.shape[0]
    return actions[np.minimum(steps, length - 1)], steps < length


def sample_meta(episode: Episode, frame: int) -> dict[str, Any]:
    """The meta.json of the sample at `frame`: position, task, time-based stage and the annotated skill.

    Skill fields describe the annotation segment covering `frame`; outside every segment (or without
    annotations) skill_id/skill_index are -1. A skill id absent from behavior_facts.SKILLS keeps its raw id but
    gets skill_index -1 and skill_valid False, so classifiers never see an out-of-range class.
    """
    length, task = episode.length, episode.task_index
    seg = episode.skill_at(frame)
    skill_id = seg.skill_id if seg is not None else -1
    skill_index = SKILL_INDEX.get(skill_id, -1)
    return {
        "episode": episode.episode_index,
        "frame": frame,
        "timestamp": float(episode.timestamps[frame]),
        "episode_length": length,
        "task": task,
        "stage": int(stage_label(frame, length, task)),
        "num_stages": TASK_NUM_STAGES[task],
        "skill_id": skill_id,
        "skill_index": skill_index,
        "skill_valid": skill_index >= 0,
        "skill_description": seg.description if seg is not None else "",
        "skill_objects": list(seg.object_ids) if seg is not None else [],
    }


def _check_images(images: dict[str, np.ndarray], *, size: int, where: str) -> None:
    for cam in CAMERAS:
        img = images.get(cam)
        if img is None or img.shape != (size, size, 3) or img.dtype != np.uint8:
            got = None if img is None else (img.shape, str(img.dtype))
            raise ValueError(f"{where}: the source yielded camera {cam!r} as {got}, expected uint8 "
                             f"({size}, {size}, 3); this is a bug in the episode source")


def _write_shard(fs: AbstractFileSystem, out_path: str, episode_index: int, part: int, first_frame: int,
                 samples: list[tuple[str, dict[str, bytes]]]) -> dict[str, Any]:
    # The tar bytes come from webdataset's TarWriter (manifest.write_tar); its ShardWriter does not fit here: it
    # numbers shards across one stream (ours are per episode and part, so parallel jobs and re-runs agree on
    # names), writes each file straight to its final name (a killed writer would leave a truncated tar there,
    # where ours publishes atomically) and opens URLs through gopen, which has no s3://.
    name = shard_name(episode_index, part)
    data = write_tar(samples)
    storage.with_retries(lambda: storage.write_bytes_atomic(fs, storage.join(out_path, name), data),
                         what=f"writing shard {name}")
    return {"name": name, "num_samples": len(samples), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "episode_index": episode_index, "first_frame": first_frame}


def convert_episode(source: EpisodeSource, fs: AbstractFileSystem, out_path: str, episode_index: int,
                    settings: ShardSettings, *, on_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write every shard of one episode, then its record; return the record.

    The videos are decoded once, front to back, and a shard is written as soon as it fills, so memory holds
    at most one shard of encoded samples. `on_shard(num_samples)` is called after each shard is stored.
    Raises DatasetError when the source is inconsistent (including videos shorter or longer than the parquet);
    shards already written for such an episode have no record and are therefore ignored.
    """
    where = f"{source.url}: episode {episode_index}"
    episode = source.read_episode(episode_index)
    length = episode.length
    if length == 0:
        raise DatasetError(f"{where}: the episode has no frames; delete it from the dataset or use "
                           f"--on-bad-episode skip")
    frames: Iterator[dict[str, np.ndarray]] = iter(source.iter_rgb_frames(episode_index, size=settings.image_size))
    shards: list[dict[str, Any]] = []
    batch: list[tuple[str, dict[str, bytes]]] = []
    try:
        for t in range(length):
            images = next(frames, None)
            if images is None:
                raise DatasetError(f"{where}: the RGB videos end after {t} frames but the parquet has {length} "
                                   f"rows; re-encode the videos or use --on-bad-episode skip")
            _check_images(images, size=settings.image_size, where=where)
            chunk, mask = action_chunk(episode.actions, t)
            batch.append((sample_key(episode_index, t), encode_sample(
                images=images, state=episode.state[t], actions=chunk, action_mask=mask,
                meta=sample_meta(episode, t), image_format=settings.image_format, quality=settings.quality)))
            if len(batch) == settings.samples_per_shard or t == length - 1:
                shards.append(_write_shard(fs, out_path, episode_index, len(shards), t + 1 - len(batch), batch))
                if on_shard is not None:
                    on_shard(len(batch))
                batch = []
        # Frame i must be the image at timestamp i/30; extra video frames mean that pairing cannot be trusted.
        if next(frames, None) is not None:
            raise DatasetError(f"{where}: the RGB videos have more frames than the {length} parquet rows; "
                               f"re-encode the videos or use --on-bad-episode skip")
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()  # releases the video containers of a generator stopped early
    record = {"episode_index": episode_index, "task_index": episode.task_index, "length": length, "shards": shards}
    storage.with_retries(lambda: storage.write_bytes_atomic(fs, record_path(out_path, episode_index),
                                                            json_bytes(record)),
                         what=f"writing the record of episode {episode_index}")
    return record


def write_skipped(fs: AbstractFileSystem, out_path: str, episode_index: int, reason: str) -> dict[str, Any]:
    """Record that a bad episode is left out (on_bad_episode="skip"); returns the manifest entry."""
    entry = {"episode_index": episode_index, "reason": reason}
    storage.with_retries(lambda: storage.write_bytes_atomic(fs, skipped_path(out_path, episode_index),
                                                            json_bytes(entry)),
                         what=f"writing the skip record of episode {episode_index}")
    return entry
