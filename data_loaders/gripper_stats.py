"""Where the demonstrations close each gripper: per (task, stage, side) frame and closure counts.

The 1st-place solution's gripper correction (pi_behavior §4.4) opens a gripper that closed on nothing when
closing "is not expected" for that task and stage; it decided that with hand-written per-task tables. Here the
table is a statistic of the training data, computed in the same pass as the normalization statistics and
stored in norm_stats.json, so it travels inside every checkpoint and covers any task set.

A frame counts as "closing" for a side when its commanded gripper action (raw units, -1 close .. +1 open) is
below CLOSE_ACTION. Closing is expected at (task, stage, side) when at least `min_fraction` of that cell's
frames close; a cell without frames is unknown and treated as expected (the rule never fires on no evidence).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data_loaders.behavior_facts import MAX_NUM_STAGES, NUM_TASKS

GRIPPER_ACTION_DIMS = (14, 22)  # left, right in the 23-d action
SIDES = ("left", "right")
CLOSE_ACTION = 0.0  # a commanded gripper action below this is "closing"


@dataclasses.dataclass(frozen=True, eq=False)
class GripperClosure:
    """frames[task, stage] and closed[task, stage, side] counts (int64)."""

    frames: np.ndarray  # (NUM_TASKS, MAX_NUM_STAGES)
    closed: np.ndarray  # (NUM_TASKS, MAX_NUM_STAGES, 2)

    def __post_init__(self) -> None:
        frames = np.array(self.frames, dtype=np.int64)
        closed = np.array(self.closed, dtype=np.int64)
        if frames.shape != (NUM_TASKS, MAX_NUM_STAGES) or closed.shape != (NUM_TASKS, MAX_NUM_STAGES, 2):
            raise ValueError(f"gripper closure counts have shapes {frames.shape} and {closed.shape}, expected "
                             f"({NUM_TASKS}, {MAX_NUM_STAGES}) and ({NUM_TASKS}, {MAX_NUM_STAGES}, 2)")
        if np.any(frames < 0) or np.any(closed < 0) or np.any(closed > frames[..., None]):
            raise ValueError("gripper closure counts must satisfy 0 <= closed <= frames")
        for name, a in (("frames", frames), ("closed", closed)):
            a.setflags(write=False)
            object.__setattr__(self, name, a)

    @classmethod
    def empty(cls) -> GripperClosure:
        return cls(np.zeros((NUM_TASKS, MAX_NUM_STAGES), np.int64), np.zeros((NUM_TASKS, MAX_NUM_STAGES, 2), np.int64))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GripperClosure):
            return NotImplemented
        return np.array_equal(self.frames, other.frames) and np.array_equal(self.closed, other.closed)

    def closing_expected(self, task: int, stage: int, side: int, *, min_fraction: float) -> bool:
        """True when the demonstrations close `side` (0 left, 1 right) at (task, stage) in at least
        `min_fraction` of their frames, or when they have no frames there."""
        if not (0 <= task < NUM_TASKS and 0 <= stage < MAX_NUM_STAGES and side in (0, 1)):
            raise ValueError(f"no gripper statistics for task {task}, stage {stage}, side {side}")
        n = int(self.frames[task, stage])
        if n == 0:
            return True
        return int(self.closed[task, stage, side]) >= max(1, min_fraction * n)

    def to_dict(self) -> dict[str, Any]:
        return {"frames": self.frames.tolist(), "closed": self.closed.tolist(), "close_action": CLOSE_ACTION}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> GripperClosure:
        return cls(np.asarray(doc["frames"], dtype=np.int64), np.asarray(doc["closed"], dtype=np.int64))


class GripperClosureCounter:
    """Accumulates GripperClosure counts from (task, stage, current action) samples in any order."""

    def __init__(self) -> None:
        self.frames = np.zeros((NUM_TASKS, MAX_NUM_STAGES), np.int64)
        self.closed = np.zeros((NUM_TASKS, MAX_NUM_STAGES, 2), np.int64)

    def add(self, task: int, stage: int, action: np.ndarray) -> None:
        """One frame: its task, its stage label and its commanded 23-d action."""
        if not (0 <= task < NUM_TASKS and 0 <= stage < MAX_NUM_STAGES):
            raise ValueError(f"sample with task {task}, stage {stage} is outside the {NUM_TASKS} tasks x "
                             f"{MAX_NUM_STAGES} stages; re-run `b1k-train data shard`")
        self.frames[task, stage] += 1
        grip = np.asarray(action)[list(GRIPPER_ACTION_DIMS)]
        self.closed[task, stage] += (grip < CLOSE_ACTION).astype(np.int64)

    def merge(self, other: GripperClosureCounter) -> None:
        self.frames += other.frames
        self.closed += other.closed

    def result(self) -> GripperClosure:
        return GripperClosure(self.frames.copy(), self.closed.copy())
