"""Gripper correction (pi_behavior §4.4): open a gripper that closed on nothing where the demonstrations do not
hold it fully closed.

A gripper whose state is below `closed_threshold` (-0.98: fingers fully shut, so nothing is between them) at a
(task, stage) where the closure table says a fully closed gripper is rare has failed a grasp or closed by
mistake. A grasp that holds an object stays above the threshold, so the rule never touches it. The whole
predicted chunk is then replaced by the current state held for the horizon with that gripper commanded open (+1):
the robot stops, opens, and the next chunk starts from a clean state.

`gripper_rule` picks the table: "data" (the export's norm_stats.json, counted by `b1k-train data stats`; for an
imported 1st-place checkpoint that is the hand tables), "seed" (the 1st-place hand tables ALWAYS_OPEN_*,
MIN_STAGE_FOR_CLOSURE, RIGHT_ALWAYS_ALLOWED, whatever the export carries) or "off". For a model without a stage
source (X-VLA) the rule is stage-free: it fires only where fully closed is rare in every stage of the task.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from data_loaders.gripper_stats import CLOSED_STATE, GRIPPER_ACTION_DIMS, SIDES, GripperClosure
from serving.config import ServingConfig

OPEN = 1.0


def hold_and_open(state: np.ndarray, horizon: int, sides: list[str]) -> np.ndarray:
    """(horizon, 23): the current state tiled, with each of `sides` commanded open."""
    fixed = np.tile(np.asarray(state, dtype=np.float32), (horizon, 1))
    for side in sides:
        fixed[:, GRIPPER_ACTION_DIMS[SIDES.index(side)]] = OPEN
    return fixed


@dataclasses.dataclass(frozen=True)
class GripperCorrection:
    closure: GripperClosure
    closed_threshold: float = CLOSED_STATE
    min_close_fraction: float = 0.01

    def sides_to_open(self, task: int, stage: int | None, state: np.ndarray) -> list[str]:
        """The sides ("left"/"right") that are shut where the data says fully closed is rare; `stage` None: in
        every stage of the task."""
        out = []
        for side, dim in enumerate(GRIPPER_ACTION_DIMS):
            if float(state[dim]) >= self.closed_threshold:
                continue
            if stage is None:
                expected = self.closure.closing_expected_in_task(task, side, min_fraction=self.min_close_fraction)
            else:
                expected = self.closure.closing_expected(task, stage, side, min_fraction=self.min_close_fraction)
            if not expected:
                out.append(SIDES[side])
        return out

    def apply(self, task: int, stage: int | None, state: np.ndarray,
              actions: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """(actions, opened sides): `actions` unchanged when no side needs opening, else the corrected chunk."""
        sides = self.sides_to_open(task, stage, state)
        if not sides:
            return actions, []
        return hold_and_open(state, actions.shape[0], sides), sides


@functools.cache
def seed_closure() -> GripperClosure:
    """The 1st-place hand tables in the importer's representation (one frame per valid stage, closed iff
    closing is allowed)."""
    from data_loaders.behavior_facts import TASK_NUM_STAGES
    from models.pi_behavior.openpi_import import reference_gripper_closure

    return reference_gripper_closure(tuple(int(n) for n in TASK_NUM_STAGES))


def select_correction(cfg: ServingConfig, data: GripperCorrection | None) -> GripperCorrection | None:
    """The correction `cfg.gripper_rule` asks for; `data` is the one built from the export's table (None when it
    has none)."""
    if cfg.gripper_rule == "off":
        return None
    if cfg.gripper_rule == "seed":
        return GripperCorrection(seed_closure(), cfg.closed_threshold, cfg.min_close_fraction)
    return data
