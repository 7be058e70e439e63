"""Where the demonstrations hold each gripper fully closed: per (task, stage, side) frame and closed counts.

The 1st-place solution's gripper correction (pi_behavior §4.4) opens a gripper whose *state* is below -0.98
(fingers fully shut, so nothing is between them: an empty grasp) where that "is not expected" for the task and
stage; it decided that with hand-written per-task tables. Here the table is a statistic of the training data,
computed in the same pass as the normalization statistics and stored in norm_stats.json, so it travels inside
every checkpoint and covers any task set.

A frame counts as "fully closed" for a side when its gripper state (23-d state, -1 shut .. +1 open) is below
CLOSED_STATE. A grasp that holds an object stops above it (the object keeps the fingers apart), so a cell where
the demonstrations grasp but never close on nothing has a fully-closed fraction of ~0, and a fully closed gripper
there is a failed grasp. Fully closed is expected at (task, stage, side) when at least `min_fraction` of that
cell's frames are fully closed; a cell without frames is unknown and treated as expected (the rule never fires
on no evidence).

The 1st-place hand tables fit the same counts (models/pi_behavior/openpi_import.py::reference_gripper_closure:
one frame per valid (task, stage), closed iff closing is allowed), which is how imported exports carry them and
how `gripper_rule=seed` uses them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from data_loaders.behavior_facts import MAX_NUM_STAGES, NUM_TASKS

log = logging.getLogger(__name__)

GRIPPER_ACTION_DIMS = (14, 22)  # left, right in the 23-d action and the 23-d state (same order)
SIDES = ("left", "right")
CLOSED_STATE = -0.98  # a gripper state below this is fully closed: nothing between the fingers
STATISTIC = "state_below"  # what `closed` counts (to_dict); older tables counted commanded closing actions


@dataclasses.dataclass(frozen=True, eq=False)
class GripperClosure:
    """frames[task, stage] and closed[task, stage, side] counts (int64): closed = frames whose gripper state is
    below CLOSED_STATE."""

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
        """True when the demonstrations hold `side` (0 left, 1 right) fully closed at (task, stage) in at least
        `min_fraction` of their frames, or when they have no frames there."""
        if not (0 <= task < NUM_TASKS and 0 <= stage < MAX_NUM_STAGES and side in (0, 1)):
            raise ValueError(f"no gripper statistics for task {task}, stage {stage}, side {side}")
        n = int(self.frames[task, stage])
        if n == 0:
            return True
        return int(self.closed[task, stage, side]) >= max(1, min_fraction * n)

    def closing_expected_in_task(self, task: int, side: int, *, min_fraction: float) -> bool:
        """The stage-free question (a model without a stage source): True unless the task has frames and fully
        closed is rare in every stage that has them."""
        stages = np.flatnonzero(self.frames[task] > 0)
        return stages.size == 0 or any(self.closing_expected(task, int(s), side, min_fraction=min_fraction)
                                       for s in stages)

    def to_dict(self) -> dict[str, Any]:
        return {"frames": self.frames.tolist(), "closed": self.closed.tolist(), "statistic": STATISTIC,
                "closed_state": CLOSED_STATE}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> GripperClosure | None:
        """None for a table of another statistic (the older commanded-action counts, which mean something else:
        a grasping stage commands closing, so the rule could never fire there); the server then runs without."""
        if doc.get("statistic") != STATISTIC:
            log.warning("norm_stats.json: the gripper table counts %s, not fully closed gripper states; ignored. "
                        "Recompute with `b1k-train data stats` and re-export.",
                        "commanded closing actions" if "close_action" in doc else repr(doc.get("statistic")))
            return None
        return cls(np.asarray(doc["frames"], dtype=np.int64), np.asarray(doc["closed"], dtype=np.int64))


class GripperClosureCounter:
    """Accumulates GripperClosure counts from (task, stage, current state) samples in any order."""

    def __init__(self) -> None:
        self.frames = np.zeros((NUM_TASKS, MAX_NUM_STAGES), np.int64)
        self.closed = np.zeros((NUM_TASKS, MAX_NUM_STAGES, 2), np.int64)

    def add(self, task: int, stage: int, state: np.ndarray) -> None:
        """One frame: its task, its stage label and its 23-d state."""
        if not (0 <= task < NUM_TASKS and 0 <= stage < MAX_NUM_STAGES):
            raise ValueError(f"sample with task {task}, stage {stage} is outside the {NUM_TASKS} tasks x "
                             f"{MAX_NUM_STAGES} stages; re-run `b1k-train data shard`")
        self.frames[task, stage] += 1
        grip = np.asarray(state)[list(GRIPPER_ACTION_DIMS)]
        self.closed[task, stage] += (grip < CLOSED_STATE).astype(np.int64)

    def merge(self, other: GripperClosureCounter) -> None:
        self.frames += other.frames
        self.closed += other.closed

    def result(self) -> GripperClosure:
        return GripperClosure(self.frames.copy(), self.closed.copy())
