"""Action chunking (pi_behavior §4.2): which rows of a predicted chunk are executed, at what speed, and which
seed the next chunk's inpainting.

With resampling, rows 0..25 are cubic-interpolated onto 20 env steps (sample points linspace(0, 25, 20)) and the
base velocities (dims 0:3) are scaled by 26/20, so the robot covers 26 steps of demonstration in 20; rows 26..29
are kept. When a gripper moves within the executed rows (its range exceeds the guard), resampling would smear
the grasp, so rows 0..19 are executed at 1x and rows 20..23 kept.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.interpolate import interp1d

from data_loaders.gripper_stats import GRIPPER_ACTION_DIMS
from serving.config import ServingConfig

BASE_VELOCITY_DIMS = slice(0, 3)


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    execute: np.ndarray  # (n, 23) float32: one action per env step
    kept: np.ndarray | None  # (k, 23) absolute actions for the next inpainting, or None
    resampled: bool


def gripper_range(actions: np.ndarray, rows: int) -> float:
    """Largest max-min of either gripper action over the first `rows` rows."""
    grip = np.asarray(actions)[:rows][:, list(GRIPPER_ACTION_DIMS)]
    return float((grip.max(axis=0) - grip.min(axis=0)).max())


def resample_cubic(rows: np.ndarray, steps: int) -> np.ndarray:
    """(n, D) -> (steps, D): a per-dim cubic spline through the rows at 0..n-1, sampled at linspace(0, n-1, steps).

    Endpoints are preserved exactly; n < 4 falls back to linear (a cubic spline needs 4 points)."""
    rows = np.asarray(rows, dtype=np.float64)
    n = rows.shape[0]
    if n == steps:
        return rows.copy()
    kind = "cubic" if n >= 4 else "linear"
    f = interp1d(np.arange(n, dtype=np.float64), rows, kind=kind, axis=0)
    return f(np.linspace(0.0, n - 1.0, steps))


def plan_chunk(actions: np.ndarray, cfg: ServingConfig) -> ChunkPlan:
    """Split an absolute (30, 23) chunk (after corrections) into the actions to execute and the kept rows."""
    actions = np.asarray(actions, dtype=np.float32)
    if not cfg.chunking:
        return ChunkPlan(actions[:1].copy(), None, False)
    resample = (cfg.interpolation and cfg.execute_steps < cfg.actions_to_execute
                and gripper_range(actions, cfg.actions_to_execute) <= cfg.gripper_change_guard)
    used = cfg.actions_to_execute if resample else cfg.execute_steps
    kept = None
    if cfg.inpainting and cfg.actions_to_keep > 0:
        kept = actions[used:used + cfg.actions_to_keep].copy()
    execute = actions[:used]
    if resample:
        execute = resample_cubic(execute, cfg.execute_steps)
        execute[:, BASE_VELOCITY_DIMS] *= cfg.speedup
    return ChunkPlan(np.ascontiguousarray(execute, dtype=np.float32), kept, resample)
