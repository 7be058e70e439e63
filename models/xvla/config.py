"""Architecture config of X-VLA and its BEHAVIOR variant (xvla.md §1, §3.2, §4.2).

`full()` is X-VLA-0.9B (Florence-2-large encoder, 24-block soft-prompted transformer) in action mode `auto` with
23-d BEHAVIOR actions; `tiny()` runs on a CPU. Optimizer, precision and parallelism are the trainer's business.
The Florence-2 parts are transformers' native classes; `florence2_config()` builds their config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from data_loaders.behavior_facts import ACTION_DIM, ACTION_HORIZON, NUM_TASKS
from data_loaders.instructions import NUM_XVLA_SKILLS

NUM_SKILLS = NUM_XVLA_SKILLS  # 34 rows; raw skill id -> row: data_loaders/instructions.XVLA_SKILLS
ACTION_MODES = ("auto",)  # X-VLA's ee6d / joint spaces (gripper BCE, sigmoid outputs) are not implemented
# Longest enriched instruction in BART tokens: task 49's sentence is 110 with <s> and </s>, " Current: <phrase>."
# adds up to ~20 for the longest templates; 144 keeps every skill phrase of the 50 tasks (tests/unit/test_xvla_data).
FULL_MAX_TEXT_LEN = 144


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlorenceVisionConfig:
    """DaViT (Florence-2) sizes; the defaults are Florence-2-large."""

    embed_dim: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[int, ...] = (1, 1, 9, 1)
    num_heads: tuple[int, ...] = (8, 16, 32, 64)
    num_groups: tuple[int, ...] = (8, 16, 32, 64)
    window_size: int = 12
    drop_path_rate: float = 0.1
    max_position_embeddings: int = 50  # learned 2-D position table (rows/cols of the final feature map)
    max_temporal_embeddings: int = 100


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlorenceTextConfig:
    """BART encoder sizes; the defaults are Florence-2-large's language model."""

    vocab_size: int = 51289
    d_model: int = 1024
    layers: int = 12
    heads: int = 16
    ffn_dim: int = 4096
    max_position_embeddings: int = 4096
    dropout: float = 0.1  # hidden-state dropout of the BART encoder
    attention_dropout: float | None = None  # None: same as dropout (X-VLA-Pt: 0.1 for all three)
    activation_dropout: float | None = None  # None: same as dropout

    def dropouts(self) -> tuple[float, float, float]:
        """(dropout, attention_dropout, activation_dropout) with the None defaults resolved."""
        return (self.dropout, self.dropout if self.attention_dropout is None else self.attention_dropout,
                self.dropout if self.activation_dropout is None else self.activation_dropout)


