"""Serving configuration: the inference-time control of pi_behavior §4.2-4.4, each part switchable.

It is stored as serving.json inside every export (the trainer writes the defaults), so an artifact carries the
control it was validated with; `b1k-train serve --set key=value` overrides single fields.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from data_loaders.behavior_facts import ACTION_HORIZON

SERVING_FILE = "serving.json"
GRIPPER_RULES = ("data", "seed", "off")
# X-VLA's serving settings: none of pi-behavior's own inference tricks (no stage head, so no voting and no
# stage-dependent rule; no inpainting; no 26->20 speed-up). Its exports write them; a directory without
# serving.json gets them for every field a --set did not move off pi-behavior's default (serving/policy_xvla.py).
XVLA_SETTINGS = {"inpainting": False, "stage_voting": False, "interpolation": False, "gripper_rule": "off",
                 "radio_rule": False}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServingConfig:
    # Action chunking (§4.2): a new chunk every `execute_steps` env steps.
    chunking: bool = True  # False: one inference per env step, its first action executed
    actions_to_execute: int = 26  # chunk rows consumed per inference when compressed...
    execute_steps: int = 20  # ...played back in this many env steps (26 -> 20: a 1.3x speed-up)
    actions_to_keep: int = 4  # rows after the executed ones that seed the next chunk's inpainting
    inpainting: bool = True  # soft, correlation-aware inpainting of the next chunk from the kept rows
    interpolation: bool = True  # cubic resampling of the executed rows (False: execute_steps rows at 1x)
    gripper_change_guard: float = 0.2  # a gripper range above this within the executed rows disables resampling
    # Stage voting (§4.3): the tracked stage is fed back to the model.
    stage_voting: bool = True  # False: the stage input is the argmax of the last stage prediction
    vote_history: int = 3
    votes_to_advance: int = 2
    # Correction rules (§4.4; serving/control/rules.py). Only the first matching rule applies per chunk.
    # "data": the export's table of fully closed demo frames, "seed": the 1st-place hand tables, "off".
    gripper_rule: str = "data"
    radio_rule: bool = True  # task 0 (turning on the radio): stage 4 -> 2, empty grasps opened from stage 2 on
    closed_threshold: float = -0.98  # gripper state below this = fully closed, i.e. a grasp that holds nothing
    min_close_fraction: float = 0.01  # fully closed is "expected" where >= this share of the demo frames are
    # Sampler.
    num_inference_steps: int = 20
    seed: int = 0  # noise is keyed by (seed, task, inference index since reset): replays are exact

    def __post_init__(self) -> None:
        if self.actions_to_execute < 1 or self.execute_steps < 1 or self.actions_to_keep < 0:
            raise ValueError("actions_to_execute and execute_steps must be >= 1 and actions_to_keep >= 0")
        if self.execute_steps > self.actions_to_execute:
            raise ValueError(f"execute_steps ({self.execute_steps}) must be <= actions_to_execute "
                             f"({self.actions_to_execute}): resampling only speeds playback up")
        if self.actions_to_execute + self.actions_to_keep > ACTION_HORIZON:
            raise ValueError(f"actions_to_execute + actions_to_keep must be <= the {ACTION_HORIZON}-step horizon")
        if self.inpainting and self.chunking and not 1 <= self.actions_to_keep < ACTION_HORIZON:
            raise ValueError("inpainting needs 1 <= actions_to_keep; set inpainting=false to keep none")
        if self.vote_history < 1 or not 1 <= self.votes_to_advance <= self.vote_history:
            raise ValueError("vote_history must be >= 1 and 1 <= votes_to_advance <= vote_history")
        if self.num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        if not 0.0 <= self.min_close_fraction <= 1.0:
            raise ValueError("min_close_fraction must be in [0, 1]")
        if self.gripper_rule not in GRIPPER_RULES:
            raise ValueError(f"gripper_rule must be one of {', '.join(GRIPPER_RULES)}, got {self.gripper_rule!r}")

    @property
    def gripper_correction(self) -> bool:
        """Whether a gripper rule is on (the switch older serving.json files and callers use)."""
        return self.gripper_rule != "off"

    @property
    def speedup(self) -> float:
        """Base-velocity scale while resampling (26 rows in 20 steps -> 1.3)."""
        return self.actions_to_execute / self.execute_steps

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, doc: dict[str, Any], *, where: str = SERVING_FILE) -> ServingConfig:
        """From serving.json; ValueError naming `where` and the field (unknown name, wrong type, bad value)."""
        from checkpoints.json_fields import build

        doc = dict(doc)
        legacy = doc.pop("gripper_correction", None)  # serving.json before gripper_rule: a bool switch
        if legacy is not None:
            if not isinstance(legacy, bool):
                raise ValueError(f"{where}: field 'gripper_correction' must be a boolean, got {legacy!r}")
            if not legacy:
                doc.setdefault("gripper_rule", "off")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"{where}: unknown serving settings {unknown}; known: {sorted(known)}")
        return build(cls, doc, where=where)


def xvla_settings(cfg: ServingConfig) -> ServingConfig:
    """`cfg` with XVLA_SETTINGS for every field still at pi-behavior's default (a --set that moved a field keeps
    it; one that set a field to pi-behavior's default value cannot be told apart and is replaced)."""
    default = ServingConfig()
    keep = {k: v for k, v in XVLA_SETTINGS.items() if getattr(cfg, k) == getattr(default, k)}
    return dataclasses.replace(cfg, **keep)
