"""Inference-time control of the policy server (pi_behavior §4.2-4.4) and the evaluator observation parser.

Covers chunk planning (cubic 26->20 resampling, gripper-change guard, switches), ServingConfig validation, stage
voting, the gripper correction and its closure table (counting, NormStats JSON round trip, StatsAccumulator),
ControlSession end to end without a model, and serving.observation.parse_observation.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from data_loaders.behavior_facts import EVAL_CAMERA_KEYS, proprio_to_state
from data_loaders.gripper_stats import GripperClosureCounter
from data_loaders.norm_stats import NormStats
from data_loaders.stats import StatsAccumulator
from serving.config import ServingConfig
from serving.control.chunking import plan_chunk
from serving.control.gripper import GripperCorrection
from serving.control.session import ControlSession, InferenceResult, PolicyInfo
from serving.control.voting import StageVoter
from serving.observation import ObservationError, parse_observation
from tests.unit.test_norm_stats import _random_stats

CFG = ServingConfig()
LEFT, RIGHT = 14, 22


def smooth_chunk(seed: int = 0) -> np.ndarray:
    """A smooth (30, 23) chunk with constant grippers (left open, right closed)."""
    rng = np.random.default_rng(seed)
    t = np.arange(30, dtype=np.float64)[:, None]
    a = rng.uniform(-1, 1, 23) + 0.5 * np.sin(t / 9.0 + rng.uniform(0, 3, 23))
    a[:, LEFT], a[:, RIGHT] = 1.0, -1.0
    return a.astype(np.float32)


def with_gripper_step(dim: int, lo: float, hi: float, row: int = 10) -> np.ndarray:
    a = smooth_chunk()
    a[:, dim] = hi
    a[row:, dim] = lo
    return a


# --- chunking -----------------------------------------------------------------------------------------------------

def test_resampling_compresses_26_rows_into_20():
    a = smooth_chunk()
    plan = plan_chunk(a, CFG)
    assert plan.resampled and plan.execute.shape == (20, 23) and plan.execute.dtype == np.float32
    np.testing.assert_allclose(plan.execute[0, 3:], a[0, 3:], atol=1e-6)
    np.testing.assert_allclose(plan.execute[0, :3], 1.3 * a[0, :3], rtol=1e-6)
    np.testing.assert_allclose(plan.execute[-1, 3:], a[25, 3:], atol=1e-6)  # cubic spline keeps the endpoints
    np.testing.assert_allclose(plan.execute[-1, :3], 1.3 * a[25, :3], rtol=1e-6)
    np.testing.assert_array_equal(plan.kept, a[26:30])
    assert CFG.speedup == pytest.approx(1.3)


def test_cubic_resampling_reproduces_a_cubic_polynomial():
    rng = np.random.default_rng(1)
    coef = rng.normal(size=(4, 23)) * np.array([1, 1e-1, 1e-2, 1e-3])[:, None]
    poly = lambda t: sum(coef[k] * t[:, None] ** k for k in range(4))  # noqa: E731
    a = poly(np.arange(30.0)).astype(np.float32)
    a[:, LEFT], a[:, RIGHT] = 0.5, 0.5  # keep the guard quiet
    plan = plan_chunk(a, CFG)
    want = poly(np.linspace(0.0, 25.0, 20))
    want[:, :3] *= 1.3
    want[:, LEFT], want[:, RIGHT] = 0.5, 0.5
    assert plan.resampled
    np.testing.assert_allclose(plan.execute, want, atol=1e-4)


@pytest.mark.parametrize("dim", [LEFT, RIGHT])
def test_gripper_change_disables_resampling(dim):
    a = with_gripper_step(dim, -1.0, 1.0)
    plan = plan_chunk(a, CFG)
    assert not plan.resampled
    np.testing.assert_array_equal(plan.execute, a[0:20])  # 1x, base velocities unscaled
    np.testing.assert_array_equal(plan.kept, a[20:24])


def test_gripper_guard_fires_only_when_the_range_exceeds_it():
    # 1.0 -> 0.8 is 0.2 up to float32 rounding (0.19999999): not above the guard, so it still resamples.
    assert plan_chunk(with_gripper_step(LEFT, 0.8, 1.0), CFG).resampled
    # Exactly representable: a range of exactly 0.25 under a 0.25 guard resamples, one ulp more does not.
    cfg = ServingConfig(gripper_change_guard=0.25)
    assert plan_chunk(with_gripper_step(RIGHT, 0.75, 1.0), cfg).resampled
    assert not plan_chunk(with_gripper_step(RIGHT, np.nextafter(np.float32(0.75), np.float32(0)), 1.0), cfg).resampled
    # A gripper change after row 25 is not in the executed rows.
    assert plan_chunk(with_gripper_step(LEFT, -1.0, 1.0, row=26), CFG).resampled


def test_chunking_switches():
    a = smooth_chunk()
    plan = plan_chunk(a, ServingConfig(interpolation=False))
    assert not plan.resampled
    np.testing.assert_array_equal(plan.execute, a[0:20])
    np.testing.assert_array_equal(plan.kept, a[20:24])
    plan = plan_chunk(a, ServingConfig(inpainting=False))
    assert plan.kept is None and plan.resampled and plan.execute.shape == (20, 23)
    plan = plan_chunk(a, ServingConfig(chunking=False))
    assert plan.kept is None and not plan.resampled
    np.testing.assert_array_equal(plan.execute, a[:1])


@pytest.mark.parametrize("kwargs, match", [
    ({"execute_steps": 27}, "execute_steps"),
    ({"actions_to_execute": 27, "actions_to_keep": 4}, "30-step horizon"),
    ({"votes_to_advance": 4}, "votes_to_advance"),
    ({"inpainting": True, "actions_to_keep": 0}, "inpainting"),
])
def test_serving_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ServingConfig(**kwargs)


def test_serving_config_from_dict():
    assert ServingConfig.from_dict({"seed": 3, "stage_voting": False}) == ServingConfig(seed=3, stage_voting=False)
    with pytest.raises(ValueError, match=r"serving\.json: unknown serving settings \['execute_step'\]"):
        ServingConfig.from_dict({"execute_step": 10})
    with pytest.raises(ValueError, match="x.json: execute_steps"):
        ServingConfig.from_dict({"execute_steps": 40}, where="x.json")


# --- stage voting -------------------------------------------------------------------------------------------------

def observe_all(voter: StageVoter, predictions: list[int]) -> list[str | None]:
    return [voter.observe(p) for p in predictions]


def test_two_of_three_votes_advance_and_clear_the_history():
    voter = StageVoter(num_stages=5)
    assert observe_all(voter, [1, 0]) == [None, None] and voter.stage == 0  # rules wait for a full history
    assert voter.observe(1) == "advance" and voter.stage == 1
    assert observe_all(voter, [3, 3]) == [None, None] and voter.stage == 1  # history was cleared
    assert voter.observe(0) is None and voter.stage == 1  # [3, 3, 0]: nothing for stage 2
    assert observe_all(voter, [2, 2]) == [None, "advance"] and voter.stage == 2  # rolling window [0, 2, 2]


def test_skip_back_and_mixed_votes():
    voter = StageVoter(num_stages=5)
    assert observe_all(voter, [2, 2, 2]) == [None, None, "skip"] and voter.stage == 1  # one stage, never two
    assert observe_all(voter, [0, 3, 1]) == [None, None, None] and voter.stage == 1
    voter.set_stage(2)
    assert observe_all(voter, [1, 1, 1]) == [None, None, "back"] and voter.stage == 1
    voter.set_stage(0)
    assert observe_all(voter, [0, 0, 0]) == [None] * 3 and voter.stage == 0  # no stage -1


def test_last_stage_is_never_left_and_predictions_are_clamped():
    voter = StageVoter(num_stages=5)
    voter.set_stage(4)
    assert observe_all(voter, [3, 3, 3, 3]) == [None] * 4 and voter.stage == 4
    voter.set_stage(3)
    assert observe_all(voter, [9, 9, 9]) == [None, None, "advance"] and voter.stage == 4  # 9 -> 4
    voter.set_stage(2)
    assert observe_all(voter, [14, 7, 40]) == [None, None, "skip"] and voter.stage == 3  # all clamp to 4
    voter.reset()
    assert voter.stage == 0 and len(voter.history) == 0


# --- gripper correction and its closure table --------------------------------------------------------------------

def grips(left: float = 1.0, right: float = 1.0) -> np.ndarray:
    a = np.zeros(23, np.float32)
    a[LEFT], a[RIGHT] = left, right
    return a


def closure_table():
    """Task 0 (gripper states): stage 1 never fully closes the left (100 frames), stage 2 in 50 of 100, stage 3
    has no frames, stage 4 in 1 of 100 (the other 99 hold something at -0.5: not fully closed); the right is
    fully closed in every stage-1 frame and in no stage-2 frame."""
    counter = GripperClosureCounter()
    for i in range(100):
        counter.add(0, 1, grips(1.0, -1.0))
        counter.add(0, 2, grips(-1.0 if i % 2 else 1.0, 1.0))
        counter.add(0, 4, grips(-0.99 if i == 0 else -0.5, 1.0))
    return counter.result()


def state(left: float = 1.0, right: float = 1.0) -> np.ndarray:
    s = np.linspace(-0.5, 0.5, 23).astype(np.float32)
    s[LEFT], s[RIGHT] = left, right
    return s


def test_closure_counts():
    table = closure_table()
    assert table.frames[0, 1:5].tolist() == [100, 100, 0, 100]
    assert table.closed[0, 1:5].tolist() == [[0, 100], [50, 0], [0, 0], [1, 0]]
    assert table.frames.sum() == 300


def test_gripper_correction_opens_an_empty_grasp_where_closing_is_unexpected():
    corr = GripperCorrection(closure_table())
    chunk = smooth_chunk()
    s = state(left=-0.99)
    fixed, sides = corr.apply(0, 1, s, chunk)
    assert sides == ["left"] and fixed.shape == (30, 23)
    want = np.tile(s, (30, 1))
    want[:, LEFT] = 1.0
    np.testing.assert_array_equal(fixed, want)
    for stage, st in ((2, s), (1, state(left=-0.5)), (3, s)):  # closing expected / holding something / no data
        out, sides = corr.apply(0, stage, st, chunk)
        assert sides == [] and out is chunk


def test_gripper_correction_right_side_and_min_close_fraction():
    table = closure_table()
    s = state(right=-0.995)
    fixed, sides = GripperCorrection(table).apply(0, 2, s, smooth_chunk())
    assert sides == ["right"] and np.all(fixed[:, RIGHT] == 1.0) and np.all(fixed[:, LEFT] == s[LEFT])
    assert GripperCorrection(table).sides_to_open(0, 1, s) == []  # the right closes at stage 1
    both = state(left=-0.99, right=-0.99)
    assert GripperCorrection(table).sides_to_open(0, 4, both) == ["right"]  # 1/100 >= 0.01: left expected
    assert GripperCorrection(table, min_close_fraction=0.05).sides_to_open(0, 4, both) == ["left", "right"]
    assert GripperCorrection(table, closed_threshold=-0.999).sides_to_open(0, 4, both) == []


def test_gripper_closure_json_round_trip_through_norm_stats():
    ns = dataclasses.replace(_random_stats(), gripper_closure=closure_table())
    loaded = NormStats.from_json(ns.to_json())
    assert loaded == ns and loaded != dataclasses.replace(ns, gripper_closure=None)
    np.testing.assert_array_equal(loaded.gripper_closure.frames, ns.gripper_closure.frames)
    np.testing.assert_array_equal(loaded.gripper_closure.closed, ns.gripper_closure.closed)
    plain = _random_stats()
    assert '"control"' not in plain.to_json() and NormStats.from_json(plain.to_json()).gripper_closure is None


def fed_accumulator(samples: list[tuple[int | None, int | None, float, float]], seed: int = 0) -> StatsAccumulator:
    """Samples of (task, stage, left, right) with gripper *states* `left`/`right` and every action commanding
    closing (the commanded action does not count)."""
    rng = np.random.default_rng(seed)
    acc = StatsAccumulator(sample_fraction=1.0, seed=0, max_quantile_samples=64)
    for i, (task, stage, left, right) in enumerate(samples):
        actions = rng.normal(size=(30, 23)).astype(np.float32)
        actions[:, LEFT] = actions[:, RIGHT] = -1.0
        st = rng.normal(size=23).astype(np.float32)
        st[LEFT], st[RIGHT] = left, right
        acc.add(episode=seed, frame=i, state=st, actions=actions, action_mask=np.ones(30, bool), task=task,
                stage=stage)
    return acc


def test_stats_accumulator_counts_fully_closed_states_and_merges():
    a = fed_accumulator([(3, 2, -1.0, 1.0), (3, 2, -0.97, -1.0), (3, 2, -1.0, 0.0), (3, 2, 1.0, 1.0),
                         (3, 5, 1.0, 1.0), (3, 5, 0.5, 0.0), (None, None, -1.0, -1.0)])
    table = a.finalize(manifest_sha256="0" * 64).gripper_closure
    assert table.frames[3, 2] == 4 and table.frames[3, 5] == 2 and table.frames.sum() == 6
    assert table.closed[3, 2].tolist() == [2, 1] and table.closed[3, 5].tolist() == [0, 0]  # -0.97: holding
    assert table.closed.sum() == 3
    b = fed_accumulator([(3, 2, -1.0, -1.0), (49, 14, -1.0, 1.0)], seed=1)
    a.merge(b)
    merged = a.finalize(manifest_sha256="0" * 64).gripper_closure
    assert merged.frames[3, 2] == 5 and merged.closed[3, 2].tolist() == [3, 2]
    assert merged.frames[49, 14] == 1 and merged.closed[49, 14].tolist() == [1, 0] and merged.frames.sum() == 8
    unlabeled = fed_accumulator([(None, None, -1.0, -1.0)] * 2)
    assert unlabeled.finalize(manifest_sha256="0" * 64).gripper_closure is None


# --- control session ----------------------------------------------------------------------------------------------

IMAGES = np.zeros((3, 224, 224, 3), np.uint8)


def result(seed: int = 0, stage: int = 0) -> InferenceResult:
    return InferenceResult(actions=smooth_chunk(seed), stage_logits=np.eye(15, dtype=np.float32)[stage])


def test_control_session_end_to_end():
    info = PolicyInfo(key="m", cfg=ServingConfig(), num_stages=5, correction=None)
    session = ControlSession()
    session.begin(0, info)
    assert session.needs_inference()
    req = session.request(IMAGES, state())
    assert req.kept is None and req.noise_key == (0, 0, 0) and req.stage == 0 and req.task == 0
    session.accept(state(), result(0, stage=1))
    assert session.events == ["resampled"]
    want = plan_chunk(smooth_chunk(0), info.cfg)
    for i in range(20):
        assert not session.needs_inference()
        np.testing.assert_array_equal(session.next_action(), want.execute[i])
    assert session.needs_inference()
    with pytest.raises(RuntimeError, match="run an inference first"):
        session.next_action()
    req = session.request(IMAGES, state())
    np.testing.assert_array_equal(req.kept, want.kept)
    assert req.noise_key == (0, 0, 1)
    session.accept(state(), result(1, stage=1))
    assert session.voter.stage == 0  # two votes so far: the history is not full
    session.accept(state(), result(2, stage=1))
    assert session.stage == 1 and "stage_advance" in session.events
    assert session.request(IMAGES, state()).noise_key == (0, 0, 3)

    session.begin(0, info)  # same task, same model: nothing is reset
    assert session.stage == 1 and session.inferences == 3 and not session.needs_inference()
    session.reset()
    assert session.kept is None and session.queue is None and session.needs_inference() and session.stage == 0
    assert session.request(IMAGES, state()).noise_key == (0, 0, 0)


def test_control_session_resets_on_a_new_task_or_model():
    info = PolicyInfo(key="m", cfg=ServingConfig(seed=7), num_stages=5, correction=None)
    for task, key in ((3, "m"), (0, "m2")):  # a different task; the same task served by another model
        session = ControlSession()
        session.begin(0, info)
        session.accept(state(), result())
        assert session.kept is not None and not session.needs_inference() and session.inferences == 1
        session.begin(task, dataclasses.replace(info, key=key))
        assert session.kept is None and session.needs_inference() and session.inferences == 0
        assert session.request(IMAGES, state()).noise_key == (7, task, 0)


def test_control_session_applies_the_gripper_correction_before_planning():
    info = PolicyInfo(key="m", cfg=ServingConfig(), num_stages=5, correction=GripperCorrection(closure_table()))
    session = ControlSession()
    session.begin(0, info)
    session.voter.set_stage(1)
    s = state(left=-0.99)
    session.accept(s, result())
    assert session.events == ["open_left", "resampled"]  # the held state has no gripper change
    assert session.next_action()[LEFT] == 1.0
    np.testing.assert_array_equal(session.kept[:, :LEFT], np.tile(s[:LEFT], (4, 1)))


# --- observation parsing ------------------------------------------------------------------------------------------

COLOURS = {"head": (200, 10, 30), "left_wrist": (5, 150, 60), "right_wrist": (90, 40, 250)}


def evaluator_obs(full_resolution: bool = False) -> dict:
    obs = {}
    for cam, key in EVAL_CAMERA_KEYS.items():
        side = (720 if cam == "head" else 480) if full_resolution else 224
        obs[key] = np.empty((side, side, 4), np.uint8)
        obs[key][...] = (*COLOURS[cam], 255)
    obs["robot_r1::proprio"] = np.random.default_rng(0).uniform(0, 0.05, 256).astype(np.float32)
    obs["task_id"] = np.array([7], np.int64)
    return obs


@pytest.mark.parametrize("full_resolution", [False, True])
def test_parse_observation(full_resolution):
    msg = evaluator_obs(full_resolution)
    obs = parse_observation(msg, num_tasks=50)
    assert obs.images.shape == (3, 224, 224, 3) and obs.images.dtype == np.uint8 and obs.task == 7
    for i, cam in enumerate(("head", "left_wrist", "right_wrist")):
        assert np.all(obs.images[i] == np.array(COLOURS[cam], np.uint8)), cam
    assert obs.state.shape == (23,)
    np.testing.assert_array_equal(obs.state, proprio_to_state(msg["robot_r1::proprio"]))


HEAD = EVAL_CAMERA_KEYS["head"]


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop(EVAL_CAMERA_KEYS["left_wrist"]), "no 'robot_r1::robot_r1:left_realsense_link:Camera:0::rgb'"),
    (lambda m: m.__setitem__(HEAD, m[HEAD].astype(np.float32)), f"'{HEAD}' must be a uint8 array, got float32"),
    (lambda m: m.__setitem__(HEAD, m[HEAD][..., :2]), f"'{HEAD}' must have shape"),
    (lambda m: m.__setitem__("robot_r1::proprio", np.zeros(255, np.float32)), r"'robot_r1::proprio'.*\(255,\)"),
    (lambda m: m.__setitem__("robot_r1::proprio", np.zeros(256, np.int64)), "'robot_r1::proprio' must be a float32"),
    (lambda m: m.pop("task_id"), "no 'task_id'"),
    (lambda m: m.__setitem__("task_id", np.array([7.0])), "'task_id' must be an integer array"),
    (lambda m: m.__setitem__("task_id", 7.0), "'task_id' must be an int64 array"),
    (lambda m: m.__setitem__("task_id", np.array([50], np.int64)), "unknown task id 50"),
    (lambda m: m.__setitem__("task_id", np.array([-1], np.int64)), "unknown task id -1"),
])
def test_parse_observation_errors_name_the_key(edit, match):
    msg = evaluator_obs()
    edit(msg)
    with pytest.raises(ObservationError, match=match):
        parse_observation(msg, num_tasks=50)
