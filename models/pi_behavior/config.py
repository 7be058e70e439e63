"""Architecture config of the pi-behavior model (pi_behavior.md §1, values of the `pi_behavior_b1k_fast` run).

Only architecture and the loss/sampler constants that define the model live here; optimizer, precision and
parallelism are the trainer's business. `full()` has the exact pi0.5 dimensions, `tiny()` runs on a CPU.
"""

from __future__ import annotations

import dataclasses

from data_loaders.behavior_facts import (
    ACTION_HORIZON,
    MAX_NUM_STAGES,
    MODEL_DIM,
    NUM_TASKS,
    TASK_NUM_STAGES,
)
from models.common.gemma import GemmaConfig
from models.common.siglip import SiglipConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class PiBehaviorConfig:
    vision: SiglipConfig
    vlm: GemmaConfig  # PaliGemma's Gemma-2B
    expert: GemmaConfig  # the action expert (Gemma-300M); same depth, kv heads and head dim as the VLM
    num_cameras: int = 3  # head, left wrist, right wrist
    num_tasks: int = NUM_TASKS
    task_num_stages: tuple[int, ...] = TASK_NUM_STAGES
    max_num_stages: int = MAX_NUM_STAGES
    stage_dim: int = 1024  # width of the sin-cos and of the learned stage encodings (§1.3)
    action_horizon: int = ACTION_HORIZON
    action_dim: int = MODEL_DIM  # padded action/state dim
    state_bins: int = 256  # state discretisation; bin ids double as Gemma vocabulary ids (§1.4)
    max_fast_tokens: int = 200  # FAST auxiliary sequence length while training (§1.8)
    fast_vocab_size: int = 1024
    use_fast_auxiliary: bool = True
    num_flow_samples: int = 15  # expert samples per VLM pass while training (§3)
    correlation_beta: float = 0.5  # noise ~ N(0, beta*Sigma + (1-beta)*I) (§1.9)
    stage_loss_weight: float = 0.1
    fast_loss_weight: float = 0.05
    num_inference_steps: int = 20
    inpaint_time_threshold: float = 0.3  # pin kept actions while t_new > 0.3 (§4.1)
    time_min_period: float = 4e-3
    time_max_period: float = 4.0

    def __post_init__(self) -> None:
        if (self.vlm.depth, self.vlm.num_kv_heads, self.vlm.head_dim) != (
                self.expert.depth, self.expert.num_kv_heads, self.expert.head_dim):
            raise ValueError("the VLM and the action expert must share depth, kv heads and head_dim "
                             "(they attend jointly and the expert mixes the VLM's per-layer keys/values)")
        if self.vlm.vocab_size < self.state_bins:
            raise ValueError(f"vlm.vocab_size {self.vlm.vocab_size} must cover the {self.state_bins} state bins")
        if len(self.task_num_stages) != self.num_tasks or max(self.task_num_stages) > self.max_num_stages:
            raise ValueError("task_num_stages must have num_tasks entries, each <= max_num_stages")
        if self.num_flow_samples < 1 or self.num_inference_steps < 1:
            raise ValueError("num_flow_samples and num_inference_steps must be >= 1")
        if not 0.0 <= self.correlation_beta <= 1.0:
            raise ValueError(f"correlation_beta must be in [0, 1], got {self.correlation_beta}")

    @property
    def tokens_per_image(self) -> int:
        return self.vision.num_patches

    @property
    def num_image_tokens(self) -> int:
        return self.num_cameras * self.tokens_per_image

    @property
    def task_token_index(self) -> int:
        """Position of the base task token (the stage head reads it): right after the image tokens."""
        return self.num_image_tokens

    @property
    def prefix_len(self) -> int:
        """Prefix tokens without FAST: images + task + 4 stage tokens + state tokens (805 in the full config)."""
        return self.num_image_tokens + 1 + 4 + self.action_dim


def full() -> PiBehaviorConfig:
    """Exact pi0.5 sizes: SigLIP So400m/14, Gemma-2B VLM, Gemma-300M expert."""
    return PiBehaviorConfig(
        vision=SiglipConfig(image_size=224, patch_size=14, width=1152, depth=27, mlp_dim=4304, num_heads=16),
        vlm=GemmaConfig(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256,
                        vocab_size=257152),
        expert=GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    )


def tiny() -> PiBehaviorConfig:
    """A few narrow layers (16 tokens per image) so a training step runs on a CPU in well under a second."""
    return PiBehaviorConfig(
        vision=SiglipConfig(image_size=224, patch_size=56, width=32, depth=2, mlp_dim=64, num_heads=2),
        vlm=GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=16, vocab_size=300),
        expert=GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16),
        stage_dim=32,
        max_fast_tokens=32,
    )


CONFIGS = {"tiny": tiny, "full": full}


def get_config(name: str) -> PiBehaviorConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown pi-behavior config {name!r}; choose one of {sorted(CONFIGS)}")
    return CONFIGS[name]()
