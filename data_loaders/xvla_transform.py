"""Shard sample -> X-VLA training fields (xvla.md §1.7, §3.3-3.4), used by the trainer and the policy server.

X-VLA works on absolute actions and the raw 23-d state (action mode "auto": no normalisation, 100 * MSE on the
23 dims); images stay uint8 in model camera order (head = view 0 with the text, then the wrists) and the model
normalises them. The instruction is the enriched one ("<task>. Current: <skill phrase>.") for a share of the
samples and the task sentence alone for the rest, because the server only knows the task: with
`enriched_fraction` < 1 the model learns to act from both, and the skill reaches it through the skill prompt.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data_loaders.augment import AugmentConfig
from data_loaders.instructions import XVLA_SKILL_ROW, instruction_ids, skill_phrase, task_sentence
from data_loaders.transforms import SampleTransform


@dataclasses.dataclass(frozen=True)
class XVLASampleTransform:
    tokenizer: Any
    max_text_len: int
    instructions: dict[int, str]  # the manifest's task sentences
    augment: AugmentConfig | None = None
    enriched_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.enriched_fraction <= 1.0:
            raise ValueError(f"enriched_fraction must be in [0, 1], got {self.enriched_fraction}")

    def parts(self, sample: dict[str, Any], rng: np.random.Generator | None) -> tuple[str, str]:
        """(task sentence, skill phrase); the phrase is '' for a task-only instruction or an unknown skill."""
        meta = sample["meta"]
        task = int(meta["task"])
        draw = rng.random() if rng is not None else 0.0
        sentence = task_sentence(task, self.instructions)
        skill = int(meta.get("skill_id", -1))
        if draw < self.enriched_fraction and skill >= 0:
            return sentence, skill_phrase(skill, meta.get("skill_objects", []))
        return sentence, ""

    def text(self, sample: dict[str, Any], rng: np.random.Generator | None) -> str:
        sentence, phrase = self.parts(sample, rng)
        return f"{sentence} Current: {phrase}." if phrase else sentence

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        base = SampleTransform(normalizer=None, augment=self.augment)(sample, rng)
        ids = instruction_ids(self.tokenizer, *self.parts(sample, rng), self.max_text_len)
        meta = sample["meta"]
        # Row of the X-VLA skill table (instructions.XVLA_SKILLS), -1 outside an annotated skill.
        skill = XVLA_SKILL_ROW.get(int(meta.get("skill_id", -1)), -1) if meta.get("skill_valid") else -1
        return {
            "images": base["images"], "proprio": base["state"], "actions": base["actions"],
            "action_mask": base["action_mask"], "task": base["task"], "stage": base["stage"],
            "skill": np.int64(skill), "input_ids": np.asarray(ids, dtype=np.int64),
            "episode": base["episode"], "frame": base["frame"],
        }
