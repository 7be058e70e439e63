"""Per-task synthetic "worlds" and per-episode skill plans for the synthetic BEHAVIOR-1K dataset.

A world is fixed per task (it does not depend on the seed, like the real per-task scenes): the goal-to-target
maps used by synth_content.py, the target colour, the task objects with BDDL and scene names, and the instance-id
registry used by the segmentation videos. A plan is drawn per episode: contiguous skill segments covering
[0, task_duration) with task_duration <= T, each with a goal and a target object.
"""

from __future__ import annotations

import colorsys
import dataclasses
import string
from functools import cache

import numpy as np

from data_loaders import behavior_facts as bf

_WORLD_SALT = 20250  # separates per-task world generators from the per-episode ones
MAX_INSTANCES = 300  # the real data draws its 200 demos per task from ~300 sampled instances
ROBOT_PRIM = "/World/scene_0/controllable__r1pro__robot_r1"

_CATEGORIES = (
    "radio", "coffee_table", "trash_can", "bottle", "plate", "bowl", "microwave", "popcorn_bag", "cabinet",
    "countertop", "fridge", "shelf", "carton", "toy_car", "book", "shoe", "sink", "stove", "frying_pan",
    "chopping_board", "knife", "onion", "head_cabbage", "hot_dog", "pie", "basket", "bucket", "sponge",
    "spray_bottle", "picture_frame", "tripod", "camera", "trumpet", "baseball_cap", "boxing_glove", "firewood",
    "lunch_box", "mousetrap", "easter_egg", "pizza",
)
# Skills that relate a manipulated object to a second (reference) object, e.g. "place on" X Y.
_TWO_OBJECT_SKILLS = frozenset({2, 3, 4, 5, 6, 19, 28, 90, 91, 92, 98})
_MOVE_TO = 1


@dataclasses.dataclass(frozen=True)
class TaskObject:
    inst: str  # BDDL instance name, e.g. "radio.n.01_1"
    name: str  # scene object name, e.g. "radio_koagbh_0"
    ins_id: int  # instance id in the segmentation videos


@dataclasses.dataclass(frozen=True)
class TaskWorld:
    task_id: int
    target_gain: np.ndarray  # (18, 2) A: goal -> torso/arm joint targets
    target_bias: np.ndarray  # (18,) b
    base_gain: np.ndarray  # (3, 2) M: goal -> base velocity target
    color: tuple[int, int, int]  # RGB of the goal square
    objects: tuple[TaskObject, ...]
    scene_model: str
    wall_id: int
    floor_id: int
    gripper_ids: dict[str, int]  # "left"/"right" -> gripper link instance id
    ins_id_mapping: dict[int, str]  # instance id -> prim path (VisionSensor registry)

    @property
    def task_info_dim(self) -> int:
        return 10 + 12 * len(self.objects)

    @property
    def inst_to_name(self) -> dict[str, str]:
        return {"agent.n.01_1": "robot_r1", **{o.inst: o.name for o in self.objects}}


@dataclasses.dataclass(frozen=True)
class Segment:
    """One annotated skill: frames [start, end), moving the displayed goal to `goal`."""

    start: int
    end: int
    skill_id: int
    target: int  # index into world.objects
    ref: int | None  # second object of two-object skills
    memory_prefix: tuple[str, ...]
    goal: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class EpisodePlan:
    instance_id: int
    task_duration: int  # annotated frames; the episode may run a little longer
    segments: tuple[Segment, ...]
    primitive_groups: tuple[tuple[int, ...], ...]  # consecutive skill indices forming one primitive


def num_task_objects(task_id: int) -> int:
    """Non-agent task objects: longer tasks involve more objects (task 0 -> 3, i.e. task_info width 46 as real)."""
    return int(np.clip(round(bf.TASK_DURATION_S[task_id] / 25), 1, 12))


def _random_model_id(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(string.ascii_lowercase), 6))


