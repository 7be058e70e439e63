"""Low-dimensional content of synthetic BEHAVIOR-1K episodes: a learnable goal-reaching task.

The design (kept deliberately simple so that a trained policy measurably beats a mean-action baseline):

- Each task has a fixed "world" (independent of the seed, like the real per-task scenes): a gain matrix A and
  bias b mapping a 2-D goal g in [-1, 1]^2 to torso/arm joint targets q*(g) = A g + b, a base gain M giving the
  base velocity target v*(g) = M g, a colour, and a list of task objects.
- An episode (random generator seeded by (seed, episode_index), so it does not depend on which other episodes
  are generated) is a sequence of annotated skill segments; each has its own goal. The displayed goal g(t)
  moves smoothly to the next segment's goal at a boundary and circles slowly around it.
- The head camera shows a bright square at a position linear in g(t) (synth_render.py); the wrist cameras show
  the gripper opening. So g(t) is observable from the image at frame t.
- Action (23-d, action order): joints and base are proportional-controller setpoints a = s + K_LEAD (target - s)
  plus small noise; each gripper closes (-1) when its arm is within GRIP_CLOSE_ERR (range-normalised) of its
  target and opens (+1) when the error exceeds GRIP_OPEN_ERR (hysteresis decided by the gripper state). The next
  state follows the action with a first-order lag. Hence the action is an almost-linear function of (state, g(t)),
  and a linear fit on [state, square centroid] explains most of its variance.
- The 256-d proprio is filled consistently from the 23-d state (PROPRIO slices, joint order, sin/cos,
  finite-difference velocities, base pose integrated from the base velocity, smooth stand-in forward kinematics
  for the end effectors), so `behavior_facts.proprio_to_state(proprio) == state` up to float32 rounding.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_loaders import behavior_facts as bf
from data_loaders.synth_plan import EpisodePlan, TaskWorld, plan_episode, task_world

K_LEAD = 0.2  # how far ahead of the state the commanded setpoint is (fraction of the remaining error)
STATE_LAG = 0.35  # first-order response of the joints to the commanded setpoint, per frame
GRIP_LAG = 0.7  # grippers respond faster than the arm
GRIP_CLOSE_ERR = 0.08  # close the gripper when the range-normalised arm error drops below this ...
GRIP_OPEN_ERR = 0.18  # ... and open it only above this (hysteresis: the gripper state tells which side we are on)
ACTION_NOISE = 0.003  # rad (joints) or m/s (base): deterministic teleoperation jitter
SQUARE_DRIFT = 0.08  # radius of the slow circle the displayed goal moves on
DRIFT_PERIOD_FRAMES = 90
TRANSITION_FRAMES = 8  # frames for the displayed goal to move to the next segment's goal

# 23-d indices of the 18 position-controlled joints (torso 3:7, left arm 7:14, right arm 15:22).
JOINT_DIMS = np.r_[3:14, 15:22]
LEFT_ARM, RIGHT_ARM = np.r_[7:14], np.r_[15:22]
_RANGE = (bf.JOINT_RANGE_HIGH - bf.JOINT_RANGE_LOW).astype(np.float64)


@dataclasses.dataclass
class EpisodeContent:
    """Everything a synthetic episode contains besides its rendered images (frames t = 0..T-1)."""

    world: TaskWorld
    plan: EpisodePlan
    episode_index: int
    goal: np.ndarray  # (T, 2) displayed goal g(t)
    target_obj: np.ndarray  # (T,) index into world.objects of the object shown as the target
    state: np.ndarray  # (T, 23) float32 policy state (action order)
    action: np.ndarray  # (T, 23) float32
    proprio: np.ndarray  # (T, 256) float32
    cam_rel_poses: np.ndarray  # (T, 21) float32
    task_info: np.ndarray  # (T, world.task_info_dim) float32

    @property
    def length(self) -> int:
        return int(self.action.shape[0])


def episode_rng(seed: int, episode_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, episode_index])


def generate_episode(task_id: int, instance_id: int, frames: int, seed: int) -> EpisodeContent:
    """Deterministically generate one episode's low-dimensional data."""
    ep = bf.episode_index(task_id, instance_id)
    world = task_world(task_id)
    rng = episode_rng(seed, ep)
    plan = plan_episode(world, rng, frames, instance_id)
    goal, target_obj = _goal_trajectory(plan, rng, frames)
    state, action = _rollout(world, goal, rng)
    proprio, base_pose = _proprio(state, rng)
    return EpisodeContent(
        world=world, plan=plan, episode_index=ep, goal=goal, target_obj=target_obj, state=state, action=action,
        proprio=proprio, cam_rel_poses=_cam_rel_poses(proprio), task_info=_task_info(world, base_pose, rng),
    )


