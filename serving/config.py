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
    # Gripper correction (§4.4), from the closure table in the artifact's norm stats.
    gripper_correction: bool = True
    closed_threshold: float = -0.98  # gripper state below this = fully closed, i.e. a grasp that holds nothing
    min_close_fraction: float = 0.01  # closing is expected where >= this share of the demo frames close
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

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"{where}: unknown serving settings {unknown}; known: {sorted(known)}")
        return build(cls, doc, where=where)
