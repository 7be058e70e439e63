"""Sample transforms shared by training and serving (pi_behavior §2.2-2.3, §2.7).

Input side: delta actions on the DELTA_ACTION_MASK dims w.r.t. the current state (same s_t for all 30 steps),
zero-pad to 32, per-timestep z-score with the [30, 32] stats; state z-scored with global stats and padded to 32.
Output side (serving): unnormalize, add the *unnormalized* state back on the delta dims, truncate to 23.
Normalization stats come from norm_stats.json, which travels inside every checkpoint. Constant coordinates
(stored std < CONSTANT_STD) normalise to exactly 0 and un-normalise to exactly their mean.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
from PIL import Image

from data_loaders.augment import AugmentConfig, augment_cameras
from data_loaders.behavior_facts import (
    ACTION_DIM,
    ACTION_HORIZON,
    DELTA_ACTION_MASK,
    MODEL_DIM,
    SKILL_INDEX,
    STATE_DIM,
)
from data_loaders.norm_stats import is_constant

NORM_EPS = 1e-6  # (x - mean) / (std + eps), as in the reference implementation


def pad_last(x: np.ndarray, dim: int = MODEL_DIM) -> np.ndarray:
    """Zero-pad the last axis to `dim`."""
    if x.shape[-1] > dim:
        raise ValueError(f"cannot pad last axis of size {x.shape[-1]} to {dim}")
    pad = [(0, 0)] * (x.ndim - 1) + [(0, dim - x.shape[-1])]
    return np.pad(x, pad)


def to_delta(actions: np.ndarray, state: np.ndarray) -> np.ndarray:
    """Absolute (..., H, 23) actions -> deltas w.r.t. state (..., 23) on the delta dims."""
    out = np.array(actions, dtype=np.float32, copy=True)
    out[..., DELTA_ACTION_MASK] -= np.asarray(state, np.float32)[..., None, DELTA_ACTION_MASK]
    return out


def to_absolute(delta: np.ndarray, state: np.ndarray) -> np.ndarray:
    """Inverse of to_delta."""
    out = np.array(delta, dtype=np.float32, copy=True)
    out[..., DELTA_ACTION_MASK] += np.asarray(state, np.float32)[..., None, DELTA_ACTION_MASK]
    return out


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """z-score normalisation of state (global) and delta actions (per timestep), padded to MODEL_DIM."""

    state_mean: np.ndarray  # (23,)
    state_std: np.ndarray  # (23,)
    action_mean: np.ndarray  # (30, 32) per-timestep, padded dims 0
    action_std: np.ndarray  # (30, 32) per-timestep, padded dims 1

    def __post_init__(self) -> None:
        shapes = {"state_mean": (STATE_DIM,), "state_std": (STATE_DIM,),
                  "action_mean": (ACTION_HORIZON, MODEL_DIM), "action_std": (ACTION_HORIZON, MODEL_DIM)}
        for name, shape in shapes.items():
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(f"norm stats {name} has shape {np.shape(getattr(self, name))}, expected {shape}")

    @classmethod
    def from_norm_stats(cls, stats: Any) -> "Normalizer":
        """Build from a data_loaders.norm_stats.NormStats."""
        return cls(np.asarray(stats.state_mean, np.float32), np.asarray(stats.state_std, np.float32),
                   np.asarray(stats.per_timestep_mean, np.float32), np.asarray(stats.per_timestep_std, np.float32))

    def state(self, state: np.ndarray) -> np.ndarray:
        """Raw (..., 23) -> normalised, padded (..., 32); constant dims give 0."""
        z = (np.asarray(state, np.float32) - self.state_mean) / (self.state_std + NORM_EPS)
        z = np.where(is_constant(self.state_std), np.float32(0.0), z)
        return pad_last(z.astype(np.float32))

    def actions(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Absolute (..., 30, 23) + raw state (..., 23) -> normalised padded deltas (..., 30, 32); constant
        coordinates give 0."""
        d = pad_last(to_delta(actions, state))
        z = (d - self.action_mean) / (self.action_std + NORM_EPS)
        return np.where(is_constant(self.action_std), np.float32(0.0), z).astype(np.float32)

    def unnormalize_actions(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Normalised (..., 30, 32) model output + raw state (..., 23) -> absolute (..., 30, 23).

        Constant coordinates get exactly their mean (then the state on delta dims), whatever the model output.
        """
        d = np.asarray(actions, np.float32) * (self.action_std + NORM_EPS) + self.action_mean
        d = np.where(is_constant(self.action_std), self.action_mean, d).astype(np.float32)
        return to_absolute(d[..., :ACTION_DIM], state)


def decode_jpeg_like(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", img.size)
    return img.convert("RGB")


@dataclasses.dataclass(frozen=True)
class SampleTransform:
    """Decoded shard sample (images still encoded) -> model-ready numpy fields.

    With a normalizer: state (32,), actions (30, 32) normalised padded deltas. Without: raw state (23,) and
    absolute actions (30, 23) -- used for statistics and round-trip checks. `augment` is None outside training.
    """

    normalizer: Normalizer | None = None
    augment: AugmentConfig | None = None
    # Optional FAST tokenizer (models.pi_behavior.fast.FastTokenizer): adds the auxiliary targets
    # fast_tokens / fast_mask (max_fast_tokens,) computed from the raw delta chunk.
    fast_tokenizer: Any | None = None
    max_fast_tokens: int = 200

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        images = [decode_jpeg_like(b) if isinstance(b, bytes) else Image.fromarray(b) for b in sample["images"]]
        if self.augment is not None:
            if rng is None:
                raise ValueError("augmentation needs a random generator")
            images = augment_cameras(images, rng, self.augment)
        meta = sample["meta"]
        state = sample["state"]
        if self.normalizer is not None:
            model_state = self.normalizer.state(state)
            actions = self.normalizer.actions(sample["actions"], state)
        else:
            model_state, actions = state.astype(np.float32), sample["actions"].astype(np.float32)
        skill_id = int(meta["skill_id"])
        extra: dict[str, Any] = {}
        if self.fast_tokenizer is not None:
            from models.pi_behavior.fast import to_model_tokens

            ids = self.fast_tokenizer.encode(to_delta(sample["actions"], state))
            tokens, mask = to_model_tokens([ids], max_len=self.max_fast_tokens)
            extra = {"fast_tokens": tokens[0], "fast_mask": mask[0]}
        return extra | {
            "images": np.stack([np.asarray(im, dtype=np.uint8) for im in images]),
            "state": model_state,
            "actions": actions,
            "action_mask": sample["action_mask"].astype(bool),
            "task": np.int64(meta["task"]),
            "stage": np.int64(meta["stage"]),
            "skill": np.int64(SKILL_INDEX.get(skill_id, -1) if meta["skill_valid"] else -1),
            "skill_valid": np.bool_(meta["skill_valid"]),
            "episode": np.int64(meta["episode"]),
            "frame": np.int64(meta["frame"]),
            "timestamp": np.float64(meta["timestamp"]),
        }
