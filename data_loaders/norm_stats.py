"""Normalization statistics of a shard set (`norm_stats.json`): what `b1k-train data stats` writes and the
model, the data transforms and serving read.

JSON layout (close to openpi's `norm_stats.json`, plus a `meta` block; every array is a nested list of floats
written with full float64 precision, so a save/load round trip is exact):

    {"norm_stats": {
        "state":   {"mean": [23], "std": [23], "q01": [23], "q99": [23], "min": [23], "max": [23]},
        "actions": {"mean": [23], "std": [23], "q01": [23], "q99": [23],
                    "per_timestamp_mean": [30][32], "per_timestamp_std": [30][32],
                    "action_correlation_cholesky": [960][960]}},
     "meta": {"format": "b1k-train-norm-stats", "version": 1, "num_frames", "num_chunks", "num_full_chunks",
              "sample_fraction", "seed", "manifest_sha256", "correlation_jitter", "constant_std"},
     "control": {"gripper_closure": {"frames": [50][15], "closed": [50][15][2], "statistic": "state_below",
                                     "closed_state": -0.98}}}

"control" is optional (data_loaders/gripper_stats.py): per task and stage, how often each gripper's state is fully
closed (below -0.98: closed on nothing) in the demonstrations, for the policy server's gripper rule.

Conventions (pi_behavior §2.2-2.4):
- "actions" are delta actions: a[t+k] - s[t] on DELTA_ACTION_MASK dims, absolute elsewhere.
- actions mean/std/q01/q99 are over single-step rows (every step of every used chunk, 23 dims);
  per_timestamp_* are over chunks per (step, dim), zero-padded from 23 to 32 dims.
- Padded dims 23..31 have per-timestamp mean 0 and std 1 (openpi's padding convention).
- Constant coordinates (std below CONSTANT_STD: the trunk dim 6, or a gripper that a small stats sample never sees
  move) store their measured ~0 std, as the reference does. data_loaders.transforms.Normalizer owns the rule for
  them: normalising gives exactly 0 (not (x - mean) * 1e6 for a value the stats sample did not contain) and
  un-normalising gives exactly the mean, whatever the model outputs there (the reference's (std + 1e-6) scale
  snaps to the mean too). The correlation gives such coordinates i.i.d. noise. Stats written before this rule
  stored std = 1 there; they still load, but their constant coordinates are not recognised (recompute them).
- state q01/q99 are true percentiles; the reference stores min/max under those names, so min/max are kept too.
- The correlation Cholesky factor L satisfies L @ L.T = C + jitter * I, with C the correlation of the flattened
  (30 * 32) delta chunk and identity rows/cols for constant coordinates (padded dims, dim 6).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from data_loaders import storage
from data_loaders.behavior_facts import ACTION_DIM, ACTION_HORIZON, MODEL_DIM, STATE_DIM
from data_loaders.gripper_stats import GripperClosure

FORMAT_NAME = "b1k-train-norm-stats"
FORMAT_VERSION = 1
NORM_STATS_NAME = "norm_stats.json"
CONSTANT_STD = 1e-6  # std below this = a constant coordinate (the reference's threshold, pi_behavior §2.4)
FLAT_DIM = ACTION_HORIZON * MODEL_DIM  # 960


def stored_std(std: np.ndarray) -> np.ndarray:
    """The std as stored: the measured one, constant coordinates included (see the module docstring)."""
    return np.asarray(std, dtype=np.float64)


std_or_one = stored_std  # the old name (constant coordinates used to store 1), still imported by stats.py


def is_constant(std: np.ndarray) -> np.ndarray:
    """True where a stored std marks a constant coordinate."""
    return np.asarray(std) < CONSTANT_STD


def _same_counts(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


# (section, json key, dataclass field, shape); the single source of truth for the JSON layout.
_ARRAYS: tuple[tuple[str, str, str, tuple[int, ...]], ...] = (
    ("state", "mean", "state_mean", (STATE_DIM,)),
    ("state", "std", "state_std", (STATE_DIM,)),
    ("state", "q01", "state_q01", (STATE_DIM,)),
    ("state", "q99", "state_q99", (STATE_DIM,)),
    ("state", "min", "state_min", (STATE_DIM,)),
    ("state", "max", "state_max", (STATE_DIM,)),
    ("actions", "mean", "action_mean", (ACTION_DIM,)),
    ("actions", "std", "action_std", (ACTION_DIM,)),
    ("actions", "q01", "action_q01", (ACTION_DIM,)),
    ("actions", "q99", "action_q99", (ACTION_DIM,)),
    ("actions", "per_timestamp_mean", "per_timestep_mean", (ACTION_HORIZON, MODEL_DIM)),
    ("actions", "per_timestamp_std", "per_timestep_std", (ACTION_HORIZON, MODEL_DIM)),
    ("actions", "action_correlation_cholesky", "action_correlation_cholesky", (FLAT_DIM, FLAT_DIM)),
)
_META: tuple[tuple[str, type], ...] = (
    ("num_frames", int), ("num_chunks", int), ("num_full_chunks", int), ("sample_fraction", float),
    ("seed", int), ("manifest_sha256", str), ("correlation_jitter", float),
)


@dataclasses.dataclass(frozen=True, eq=False)
class NormStats:
    """Validated, read-only normalization statistics; arrays are float64 and shaped as in the module docstring.

    Construction raises ValueError naming the offending field if a shape is wrong, a value is not finite, a std
    is not positive or the Cholesky factor is not lower triangular with a positive diagonal.
    """

    state_mean: np.ndarray
    state_std: np.ndarray
    state_q01: np.ndarray
    state_q99: np.ndarray
    state_min: np.ndarray
    state_max: np.ndarray
    action_mean: np.ndarray
    action_std: np.ndarray
    action_q01: np.ndarray
    action_q99: np.ndarray
    per_timestep_mean: np.ndarray
    per_timestep_std: np.ndarray
    action_correlation_cholesky: np.ndarray
    num_frames: int  # samples (frames) the state stats cover
    num_chunks: int  # full action chunks the action stats cover (after sample_fraction)
    num_full_chunks: int  # full action chunks in the shard set (before sample_fraction)
    sample_fraction: float
    seed: int
    manifest_sha256: str  # sha256 of the canonical manifest.json the stats were computed from
    correlation_jitter: float  # eps with L @ L.T = C + eps * I
    # Where the demonstrations close each gripper (serving's gripper correction); None in stats written
    # before the table existed, or computed without task/stage labels.
    gripper_closure: GripperClosure | None = None
    # Frames per annotated skill class (behavior_facts.SKILL_INDEX order); None like gripper_closure.
    skill_counts: np.ndarray | None = None

    def __post_init__(self) -> None:
        for _, _, name, shape in _ARRAYS:
            a = np.array(getattr(self, name), dtype=np.float64)  # private copy, so freezing it is safe
            if a.shape != shape:
                raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{name} has non-finite values (NaN or inf) at {np.argwhere(~np.isfinite(a))[:3]}")
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        for name in ("state_std", "action_std", "per_timestep_std"):
            if np.any(getattr(self, name) < 0):
                raise ValueError(f"{name} must be >= 0")
        chol = self.action_correlation_cholesky
        if np.any(np.triu(chol, 1) != 0) or np.any(np.diag(chol) <= 0):
            raise ValueError("action_correlation_cholesky is not lower triangular with a positive diagonal")
        for name, typ in _META:
            object.__setattr__(self, name, typ(getattr(self, name)))
        if self.skill_counts is not None:
            counts = np.array(self.skill_counts, dtype=np.int64)
            if counts.ndim != 1 or np.any(counts < 0):
                raise ValueError("skill_counts must be a 1-d array of non-negative counts")
            counts.setflags(write=False)
            object.__setattr__(self, "skill_counts", counts)

    def __eq__(self, other: object) -> bool:
        """Exact equality of every array and metadata field."""
        if not isinstance(other, NormStats):
            return NotImplemented
        return all(np.array_equal(getattr(self, n), getattr(other, n)) for _, _, n, _ in _ARRAYS) and all(
            getattr(self, n) == getattr(other, n) for n, _ in _META) and self.gripper_closure == other.gripper_closure \
            and _same_counts(self.skill_counts, other.skill_counts)

    def skill_class_weights(self, num_classes: int) -> np.ndarray:
        """Cross-entropy class weights proportional to 1/sqrt(frequency), mean 1 over the classes that occur
        (xvla.md §3.1); classes that never occur (never a target) get 1. Raises if there are no counts."""
        if self.skill_counts is None or not self.skill_counts.any():
            raise ValueError("these norm stats have no skill counts (computed before they existed, or the data has "
                             "no skill annotations); recompute with `b1k-train data stats`")
        counts = np.zeros(num_classes)
        n = min(num_classes, len(self.skill_counts))
        counts[:n] = self.skill_counts[:n]
        present = counts > 0
        w = np.ones(num_classes)
        w[present] = counts[present] ** -0.5
        w[present] /= w[present].mean()
        return w

    def regularized_correlation_cholesky(self, beta: float = 0.5) -> np.ndarray:
        """chol(beta * L L^T + (1 - beta) * I), the shrunk noise factor of pi_behavior §1.9 (float64, 960x960).

        beta = 1 returns the stored correlation (with its jitter), beta = 0 the identity (i.i.d. noise).
        """
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"correlation beta must be in [0, 1], got {beta}")
        chol = self.action_correlation_cholesky
        sigma = beta * (chol @ chol.T) + (1.0 - beta) * np.eye(FLAT_DIM)
        return np.linalg.cholesky(sigma)

    def to_json(self) -> str:
        """Serialise to the documented JSON layout (exact float64 round trip through from_json)."""
        doc: dict[str, Any] = {"norm_stats": {"state": {}, "actions": {}},
                               "meta": {"format": FORMAT_NAME, "version": FORMAT_VERSION, "constant_std": CONSTANT_STD}}
        for section, key, name, _ in _ARRAYS:
            doc["norm_stats"][section][key] = getattr(self, name).tolist()
        for name, _ in _META:
            doc["meta"][name] = getattr(self, name)
        if self.gripper_closure is not None:
            doc["control"] = {"gripper_closure": self.gripper_closure.to_dict()}
        if self.skill_counts is not None:
            doc.setdefault("control", {})["skill_counts"] = self.skill_counts.tolist()
        # Compact: the 960x960 factor would be ~1M lines if indented.
        return json.dumps(doc, separators=(",", ":")) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, where: str = "<norm stats JSON>") -> NormStats:
        """Parse and validate; every error is a ValueError that starts with `where` (the file name)."""
        try:
            doc = json.loads(text)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8 at all
            raise ValueError(f"{where}: not valid JSON ({e}); re-run `b1k-train data stats`") from e
        meta = doc.get("meta", {}) if isinstance(doc, dict) else {}
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{where}: unsupported norm stats format {meta.get('format')!r} version "
                             f"{meta.get('version')!r} (this b1k-train reads {FORMAT_NAME} v{FORMAT_VERSION})")
        kwargs: dict[str, Any] = {}
        try:
            for section, key, name, _ in _ARRAYS:
                kwargs[name] = np.asarray(doc["norm_stats"][section][key], dtype=np.float64)
            for name, _ in _META:
                kwargs[name] = meta[name]
            closure = doc.get("control", {}).get("gripper_closure")
            kwargs["gripper_closure"] = None if closure is None else GripperClosure.from_dict(closure)
            counts = doc.get("control", {}).get("skill_counts")
            kwargs["skill_counts"] = None if counts is None else np.asarray(counts, dtype=np.int64)
        except KeyError as e:
            raise ValueError(f"{where}: missing field {e.args[0]!r}; re-run `b1k-train data stats`") from e
        except (TypeError, ValueError) as e:  # ragged or non-numeric lists
            raise ValueError(f"{where}: malformed array ({e}); re-run `b1k-train data stats`") from e
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:  # TypeError: a metadata value of the wrong type
            raise ValueError(f"{where}: {e}; re-run `b1k-train data stats`") from e

    def save(self, url: str) -> str:
        """Write atomically to `url` (local path, file:// or s3://); returns `url`."""
        fs, path = storage.resolve(url)
        storage.write_bytes_atomic(fs, path, self.to_json().encode())
        return url

    @classmethod
    def load(cls, url: str) -> NormStats:
        """Read and validate `url`; FileNotFoundError or ValueError name the file and the fix."""
        fs, path = storage.resolve(url)
        try:
            data = storage.with_retries(lambda: storage.read_bytes(fs, path), what=f"reading {url}")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no norm stats at {url}; run `b1k-train data stats SHARDS`") from e
        return cls.from_json(data, where=url)
