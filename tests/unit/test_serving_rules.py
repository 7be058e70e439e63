"""The correction rules (pi_behavior §4.4): the radio rule's cases exactly as the reference, the first-match order,
gripper_rule=data|seed|off, the seed's hand tables against the importer's closure_allowed, stage corrections in
the session, and a model without a stage source (X-VLA): no rule reads its placeholder stage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_loaders.behavior_facts import MAX_NUM_STAGES, NUM_TASKS, TASK_NUM_STAGES
from data_loaders.gripper_stats import GripperClosure, GripperClosureCounter
from serving.config import XVLA_SETTINGS, ServingConfig, xvla_settings
from serving.control.gripper import GripperCorrection, seed_closure, select_correction
from serving.control.rules import apply_rules, radio_rule
from serving.control.session import ControlSession, InferenceResult, PolicyInfo
from tests.unit.test_serving_control import IMAGES, grips, smooth_chunk

LEFT, RIGHT = 14, 22
SHUT, HALF, OPEN = -0.99, 0.0, 1.0


def state(left: float, right: float) -> np.ndarray:
    s = np.linspace(-0.5, 0.5, 23).astype(np.float32)
    s[LEFT], s[RIGHT] = left, right
    return s


def held(s: np.ndarray, *dims: int) -> np.ndarray:
    want = np.tile(s, (30, 1))
    want[:, list(dims)] = 1.0
    return want


@pytest.mark.parametrize("stage, left, right, want_stage, opened", [
    (4, OPEN, OPEN, 2, ()),  # the last stage goes back to 2, the chunk is kept
    (4, SHUT, OPEN, 2, (LEFT,)),
    (2, SHUT, OPEN, 2, (LEFT,)),  # from stage 2 an empty grasp opens if the other is not half-open
    (3, OPEN, SHUT, 3, (RIGHT,)),
    (2, SHUT, SHUT, 2, (LEFT, RIGHT)),  # the other one shut is not half-open either
    (3, SHUT, HALF, None, ()),  # the other half-open: no match (the gripper rule runs)
    (4, SHUT, HALF, 2, ()),  # ... but the stage is still reset
    (3, OPEN, OPEN, None, ()),
    (1, SHUT, OPEN, None, ()),  # before stage 2 the radio rule does not apply
])
def test_radio_rule_cases(stage, left, right, want_stage, opened):
    s, chunk = state(left, right), smooth_chunk()
    out = radio_rule(stage, s, chunk, closed_threshold=-0.98)
    if want_stage is None:
        assert out is None
        return
    assert out.stage == want_stage
    np.testing.assert_array_equal(out.actions, held(s, *opened) if opened else chunk)


def test_rules_first_match_and_switches():
    chunk, cfg = smooth_chunk(), ServingConfig()
    seed = select_correction(ServingConfig(gripper_rule="seed"), None)
    s = state(SHUT, HALF)
    # Task 0 stage 1: the radio rule does not apply; the seed's table forbids closing before stage 2.
    out = apply_rules(0, 1, s, chunk, cfg, seed)
    assert out.events == ("open_left",) and out.stage == 1
    np.testing.assert_array_equal(out.actions, held(s, LEFT))
    # Stage 4: the radio rule matches (stage reset) and the gripper rule is not consulted.
    out = apply_rules(0, 4, s, chunk, cfg, seed)
    assert out.stage == 2 and out.actions is chunk and out.events == ("radio_stage_4_to_2",)
    off = ServingConfig(radio_rule=False)
    out = apply_rules(0, 4, s, chunk, off, seed)
    assert out.stage == 4 and out.actions is chunk and out.events == ()
    out = apply_rules(0, None, s, chunk, cfg, None)
    assert out.stage is None and out.actions is chunk  # no stage: the radio rule never runs


def test_gripper_rule_selects_the_table():
    data = GripperCorrection(GripperClosure.empty())
    assert select_correction(ServingConfig(), data) is data
    assert select_correction(ServingConfig(gripper_rule="off"), data) is None
    assert select_correction(ServingConfig(gripper_rule="seed"), data).closure == seed_closure()
    with pytest.raises(ValueError, match="gripper_rule must be one of data, seed, off"):
        ServingConfig(gripper_rule="hand")


def test_seed_rule_is_the_reference_general_rule():
    from models.pi_behavior.openpi_import import closure_allowed

    corr = select_correction(ServingConfig(gripper_rule="seed"), None)
    both = state(SHUT, SHUT)
    for task in range(NUM_TASKS):
        for stage in range(TASK_NUM_STAGES[task]):
            want = [side for side in ("left", "right") if not closure_allowed(task, stage, side)]
            assert corr.sides_to_open(task, stage, both) == want, (task, stage)
    assert corr.sides_to_open(40, 3, both) == ["left", "right"] and corr.sides_to_open(40, 4, both) == ["left"]
    assert corr.sides_to_open(38, 0, both) == ["left"]  # spraying: the right is always allowed


def test_serving_json_gripper_settings():
    assert ServingConfig().gripper_correction and ServingConfig().radio_rule
    assert not ServingConfig(gripper_rule="off").gripper_correction
    # serving.json written before gripper_rule: its bool switch still reads.
    assert ServingConfig.from_dict({"gripper_correction": False}).gripper_rule == "off"
    assert ServingConfig.from_dict({"gripper_correction": True}).gripper_rule == "data"
    assert ServingConfig.from_dict({"gripper_correction": False, "gripper_rule": "seed"}).gripper_rule == "seed"
    with pytest.raises(ValueError, match="'gripper_correction' must be a boolean"):
        ServingConfig.from_dict({"gripper_correction": "no"})
    doc = json.loads(ServingConfig().to_json())
    assert doc["gripper_rule"] == "data" and doc["radio_rule"] is True and "gripper_correction" not in doc


def test_legacy_commanded_action_table_is_not_read_as_states():
    counts = GripperClosure.empty().to_dict()
    legacy = {"frames": counts["frames"], "closed": counts["closed"], "close_action": 0.0}
    assert GripperClosure.from_dict(legacy) is None
    assert GripperClosure.from_dict(counts) == GripperClosure.empty()


def result(stage: int = 0) -> InferenceResult:
    return InferenceResult(actions=smooth_chunk(), stage_logits=np.eye(MAX_NUM_STAGES, dtype=np.float32)[stage])


def test_session_radio_stage_reset_clears_the_votes():
    session = ControlSession()
    session.begin(0, PolicyInfo(key="m", cfg=ServingConfig(), num_stages=5, correction=None))
    session.voter.set_stage(4)
    session.voter.history.extend([4, 4])
    session.accept(state(OPEN, OPEN), result(stage=4))
    assert session.stage == 2 and list(session.voter.history) == [4]  # reset, cleared, then this vote
    assert "radio_stage_4_to_2" in session.events
    s = state(SHUT, OPEN)
    session.accept(s, result(stage=2))
    assert session.events[0] == "radio_open_left" and session.next_action()[LEFT] == 1.0
    np.testing.assert_array_equal(session.next_action()[3:LEFT], s[3:LEFT])  # holding still


def test_no_stage_source_never_uses_the_placeholder_stage():
    """X-VLA's stage logits are zeros (stage 0 all episode). Task 0's table: fully closed is common at stage 0
    and rare at stage 3; task 5 never fully closes the left. The stage-free rule leaves task 0 alone (a stage
    expects a closed gripper) and opens task 5's; the radio rule never runs."""
    counter = GripperClosureCounter()
    for i in range(50):
        counter.add(0, 0, grips(SHUT, OPEN))
        counter.add(0, 3, grips(OPEN, OPEN))
        counter.add(5, i % 3, grips(-0.5 if i % 2 else OPEN, OPEN))  # holds objects, never fully closed
    corr = GripperCorrection(counter.result())
    assert corr.sides_to_open(0, 3, state(SHUT, OPEN)) == ["left"]  # with a stage it would open at stage 3...
    for task, want in ((0, []), (5, ["left"])):
        assert corr.sides_to_open(task, None, state(SHUT, OPEN)) == want
    session = ControlSession()
    info = PolicyInfo(key="x", cfg=xvla_settings(ServingConfig(gripper_rule="seed")), num_stages=5,
                      correction=corr, stage_source=False)
    session.begin(0, info)
    session.voter.set_stage(4)  # whatever the tracked stage says, it is not consulted
    session.accept(state(SHUT, OPEN), result())
    assert session.events == [] and session.voter.stage == 4  # seed table, task 0: stage-dependent -> no fire
    session.begin(7, info)
    session.accept(state(SHUT, OPEN), result())
    assert session.events == ["open_left"]  # task 7 always-open in the seed's table: stage-free


def test_xvla_settings_turn_off_pi_behaviors_tricks_unless_asked():
    cfg = xvla_settings(ServingConfig())
    assert cfg == ServingConfig(**XVLA_SETTINGS)
    assert not (cfg.inpainting or cfg.stage_voting or cfg.interpolation or cfg.gripper_correction or cfg.radio_rule)
    assert cfg.chunking and cfg.execute_steps == 20
    asked = xvla_settings(ServingConfig(gripper_rule="seed", execute_steps=10))
    assert asked.gripper_rule == "seed" and asked.execute_steps == 10 and not asked.interpolation
    info = PolicyInfo(key="x", cfg=cfg, num_stages=5, correction=None, stage_source=False)
    session = ControlSession()
    session.begin(0, info)
    session.accept(state(SHUT, SHUT), result())
    assert session.events == [] and session.kept is None and len(session.queue) == 20  # 20 rows at 1x
    np.testing.assert_array_equal(session.queue, smooth_chunk()[:20])
    assert session.request(IMAGES, state(OPEN, OPEN)).kept is None
