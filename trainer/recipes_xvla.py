"""X-VLA BEHAVIOR variant recipes (seeds/000; xvla.md §2.1, §3.1): the released runs and a tiny debug recipe.

All: warmup 2k + cosine, freeze-then-unfreeze for the first 1k steps (the VLM and the transformer core at LR 0,
the prompts and action heads learning at their constant base LR: X-VLA's prompt warm-up), VLM and soft prompts at
0.1x, AdamW (0.9, 0.95), weight decay 0, clip 1.0, bf16, 16 samples per GPU on 4 GPUs. As in X-VLA's train.py, every
group's warmup starts at the unfreeze step, from 0 (base * p / warmup), and the cosine reaches its 0.1x floor
(min_lr_ratio) at the last step.
"""

from __future__ import annotations

import dataclasses

from trainer.config import DataConfig, TrainConfig
from trainer.optim import OptimConfig

# Parameters that train at 0.1x: the Florence-2 VLM and every prompt table.
_SLOW = ("vlm", "transformer.soft_prompt_hub", "transformer.task_prompt_hub", "transformer.skill_prompt_hub")
# Held at LR 0 during the prompt warm-up: the VLM and the transformer core (not prompts, not action heads).
_FROZEN_FIRST = ("vlm", "transformer.blocks", "transformer.vlm_proj", "transformer.aux_visual_proj",
                 "transformer.pos_emb", "transformer.norm", "skill_classifier")


def _xvla(name: str, lr: float, steps: int, warmup: int = 2000, freeze_steps: int = 1000) -> TrainConfig:
    return TrainConfig(
        recipe=name, family="xvla", model="full",
        data=DataConfig(shards="", synth_tasks=(), num_workers=8, shards_per_group=8),
        optim=OptimConfig(peak_lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0,
                          warmup_steps=warmup, warmup_init_lr=0.0, decay_steps=steps, final_lr=lr * 0.1,
                          ema_decay=None, lr_multipliers=tuple((p, 0.1) for p in _SLOW), freeze=_FROZEN_FIRST,
                          freeze_steps=freeze_steps, restart_warmup_after_freeze=True),
        strategy="fsdp", precision="auto", activation_checkpointing=True,
        global_batch_size=64, micro_batch_size=16, num_steps=steps,
        log_every=50, save_every=5000, keep_last=2, keep_period=50_000,
    )


def xvla_b1k_lr2e4() -> TrainConfig:
    """X-VLA BEHAVIOR, all 50 tasks, lr 2e-4, 200k steps (released: additive_prompts_lr2e4)."""
    return _xvla("xvla_b1k_lr2e4", 2e-4, 200_000)


def xvla_b1k_lr2e5() -> TrainConfig:
    """X-VLA BEHAVIOR, all 50 tasks, lr 2e-5, 200k steps (released: additive_prompts_lr2e5)."""
    return _xvla("xvla_b1k_lr2e5", 2e-5, 200_000)


def xvla_b1k_lr1e4() -> TrainConfig:
    """X-VLA BEHAVIOR, all 50 tasks, lr 1e-4, 100k steps (released partial: additive_prompts_1e4)."""
    return _xvla("xvla_b1k_lr1e4", 1e-4, 100_000)


def xvla_single_task_1() -> TrainConfig:
    """X-VLA BEHAVIOR on task 1 only (~200 episodes), lr 2e-5, 200k steps (released: single_task_1)."""
    base = _xvla("xvla_single_task_1", 2e-5, 200_000)
    return dataclasses.replace(base, data=dataclasses.replace(base.data, tasks=(1,)))


def xvla_single_task_1_2_5_16_18() -> TrainConfig:
    """X-VLA BEHAVIOR on tasks 1, 2, 5, 16, 18 (~1000 episodes), lr 2e-5, 200k steps (released)."""
    base = _xvla("xvla_single_task_1_2_5_16_18", 2e-5, 200_000)
    return dataclasses.replace(base, data=dataclasses.replace(base.data, tasks=(1, 2, 5, 16, 18)))


def xvla_debug() -> TrainConfig:
    """Tiny X-VLA on a synthetic BEHAVIOR-format dataset: a few dozen steps on a CPU."""
    base = _xvla("xvla_debug", 3e-3, 120, warmup=5, freeze_steps=10)
    return dataclasses.replace(
        base, model="tiny",
        data=DataConfig(shards="", synth_tasks=(0,), synth_episodes_per_task=1, synth_frames=60,
                        synth_samples_per_shard=8, num_workers=1, shards_per_group=2),
        strategy="ddp", precision="fp32", activation_checkpointing=False, global_batch_size=8, micro_batch_size=4,
        log_every=5, save_every=20, keep_period=0, peak_tflops_per_worker=0.1)


XVLA_RECIPES = {f.__name__: f for f in (xvla_b1k_lr2e4, xvla_b1k_lr2e5, xvla_b1k_lr1e4, xvla_single_task_1,
                                          xvla_single_task_1_2_5_16_18, xvla_debug)}