@cache
def task_world(task_id: int) -> TaskWorld:
    """The fixed synthetic world of a task."""
    rng = np.random.default_rng([_WORLD_SALT, task_id])
    lo, hi = bf.JOINT_RANGE_LOW.astype(np.float64), bf.JOINT_RANGE_HIGH.astype(np.float64)
    joints = np.r_[3:14, 15:22]
    span = (hi - lo)[joints]
    bias = lo[joints] + span * rng.uniform(0.35, 0.65, joints.size)
    gain = np.clip(rng.normal(0.0, 1.0, (joints.size, 2)), -1.7, 1.7) * 0.12 * span[:, None]
    base_gain = rng.uniform(-0.3, 0.3, (3, 2))
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0, 1), 0.55, 1.0)

    mapping = {0: "background", 1: "unlabelled"}
    walls, floors = f"walls_{_random_model_id(rng)}_0", f"floors_{_random_model_id(rng)}_0"
    mapping[2], mapping[3] = f"/World/scene_0/{walls}/base_link/visuals", f"/World/scene_0/{floors}/base_link/visuals"
    links = ("left_gripper_link", "right_gripper_link", "torso_link4", "left_arm_link6", "right_arm_link6")
    for i, link in enumerate(links):
        mapping[4 + i] = f"{ROBOT_PRIM}/{link}/visuals"
    categories = rng.choice(len(_CATEGORIES), num_task_objects(task_id), replace=False)
    objects = []
    for i, c in enumerate(sorted(categories.tolist())):
        cat = _CATEGORIES[c]
        obj = TaskObject(inst=f"{cat}.n.01_1", name=f"{cat}_{_random_model_id(rng)}_0", ins_id=4 + len(links) + i)
        mapping[obj.ins_id] = f"/World/scene_0/{obj.name}/base_link/visuals"
        objects.append(obj)
    return TaskWorld(
        task_id=task_id, target_gain=gain, target_bias=bias, base_gain=base_gain,
        color=(round(r * 255), round(g * 255), round(b * 255)), objects=tuple(objects),
        scene_model=("Rs_int", "Benevolence_1_int", "Pomaria_1_int", "Merom_1_int", "house_single_floor")[task_id % 5],
        wall_id=2, floor_id=3, gripper_ids={"left": 4, "right": 5}, ins_id_mapping=mapping,
    )


def instance_ids(seed: int, task_id: int, n: int) -> list[int]:
    """`n` distinct pseudo-random instance ids in [0, MAX_INSTANCES), sorted; a prefix-stable choice in n."""
    if n > MAX_INSTANCES:
        raise ValueError(f"at most {MAX_INSTANCES} episodes per task (one per scene instance), got {n}")
    perm = np.random.default_rng([seed, task_id, MAX_INSTANCES]).permutation(MAX_INSTANCES)
    return sorted(int(i) for i in perm[:n])


def _draw_goal(rng: np.random.Generator, prev: np.ndarray | None) -> np.ndarray:
    # Consecutive goals are at least 0.6 apart so every segment visibly moves the square and the arms.
    for _ in range(32):
        g = rng.uniform(-0.8, 0.8, 2)
        if prev is None or np.linalg.norm(g - prev) >= 0.6:
            break
    return g


def plan_episode(world: TaskWorld, rng: np.random.Generator, frames: int, instance_id: int) -> EpisodePlan:
    """Draw the skill segments of one episode of `frames` frames."""
    task_duration = frames if rng.random() < 0.4 else frames - int(rng.integers(1, frames // 6 + 1))
    n_seg = int(np.clip(task_duration // 24, 2, 8))
    weights = rng.uniform(0.6, 1.4, n_seg)
    bounds = np.floor(np.cumsum(weights) / weights.sum() * task_duration).astype(int)
    bounds[-1] = task_duration
    starts = np.r_[0, bounds[:-1]]
    n_obj = len(world.objects)
    manip_skills = [sid for sid in bf.SKILL_IDS if sid != _MOVE_TO]
    segments, prev = [], None
    for k in range(n_seg):
        skill = _MOVE_TO if k == 0 or rng.random() < 0.25 else int(rng.choice(manip_skills))
        target = int(rng.integers(n_obj))
        ref = None
        if skill in _TWO_OBJECT_SKILLS and n_obj > 1:
            ref = int((target + 1 + rng.integers(n_obj - 1)) % n_obj)
        memory = ("back",) if skill != _MOVE_TO and rng.random() < 0.1 else ()
        prev = _draw_goal(rng, prev)
        segments.append(Segment(int(starts[k]), int(bounds[k]), skill, target, ref, memory,
                                (float(prev[0]), float(prev[1]))))
    groups, k = [], 0
    while k < n_seg:  # a primitive groups one or two consecutive skills (e.g. "move to" + "pick up from")
        size = min(n_seg - k, 1 + int(rng.integers(2)))
        groups.append(tuple(range(k, k + size)))
        k += size
    return EpisodePlan(instance_id, task_duration, tuple(segments), tuple(groups))
