"""Gripper correction (pi_behavior §4.4): open a gripper that closed on nothing where the demonstrations do not
close it.

A gripper whose state is below `closed_threshold` (-0.98: fingers fully shut, so nothing is between them) at a
(task, stage) where the training data's closure table says closing is not expected has failed a grasp or closed
by mistake. The whole predicted chunk is then replaced by the current state held for 30 steps with that gripper
commanded open (+1): the robot stops, opens, and the next chunk starts from a clean state.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_loaders.gripper_stats import GRIPPER_ACTION_DIMS, SIDES, GripperClosure

OPEN = 1.0


@dataclasses.dataclass(frozen=True)
class GripperCorrection:
    closure: GripperClosure
    closed_threshold: float = -0.98
    min_close_fraction: float = 0.01

    def sides_to_open(self, task: int, stage: int, state: np.ndarray) -> list[str]:
        """The sides ("left"/"right") that are shut where the data never closes them."""
        out = []
        for side, dim in enumerate(GRIPPER_ACTION_DIMS):
            if float(state[dim]) < self.closed_threshold and not self.closure.closing_expected(
                    task, stage, side, min_fraction=self.min_close_fraction):
                out.append(SIDES[side])
        return out

    def apply(self, task: int, stage: int, state: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """(actions, opened sides): `actions` unchanged when no side needs opening, else the corrected chunk."""
        sides = self.sides_to_open(task, stage, state)
        if not sides:
            return actions, []
        fixed = np.tile(np.asarray(state, dtype=np.float32), (actions.shape[0], 1))
        for side in sides:
            fixed[:, GRIPPER_ACTION_DIMS[SIDES.index(side)]] = OPEN
        return fixed, sides
