"""Serving test fixtures: two tiny exports over the same synthetic data (different seeded weights), a task
mapping that routes tasks 0,1 to one and 40 to the other, and evaluator-format observations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from checkpoints.export import export_artifact
from data_loaders.behavior_facts import EVAL_CAMERA_KEYS, PROPRIO, PROPRIO_DIM
from models.pi_behavior.config import tiny
from models.pi_behavior.model import PiBehavior
from trainer.data_prep import prepare_data
from trainer.recipes import get_recipe


def make_artifacts(root: Path) -> dict[str, str]:
    """{"a": export dir, "b": export dir, "mapping": mapping json, "norm_stats": url}."""
    data = prepare_data(get_recipe("pi_behavior_debug"), str(root / "data-run"))
    out: dict[str, str] = {"norm_stats": data.norm_stats}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        model = PiBehavior(tiny())
        export_artifact(str(root / name), state_dict=model.state_dict(), model_config_name="tiny",
                        model_config=tiny(), train_config={"seed": seed}, norm_stats_url=data.norm_stats,
                        fast_tokenizer_url=data.fast_tokenizer, step=seed)
        out[name] = str(root / name)
    mapping = {"checkpoints": {"a": {"path": "a", "tasks": [0, 1]}, "b": {"path": "b", "tasks": [40]}}}
    (root / "task_checkpoint_mapping.json").write_text(json.dumps(mapping))
    out["mapping"] = str(root / "task_checkpoint_mapping.json")
    return out


def observation(task: int, *, size: int = 224, seed: int = 0, gripper_width: float = 0.1) -> dict:
    """An observation exactly as the 2025 evaluator sends it (RGBA uint8 cameras, float32 proprio, int64 task).
    `size` 224 = RGBLowResWrapper; None = DefaultWrapper's 720 head / 480 wrists."""
    rng = np.random.default_rng(seed)
    obs = {}
    for cam, key in EVAL_CAMERA_KEYS.items():
        side = size if size else (720 if cam == "head" else 480)
        obs[key] = rng.integers(0, 256, (side, side, 4), dtype=np.uint8)
    proprio = rng.normal(0, 0.1, PROPRIO_DIM).astype(np.float32)
    for side in ("left", "right"):
        proprio[PROPRIO[f"gripper_{side}_qpos"]] = gripper_width / 2
    obs["robot_r1::proprio"] = proprio
    obs["robot_r1::cam_rel_poses"] = rng.normal(0, 1, 21).astype(np.float32)
    obs["task_id"] = np.array([task], dtype=np.int64)
    return obs


def first_action(policy, obs: dict) -> np.ndarray:
    """The action a fresh connection gets for `obs` from `policy` (a ServingPolicy), computed in-process."""
    from serving.control.session import ControlSession
    from serving.observation import parse_observation

    parsed = parse_observation(obs, num_tasks=50)
    session = ControlSession()
    session.begin(parsed.task, policy.info(parsed.task))
    session.accept(parsed.state, policy.infer([session.request(parsed.images, parsed.state)])[0])
    return session.next_action()