@dataclasses.dataclass(frozen=True, kw_only=True)
class XVLAConfig:
    vision: FlorenceVisionConfig = FlorenceVisionConfig()
    text: FlorenceTextConfig = FlorenceTextConfig()
    hidden_size: int = 1024  # soft-prompted transformer width
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.1  # attention and MLP dropout in the transformer blocks
    num_domains: int = 30  # DomainAwareLinear / soft_prompt_hub rows (X-VLA-Pt)
    domain_id: int = 0  # the domain row BEHAVIOR uses for the action in/out layers and the base prompt
    len_soft_prompts: int = 32
    dim_time: int = 32
    max_len_seq: int = 512
    num_actions: int = ACTION_HORIZON  # 30
    action_mode: str = "auto"  # X-VLA's action space: "auto" = pad to max_action_dim, 100 * MSE on the real dims
    real_action_dim: int = ACTION_DIM  # 23: loss and output on these dims ("auto" action mode)
    max_action_dim: int = ACTION_DIM  # model action width
    max_state_dim: int = ACTION_DIM  # proprio width fed to the action encoder (LeRobot's max_state_dim)
    num_views: int = 3  # view 0 (head) goes through the BART encoder with the text, the wrists only through DaViT
    image_size: int = 224
    max_text_len: int = FULL_MAX_TEXT_LEN  # tokens per instruction (X-VLA-Pt: 50, LeRobot: 64); see docs/xvla.md
    num_tasks: int = NUM_TASKS
    num_skills: int = NUM_SKILLS
    skill_loss_weight: float = 0.1  # lambda of the auxiliary skill cross-entropy
    action_loss_scale: float = 100.0  # auto mode: 100 * MSE on the real dims
    num_sampling_steps: int = 10

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}")
        if self.action_mode not in ACTION_MODES:
            raise ValueError(f"action_mode {self.action_mode!r} is not implemented; only {ACTION_MODES}")
        if self.real_action_dim > self.max_action_dim:
            raise ValueError(f"real_action_dim {self.real_action_dim} exceeds max_action_dim {self.max_action_dim}")
        if self.max_state_dim < 1:
            raise ValueError(f"max_state_dim must be >= 1 (the proprio input), got {self.max_state_dim}")
        if not 0 <= self.domain_id < self.num_domains:
            raise ValueError(f"domain_id {self.domain_id} must be in [0, {self.num_domains})")
        if self.num_views < 1 or self.num_tasks < 1 or self.num_skills < 1:
            raise ValueError("num_views, num_tasks and num_skills must be >= 1")
        if self.sequence_length > self.max_len_seq:
            raise ValueError(f"{self.sequence_length} tokens exceed max_len_seq {self.max_len_seq}")
        if self.tokens_per_view + self.max_text_len > self.text.max_position_embeddings:
            raise ValueError(f"view 0's {self.tokens_per_view} image tokens + max_text_len {self.max_text_len} exceed "
                             f"the text encoder's {self.text.max_position_embeddings} positions")
        if len({len(self.vision.embed_dim), len(self.vision.depths), len(self.vision.num_heads)}) != 1:
            raise ValueError("vision.embed_dim, depths and num_heads must have one entry per DaViT stage")

    @property
    def tokens_per_view(self) -> int:
        """1 global + (image_size / 32)^2 grid tokens (50 at 224)."""
        side = self.image_size // 32
        return 1 + side * side

    @property
    def sequence_length(self) -> int:
        """Positions with a learned position embedding: actions + (view 0 + text) + the other views' tokens."""
        return (self.num_actions + self.tokens_per_view + self.max_text_len
                + (self.num_views - 1) * self.tokens_per_view)

    def florence2_config(self) -> Any:
        """transformers.Florence2Config of the encoder-only VLM (the decoder is never built)."""
        from transformers import BartConfig, Florence2Config, Florence2VisionConfig

        v, t = self.vision, self.text
        vision = Florence2VisionConfig(
            depths=list(v.depths), embed_dim=list(v.embed_dim), num_heads=list(v.num_heads),
            num_groups=list(v.num_groups), window_size=v.window_size, drop_path_rate=v.drop_path_rate,
            projection_dim=t.d_model, max_position_embeddings=v.max_position_embeddings,
            max_temporal_embeddings=v.max_temporal_embeddings)
        dropout, attention_dropout, activation_dropout = t.dropouts()
        text = BartConfig(vocab_size=t.vocab_size, d_model=t.d_model, encoder_layers=t.layers, decoder_layers=1,
                          encoder_attention_heads=t.heads, decoder_attention_heads=t.heads, encoder_ffn_dim=t.ffn_dim,
                          decoder_ffn_dim=t.ffn_dim, max_position_embeddings=t.max_position_embeddings,
                          dropout=dropout, attention_dropout=attention_dropout,
                          activation_dropout=activation_dropout, scale_embedding=False)
        return Florence2Config(vision_config=vision, text_config=text)


def full() -> XVLAConfig:
    """X-VLA-0.9B in auto mode with 23-d actions, 50 task and 34 skill prompts."""
    return XVLAConfig()


def tiny() -> XVLAConfig:
    """A few narrow layers: a training step on a CPU in well under a second."""
    return XVLAConfig(
        vision=FlorenceVisionConfig(embed_dim=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                                    num_groups=(1, 2, 2, 4), window_size=4, drop_path_rate=0.0,
                                    max_position_embeddings=16, max_temporal_embeddings=4),
        text=FlorenceTextConfig(vocab_size=512, d_model=32, layers=2, heads=2, ffn_dim=64,
                                max_position_embeddings=128, dropout=0.0),
        hidden_size=32, depth=2, num_heads=2, dropout=0.0, len_soft_prompts=4,
        max_text_len=72,  # byte-level tokenizer: long task sentences are shortened, the skill phrase is kept
    )


CONFIGS = {"tiny": tiny, "full": full}


def get_config(name: str) -> XVLAConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown X-VLA config {name!r}; choose one of {sorted(CONFIGS)}")
    return CONFIGS[name]()
