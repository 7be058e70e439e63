"""Builds small, real shard sets (tars + manifest) straight from arrays, for loader and stats tests.

The bytes follow data_loaders.sample_format / manifest exactly; only the episode content is made up here
(the end-to-end path from a synthetic BEHAVIOR dataset is covered by the sharder's own tests).
"""

from __future__ import annotations

import hashlib

import numpy as np

from data_loaders import manifest as mf
from data_loaders import storage
from data_loaders.behavior_facts import ACTION_DIM, ACTION_HORIZON, STATE_DIM, TASK_NUM_STAGES, stage_label
from data_loaders.sample_format import encode_sample, sample_key


def make_episode(rng: np.random.Generator, length: int) -> dict[str, np.ndarray]:
    t = np.arange(length, dtype=np.float32)[:, None]
    state = (np.sin(t / 7.0 + rng.normal(size=STATE_DIM)) + 0.1 * rng.normal(size=(length, STATE_DIM)))
    actions = state + 0.05 * np.cos(t / 5.0) + 0.01 * rng.normal(size=(length, ACTION_DIM))
    actions[:, 6] = 0.25  # a constant dim, like trunk joint 4 in the real data
    return {"state": state.astype(np.float32), "actions": actions.astype(np.float32)}


def build_shards(url: str, *, lengths: list[int], samples_per_shard: int, seed: int = 0, image_size: int = 16,
                 tasks: list[int] | None = None) -> dict:
    """Write shards + manifest.json for episodes of the given lengths to `url`; return the raw manifest."""
    rng = np.random.default_rng(seed)
    fs, root = storage.resolve(url)
    shards, episodes = [], []
    for e, length in enumerate(lengths):
        task = (tasks or [0, 1, 40])[e % len(tasks or [0, 1, 40])]
        ep_index = task * 10000 + e * 10
        ep = make_episode(rng, length)
        samples = []
        for f in range(length):
            idx = np.minimum(np.arange(f, f + ACTION_HORIZON), length - 1)
            images = {cam: rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
                      for cam in ("head", "left_wrist", "right_wrist")}
            meta = {"episode": ep_index, "frame": f, "timestamp": f / 30.0, "episode_length": length, "task": task,
                    "stage": stage_label(f, length, task), "num_stages": TASK_NUM_STAGES[task],
                    "skill_id": 2 if f < length // 2 else -1, "skill_index": 1 if f < length // 2 else -1,
                    "skill_valid": f < length // 2, "skill_description": "pick up from" if f < length // 2 else "",
                    "skill_objects": []}
            files = encode_sample(images=images, state=ep["state"][f], actions=ep["actions"][idx],
                                  action_mask=np.arange(f, f + ACTION_HORIZON) < length, meta=meta,
                                  image_format="jpeg", quality=90)
            samples.append((sample_key(ep_index, f), files))
        names = []
        for part, start in enumerate(range(0, length, samples_per_shard)):
            data = mf.write_tar(samples[start:start + samples_per_shard])
            name = f"shard-{ep_index:08d}-{part:04d}.tar"
            storage.write_bytes_atomic(fs, storage.join(root, name), data)
            shards.append({"name": name, "num_samples": len(samples[start:start + samples_per_shard]),
                           "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                           "episode_index": ep_index, "first_frame": start})
            names.append(name)
        episodes.append({"episode_index": ep_index, "task_index": task, "length": length, "shards": names})
    raw = {"format": mf.FORMAT_NAME, "version": mf.FORMAT_VERSION,
           "settings": {"samples_per_shard": samples_per_shard, "image_format": "jpeg", "quality": 90,
                        "image_size": image_size, "action_horizon": ACTION_HORIZON},
           "source": {"url": "test://factory", "layout": "b1k-v2.1", "codebase_version": "v2.1", "fps": 30},
           "tasks": {"0": "task zero", "1": "task one", "40": "task forty"},
           "num_samples": sum(lengths), "num_episodes": len(lengths), "episodes": episodes, "shards": shards,
           "skipped_episodes": []}
    storage.write_bytes_atomic(fs, storage.join(root, mf.MANIFEST_NAME), mf.manifest_to_bytes(raw))
    return raw
