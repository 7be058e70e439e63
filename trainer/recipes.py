"""Named training recipes: one registry, validated at construction, listed by every command's --help.

A variant is a new function that starts from a base recipe and replaces a few fields.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Callable

from trainer.config import DataConfig, TrainConfig
from trainer.optim import OptimConfig


def pi_behavior_b1k() -> TrainConfig:
    """The 1st-place BEHAVIOR 2025 run (pi_behavior.md §3): 50 tasks, 200k steps, batch 2048 on 8 GPUs.

    Needs real shards: --set data.shards=s3://bucket/b1k/shards (norm stats and FAST tokenizer next to them).
    """
    return TrainConfig(
        recipe="pi_behavior_b1k",
        model="full",
        data=DataConfig(shards="", synth_tasks=(), num_workers=8, shards_per_group=8),
        optim=OptimConfig(peak_lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-10, grad_clip_norm=1.0,
                          warmup_steps=1000, decay_steps=20_000, final_lr=1e-5, ema_decay=0.99),
        strategy="fsdp",
        precision="auto",
        activation_checkpointing=True,
        global_batch_size=2048,
        micro_batch_size=32,
        num_steps=200_000,
        log_every=25,
        save_every=500,
        keep_last=2,
        keep_period=4000,
    )


def pi_behavior_debug() -> TrainConfig:
    """Tiny pi-behavior on a synthetic BEHAVIOR-format dataset: a few dozen steps on a CPU."""
    return TrainConfig(
        recipe="pi_behavior_debug",
        model="tiny",
        # One 60-frame episode (60 samples): small enough that ~100 CPU steps fit it, which is what the
        # learning check needs; the real recipes stream the full dataset.
        data=DataConfig(shards="", synth_tasks=(0,), synth_episodes_per_task=1, synth_frames=60,
                        synth_samples_per_shard=8, num_workers=1, shards_per_group=2),
        optim=OptimConfig(peak_lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-10, grad_clip_norm=1.0,
                          warmup_steps=5, decay_steps=120, final_lr=3e-4, ema_decay=0.9),
        strategy="ddp",
        precision="fp32",
        global_batch_size=8,
        micro_batch_size=4,
        num_steps=120,
        log_every=5,
        save_every=20,
        keep_last=2,
        keep_period=0,
        peak_tflops_per_worker=0.1,
    )


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "pi_behavior_b1k": pi_behavior_b1k,
    "pi_behavior_debug": pi_behavior_debug,
}


def recipe_names() -> list[str]:
    return sorted(RECIPES)


def get_recipe(name: str) -> TrainConfig:
    """The recipe's config; an unknown name raises ValueError with the closest match and the list."""
    if name not in RECIPES:
        hint = difflib.get_close_matches(name, list(RECIPES), n=1)
        raise ValueError(f"unknown recipe {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                         + f" (recipes: {', '.join(recipe_names())})")
    cfg = RECIPES[name]()
    assert cfg.recipe == name and dataclasses.is_dataclass(cfg)
    return cfg


def recipes_help() -> str:
    return "recipes: " + "; ".join(f"{n} - {(RECIPES[n].__doc__ or '').splitlines()[0]}" for n in recipe_names())
