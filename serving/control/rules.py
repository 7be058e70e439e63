"""The correction rules of the 1st-place submission (pi_behavior §4.4), applied to every predicted chunk before it
is planned: the radio rule (task 0) first, then the general gripper rule; only the first rule that matches
applies. A rule may replace the chunk and may correct the tracked stage (which clears the vote history).

Radio rule (task 0, turning on the radio; the authors call it legacy, the submission ran it): from stage 2 on,
stage 4 (the last) is reset to 2, and a fully closed gripper (state < closed_threshold) is opened, the chunk
replaced by the held state, unless the other gripper is half-open (neither above OPEN_STATE nor fully closed).
When it changes neither actions nor stage it does not match and the gripper rule runs. Both rules need the
stage: for a model without a stage source the radio rule is off and the gripper rule is stage-free.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_loaders.gripper_stats import GRIPPER_ACTION_DIMS, SIDES
from serving.config import ServingConfig
from serving.control.gripper import GripperCorrection, hold_and_open

RADIO_TASK = 0
RADIO_RESET = {4: 2}  # stage -> corrected stage
RADIO_FROM_STAGE = 2
OPEN_STATE = 0.90  # a gripper state above this is open


@dataclasses.dataclass(frozen=True)
class Corrected:
    actions: np.ndarray  # (H, 23)
    stage: int | None  # the corrected stage (None: the model has no stage)
    events: tuple[str, ...] = ()


def radio_rule(stage: int, state: np.ndarray, actions: np.ndarray, *, closed_threshold: float) -> Corrected | None:
    """Task 0's rule at `stage`; None when it does not match."""
    if stage < RADIO_FROM_STAGE:
        return None
    new_stage = RADIO_RESET.get(stage, stage)
    grip = [float(state[d]) for d in GRIPPER_ACTION_DIMS]
    closed = [g < closed_threshold for g in grip]
    half_open = [not (g > OPEN_STATE or c) for g, c in zip(grip, closed)]
    sides = [SIDES[i] for i in (0, 1) if closed[i] and not half_open[1 - i]]
    events = (f"radio_stage_{stage}_to_{new_stage}",) if new_stage != stage else ()
    if sides:
        return Corrected(hold_and_open(state, actions.shape[0], sides), new_stage,
                         events + ("radio_open_" + "_".join(sides),))
    return Corrected(actions, new_stage, events) if events else None


def apply_rules(task: int, stage: int | None, state: np.ndarray, actions: np.ndarray, cfg: ServingConfig,
                gripper: GripperCorrection | None) -> Corrected:
    """The first matching rule's result, or `actions` and `stage` unchanged."""
    if cfg.radio_rule and task == RADIO_TASK and stage is not None:
        out = radio_rule(stage, state, actions, closed_threshold=cfg.closed_threshold)
        if out is not None:
            return out
    if gripper is not None:
        fixed, opened = gripper.apply(task, stage, state, actions)
        if opened:
            return Corrected(fixed, stage, ("open_" + "_".join(opened),))
    return Corrected(actions, stage)
