"""Metadata documents of the synthetic BEHAVIOR-1K dataset, field for field as in the real one.

Reference: behavior_data_and_protocol.md §1.2 (info.json), §1.3 (tasks/episodes/stats/per-episode JSON) and
§1.10 (annotations). Everything here is a pure function of the generated content, so output bytes are
deterministic.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from data_loaders import behavior_facts as bf
from data_loaders.synth_content import EpisodeContent
from data_loaders.synth_render import unique_ins_ids

CODEBASE_VERSION = "v2.1"
ROBOT_TYPE = "R1Pro"
DATA_PATH = "data/task-{episode_chunk:04d}/episode_{episode_index:08d}.parquet"
VIDEO_PATH = "videos/task-{episode_chunk:04d}/{video_key}/episode_{episode_index:08d}.mp4"
METAINFO_PATH = "meta/episodes/task-{episode_chunk:04d}/episode_{episode_index:08d}.json"
ANNOTATION_PATH = "annotations/task-{episode_chunk:04d}/episode_{episode_index:08d}.json"
# Evaluator camera prefixes used in the per-episode `<camera>::unique_ins_ids` keys.
CAMERA_PRIM = {cam: key.rsplit("::", 1)[0] for cam, key in bf.EVAL_CAMERA_KEYS.items()}
_SKILL_TYPE = {sid: kind for sid, _, kind in bf.SKILLS}
STATS_KEYS = ("action", "observation.state", "observation.cam_rel_poses")


def episode_path(template: str, episode_index: int, **extra: str) -> str:
    return template.format(episode_chunk=bf.task_of_episode(episode_index), episode_index=episode_index, **extra)


def info_json(*, num_episodes: int, num_frames: int, num_tasks: int, sizes: dict[str, int],
              rgb_codec: str) -> dict[str, Any]:
    """meta/info.json with the real key order and value types; `sizes` is {camera: square side in pixels}."""
    features: dict[str, Any] = {}
    for modality in bf.MODALITIES:
        for cam in bf.INFO_CAMERA_ORDER:
            size = sizes[cam]
            depth = modality == "depth"
            features[bf.video_key(modality, cam)] = {
                "dtype": "video",
                "shape": [size, size, 3],
                "names": ["height", "width", "depth" if depth else "rgb"],
                "info": {
                    "video.fps": float(bf.FPS),
                    "video.height": size,
                    "video.width": size,
                    "video.channels": 3,
                    "video.codec": rgb_codec if modality == "rgb" else "libx265",
                    "video.pix_fmt": "yuv420p16le" if depth else "yuv420p",  # the real file's claim (see §1.9)
                    "video.is_depth_map": depth,
                    "has_audio": False,
                },
            }
    for key, dtype, shape in (("action", "float32", [bf.ACTION_DIM]), ("timestamp", "float64", [1]),
                              ("episode_index", "int64", [1]), ("index", "int64", [1]),
                              ("observation.cam_rel_poses", "float32", [21]),
                              ("observation.state", "float32", [bf.PROPRIO_DIM]),
                              ("observation.task_info", "float32", [None])):
        features[key] = {"dtype": dtype, "shape": shape, "names": None}
    return {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": ROBOT_TYPE,
        "total_episodes": num_episodes,
        "total_frames": num_frames,
        "total_tasks": num_tasks,
        "total_videos": num_episodes * len(bf.MODALITIES) * len(bf.CAMERAS),
        "chunks_size": bf.EPISODES_PER_CHUNK,
        "fps": bf.FPS,
        "splits": {"train": f"0:{num_episodes}"},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH,
        "metainfo_path": METAINFO_PATH,
        "annotation_path": ANNOTATION_PATH,
        "features": features,
    }


def tasks_rows() -> list[dict[str, Any]]:
    """All 50 lines of meta/tasks.jsonl, in task id order."""
    return [{"task_index": i, "task_name": name, "task": bf.TASK_INSTRUCTIONS[i]}
            for i, name in enumerate(bf.TASK_NAMES)]


def _path_length(x: np.ndarray) -> float:
    steps = np.linalg.norm(np.diff(x.astype(np.float64), axis=0), axis=1)
    return round(float(steps.sum()), 4)


def episodes_row(content: EpisodeContent) -> dict[str, Any]:
    """One meta/episodes.jsonl line: distances are summed per-frame L2 steps of the stored proprio slices."""
    p = content.proprio
    return {
        "episode_index": content.episode_index,
        "tasks": [bf.TASK_INSTRUCTIONS[content.world.task_id]],
        "length": content.length,
        "distance_traveled": _path_length(p[:, bf.PROPRIO["robot_pos"]]),
        "left_eef_displacement": _path_length(p[:, bf.PROPRIO["eef_left_pos"]]),
        "right_eef_displacement": _path_length(p[:, bf.PROPRIO["eef_right_pos"]]),
    }


def _stats(x: np.ndarray) -> dict[str, list]:
    x64 = x.astype(np.float64)
    return {
        "min": x.min(axis=0).tolist(), "max": x.max(axis=0).tolist(),
        "mean": x64.mean(axis=0).tolist(), "std": x64.std(axis=0).tolist(),
        "q01": np.quantile(x64, 0.01, axis=0).tolist(), "q99": np.quantile(x64, 0.99, axis=0).tolist(),
        "count": [int(x.shape[0])],
    }


def episodes_stats_row(content: EpisodeContent) -> dict[str, Any]:
    """One meta/episodes_stats.jsonl line (stats of action, observation.state, observation.cam_rel_poses)."""
    arrays = {"action": content.action, "observation.state": content.proprio,
              "observation.cam_rel_poses": content.cam_rel_poses}
    return {"episode_index": content.episode_index, "stats": {k: _stats(arrays[k]) for k in STATS_KEYS}}


def task_obs_keys(content: EpisodeContent) -> list[str]:
    """Names of the task_info fields, agent first then each task object (BehaviorTask._get_obs order)."""
    keys = [f"agent.n.01_1_{f}" for f in ("real", "pos", "ori_cos", "ori_sin")]
    for obj in content.world.objects:
        keys += [f"{obj.inst}_{f}" for f in ("real", "pos", "ori_cos", "ori_sin", "in_gripper_left",
                                              "in_gripper_right")]
    return keys


def episode_metainfo(content: EpisodeContent) -> dict[str, Any]:
    """meta/episodes/... JSON: merged HDF5 attributes of the recorded episode (strings hold nested JSON)."""
    w = content.world
    task_name = bf.TASK_NAMES[w.task_id]
    inst_meta = {"task": {"inst_to_name": w.inst_to_name}}
    config = {
        "env": {"action_frequency": bf.FPS, "rendering_frequency": bf.FPS, "physics_frequency": 120},
        "scene": {"type": "InteractiveTraversableScene", "scene_model": w.scene_model, "scene_file": {
            "metadata": inst_meta}},
        "robots": [{"type": ROBOT_TYPE, "name": "robot_r1",
                    "obs_modalities": ["rgb", "depth_linear", "seg_instance_id", "proprio"]}],
        "task": {"type": "BehaviorTask", "activity_name": task_name, "activity_definition_id": 0,
                 "activity_instance_id": content.plan.instance_id},
    }
    start = content.task_info[0]
    scene_file = {
        "metadata": inst_meta,
        "state": {"registry": {"object_registry": {
            obj.name: {"root_link": {"pos": start[11 + 12 * i:14 + 12 * i].tolist()}}
            for i, obj in enumerate(w.objects)}}},
        "objects_info": {"init_info": {obj.name: {"class_name": "DatasetObject", "args": {
            "name": obj.name, "category": obj.name.rsplit("_", 2)[0], "model": obj.name.rsplit("_", 2)[1]}}
            for obj in w.objects}},
    }
    doc: dict[str, Any] = {
        "config": json.dumps(config),
        "scene_file": json.dumps(scene_file),
        "n_episodes": 1,
        "n_steps": content.length,
        "num_samples": content.length,
        "transitions": json.dumps({}),  # no object was created or removed during these episodes
        "robot_type": ROBOT_TYPE,
        "task_obs_keys": task_obs_keys(content),
        "task_relevant_objs": [obj.name for obj in w.objects],
        "ins_id_mapping": json.dumps({str(k): v for k, v in w.ins_id_mapping.items()}),
    }
    for cam in bf.INFO_CAMERA_ORDER:
        doc[f"{CAMERA_PRIM[cam]}::unique_ins_ids"] = unique_ins_ids(content, cam)
    return doc


def annotation(content: EpisodeContent) -> dict[str, Any]:
    """annotations/... JSON: skill segments of the plan and primitives grouping consecutive skills."""
    names = [obj.name for obj in content.world.objects]
    skills = []
    for k, seg in enumerate(content.plan.segments):
        objs = [names[seg.target]] + ([names[seg.ref]] if seg.ref is not None else [])
        skills.append({
            "skill_idx": k,
            "skill_id": [seg.skill_id],
            "skill_description": [bf.SKILL_PHRASES[seg.skill_id]],
            "skill_type": [_SKILL_TYPE[seg.skill_id]],
            "object_id": [objs],
            "manipulating_object_id": [] if seg.skill_id == 1 else [names[seg.target]],
            "memory_prefix": list(seg.memory_prefix),
            "spatial_prefix": [],
            "mp_ef": [],
            "frame_duration": [seg.start, seg.end],
        })
    primitives = []
    for p, group in enumerate(content.plan.primitive_groups):
        main = skills[group[-1]]  # e.g. "move to" + "pick up from" is the primitive "pick up from"
        primitives.append({
            "primitive_idx": p,
            "primitive_id": list(main["skill_id"]),
            "primitive_description": list(main["skill_description"]),
            "object_id": main["object_id"],
            "manipulating_object_id": main["manipulating_object_id"],
            "memory_prefix": main["memory_prefix"],
            "spatial_prefix": [],
            "frame_duration": [skills[group[0]]["frame_duration"][0], main["frame_duration"][1]],
            "skill_idxes": list(group),
        })
    return {
        "task_name": bf.TASK_NAMES[content.world.task_id].replace("_", " "),
        "data_folder": "",
        "meta_data": {"task_duration": content.plan.task_duration,
                      "valid_duration": [0, content.plan.task_duration]},
        "skill_annotation": skills,
        "primitive_annotation": primitives,
    }