def _goal_trajectory(plan: EpisodePlan, rng: np.random.Generator, T: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(T)
    seg_of_frame = np.searchsorted([s.start for s in plan.segments], t, side="right") - 1
    goals = np.array([s.goal for s in plan.segments])
    g = goals[seg_of_frame].copy()
    # Smoothstep from the previous segment's goal over the first TRANSITION_FRAMES of each segment.
    for k, seg in enumerate(plan.segments[1:], start=1):
        n = min(TRANSITION_FRAMES, seg.end - seg.start)
        u = (np.arange(n) + 1) / n
        w = (u * u * (3 - 2 * u))[:, None]
        g[seg.start:seg.start + n] = goals[k - 1] * (1 - w) + goals[k] * w
    phase = rng.uniform(0, 2 * np.pi)
    ang = 2 * np.pi * t / DRIFT_PERIOD_FRAMES + phase
    g += SQUARE_DRIFT * np.stack([np.cos(ang), np.sin(ang)], axis=1)
    target_obj = np.array([plan.segments[k].target for k in seg_of_frame], dtype=np.int64)
    return g, target_obj


def _rollout(world: TaskWorld, goal: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Closed-loop rollout: action from (state, goal), next state from (state, action)."""
    T = goal.shape[0]
    lo, hi = bf.JOINT_RANGE_LOW.astype(np.float64), bf.JOINT_RANGE_HIGH.astype(np.float64)
    q_star = goal @ world.target_gain.T + world.target_bias  # (T, 18)
    v_star = goal @ world.base_gain.T  # (T, 3)
    noise = rng.normal(0.0, ACTION_NOISE, size=(T, bf.ACTION_DIM))
    s = np.zeros(bf.STATE_DIM)
    s[JOINT_DIMS] = np.clip(world.target_bias + rng.normal(0, 0.05, 18) * _RANGE[JOINT_DIMS],
                            lo[JOINT_DIMS], hi[JOINT_DIMS])
    s[[14, 22]] = 1.0  # demonstrations start with open grippers
    lag = np.full(bf.STATE_DIM, STATE_LAG)
    lag[[14, 22]] = GRIP_LAG
    # (arm dims in the 23-d vector, gripper dim, the arm's columns among the 18 joint targets)
    arms = ((LEFT_ARM, 14, slice(4, 11)), (RIGHT_ARM, 22, slice(11, 18)))
    states, actions = np.empty((T, bf.STATE_DIM)), np.empty((T, bf.ACTION_DIM))
    for t in range(T):
        a = np.empty(bf.ACTION_DIM)
        a[JOINT_DIMS] = s[JOINT_DIMS] + K_LEAD * (q_star[t] - s[JOINT_DIMS])
        a[0:3] = s[0:3] + K_LEAD * (v_star[t] - s[0:3])
        a += noise[t]
        for arm, grip, cols in arms:
            err = np.linalg.norm((q_star[t, cols] - s[arm]) / _RANGE[arm])
            closed = s[grip] < 0.0
            a[grip] = -1.0 if err < (GRIP_OPEN_ERR if closed else GRIP_CLOSE_ERR) else 1.0
        a = np.clip(a, lo, hi)
        states[t], actions[t] = s, a
        s = s + lag * (a - s)
    return states.astype(np.float32), actions.astype(np.float32)


def _eef(arm_q: np.ndarray, torso_q: np.ndarray, side: float) -> tuple[np.ndarray, np.ndarray]:
    """Smooth stand-in for forward kinematics: eef position (base frame) and quaternion xyzw, (T, 3), (T, 4)."""
    q0, q1, q2, q3 = arm_q[:, 0], arm_q[:, 1], arm_q[:, 2], arm_q[:, 3]
    reach = 0.30 * np.cos(q1) + 0.25 * np.cos(q1 + q3)
    pos = np.stack([
        0.25 + reach * np.cos(q0),
        side * (0.22 + 0.15 * np.sin(q0 + 0.3 * q2)),
        1.0 + 0.30 * np.sin(q1) + 0.25 * np.sin(q1 + q3) + 0.25 * np.sin(torso_q[:, 1] + torso_q[:, 0]),
    ], axis=1)
    return pos, _quat_from_rpy(arm_q[:, 4], arm_q[:, 5], arm_q[:, 2] + arm_q[:, 6])


def _quat_from_rpy(roll: np.ndarray, pitch: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    cr, sr, cp, sp, cy, sy = (f(x / 2) for x in (roll, pitch, yaw) for f in (np.cos, np.sin))
    return np.stack([sr * cp * cy - cr * sp * sy, cr * sp * cy + sr * cp * sy,
                     cr * cp * sy - sr * sp * cy, cr * cp * cy + sr * sp * sy], axis=1)


def _velocity(q: np.ndarray) -> np.ndarray:
    """Backward finite difference in units per second (0 at the first frame)."""
    v = np.zeros_like(q)
    v[1:] = (q[1:] - q[:-1]) * bf.FPS
    return v


def _proprio(state: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Fill the 256-d proprio from the 23-d state. Returns (proprio float32 (T, 256), base pose (T, 3) x, y, yaw)."""
    T = state.shape[0]
    s = state.astype(np.float64)
    P = bf.PROPRIO
    # Base pose integrates the (robot-frame) base velocity; the start pose is instance-specific.
    pose = np.empty((T, 3))
    pose[0] = [*rng.uniform(-2.0, 2.0, 2), rng.uniform(-np.pi, np.pi)]
    for t in range(T - 1):
        c, si = np.cos(pose[t, 2]), np.sin(pose[t, 2])
        vx, vy, wz = s[t, 0:3]
        pose[t + 1] = pose[t] + np.array([c * vx - si * vy, si * vx + c * vy, wz]) / bf.FPS
    yaw = pose[:, 2]
    world_vel = np.stack([np.cos(yaw) * s[:, 0] - np.sin(yaw) * s[:, 1],
                          np.sin(yaw) * s[:, 0] + np.cos(yaw) * s[:, 1], np.zeros(T)], axis=1)
    fingers = {side: np.repeat(((s[:, g] + 1.0) / 2.0 * bf.GRIPPER_MAX_WIDTH / 2.0)[:, None], 2, axis=1)
               for side, g in (("left", 14), ("right", 22))}
    arm = {"left": s[:, LEFT_ARM], "right": s[:, RIGHT_ARM]}
    torso = s[:, 3:7]

    joints = np.zeros((T, 28))
    joints[:, 0:2], joints[:, 5] = pose[:, 0:2], yaw  # virtual base joints x, y, z, rx, ry, rz
    joints[:, list(bf.JOINT_TORSO)] = torso
    joints[:, list(bf.JOINT_LEFT_ARM)], joints[:, list(bf.JOINT_RIGHT_ARM)] = arm["left"], arm["right"]
    joints[:, list(bf.JOINT_LEFT_FINGERS)], joints[:, list(bf.JOINT_RIGHT_FINGERS)] = fingers["left"], fingers["right"]
    joint_vel = _velocity(joints)
    joint_vel[:, 0:3], joint_vel[:, 5] = world_vel, s[:, 2]

    p = np.zeros((T, bf.PROPRIO_DIM))
    p[:, P["joint_qpos"]], p[:, P["joint_qpos_sin"]], p[:, P["joint_qpos_cos"]] = joints, np.sin(joints), np.cos(joints)
    p[:, P["joint_qvel"]] = joint_vel
    # The real joint_qeffort is documented as wrong; a gravity-like torque keeps it smooth and plausible.
    p[:, P["joint_qeffort"]] = -2.0 * np.sin(joints) * (np.arange(28) >= 6)
    rpy = np.stack([np.zeros(T), np.zeros(T), yaw], axis=1)
    p[:, P["robot_pos"]] = np.stack([pose[:, 0], pose[:, 1], np.zeros(T)], axis=1)
    p[:, P["robot_ori_cos"]], p[:, P["robot_ori_sin"]] = np.cos(rpy), np.sin(rpy)
    p[:, P["robot_2d_ori"]], p[:, P["robot_2d_ori_cos"]] = yaw[:, None], np.cos(yaw)[:, None]
    p[:, P["robot_2d_ori_sin"]] = np.sin(yaw)[:, None]
    p[:, P["robot_lin_vel"]] = world_vel
    p[:, P["robot_ang_vel"]] = np.stack([np.zeros(T), np.zeros(T), s[:, 2]], axis=1)
    for side in ("left", "right"):
        q = arm[side]
        p[:, P[f"arm_{side}_qpos"]], p[:, P[f"arm_{side}_qvel"]] = q, _velocity(q)
        p[:, P[f"arm_{side}_qpos_sin"]], p[:, P[f"arm_{side}_qpos_cos"]] = np.sin(q), np.cos(q)
        pos, quat = _eef(q, torso, 1.0 if side == "left" else -1.0)
        p[:, P[f"eef_{side}_pos"]], p[:, P[f"eef_{side}_quat"]] = pos, quat
        p[:, P[f"gripper_{side}_qpos"]], p[:, P[f"gripper_{side}_qvel"]] = fingers[side], _velocity(fingers[side])
    p[:, P["trunk_qpos"]], p[:, P["trunk_qvel"]] = torso, _velocity(torso)
    p[:, P["base_qpos"]] = pose
    p[:, P["base_qpos_sin"]], p[:, P["base_qpos_cos"]] = np.sin(pose), np.cos(pose)
    p[:, P["base_qvel"]] = s[:, 0:3]
    return p.astype(np.float32), pose


def _cam_rel_poses(proprio: np.ndarray) -> np.ndarray:
    """3 x [pos(3), quat xyzw(4)] relative to the base, order left_wrist, right_wrist, head."""
    p = proprio.astype(np.float64)
    P = bf.PROPRIO
    T = p.shape[0]
    out = []
    for side in ("left", "right"):
        # The wrist camera sits a few cm behind and above the gripper and shares its orientation.
        out += [p[:, P[f"eef_{side}_pos"]] + np.array([-0.06, 0.0, 0.04]), p[:, P[f"eef_{side}_quat"]]]
    torso = p[:, P["trunk_qpos"]]
    head_pos = np.stack([0.08 + 0.1 * np.sin(torso[:, 1]), np.zeros(T), 1.45 + 0.2 * np.sin(torso[:, 0])], axis=1)
    out += [head_pos, _quat_from_rpy(np.zeros(T), 0.4 + 0.2 * np.sin(torso[:, 2]), 0.3 * np.sin(torso[:, 3]))]
    return np.concatenate(out, axis=1).astype(np.float32)


def _task_info(world: TaskWorld, base_pose: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Agent then objects: real(1), pos(3, world), ori_cos(3), ori_sin(3), objects add in_gripper_left/right.

    Objects stay where the instance placed them; in_gripper_* is -1 as observed in the real episodes.
    """
    T = base_pose.shape[0]
    cols = [np.ones((T, 1)), np.stack([base_pose[:, 0], base_pose[:, 1], np.zeros(T)], axis=1)]
    rpy = np.stack([np.zeros(T), np.zeros(T), base_pose[:, 2]], axis=1)
    cols += [np.cos(rpy), np.sin(rpy)]
    for _ in world.objects:
        pos = np.array([*rng.uniform(-4.0, 4.0, 2), rng.uniform(0.0, 1.2)])
        ori = np.array([0.0, 0.0, rng.uniform(-np.pi, np.pi)])
        row = np.concatenate([[1.0], pos, np.cos(ori), np.sin(ori), [-1.0, -1.0]])
        cols.append(np.repeat(row[None], T, axis=0))
    out = np.concatenate(cols, axis=1).astype(np.float32)
    assert out.shape[1] == world.task_info_dim
    return out
