"""Named training recipes: one registry, validated at construction, listed by every command's --help.

A variant is a new function that starts from a base recipe and replaces a few fields.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Callable

from trainer.config import DataConfig, TrainConfig
from trainer.optim import OptimConfig
from trainer.pipeline_config import EvalConfig, FinetuneConfig, PipelineConfig, SubsetSpec
from trainer.recipes_xvla import XVLA_RECIPES


def pi_behavior_b1k() -> TrainConfig:
    """The 1st-place BEHAVIOR 2025 run: 50 tasks, 200k steps, batch 2048 on 8 GPUs.

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
    **XVLA_RECIPES,
}


# --- pipelines (`b1k-train pipeline`): a pretrain recipe, the fine-tune subsets and the evaluation ---------------

# The 1st-place solution's four fine-tunes (pi_behavior.md §4.5): 20 / 16 / 13 / 1 tasks, task 40 alone.
SEED_SUBSETS = (
    SubsetSpec(name="ckpt1", tasks=(2, 3, 5, 6, 10, 11, 13, 14, 15, 19, 23, 24, 25, 28, 29, 34, 42, 44, 47, 48)),
    SubsetSpec(name="ckpt2", tasks=(0, 1, 7, 8, 9, 12, 16, 17, 18, 20, 21, 22, 26, 30, 43, 45)),
    SubsetSpec(name="ckpt3", tasks=(4, 27, 31, 32, 33, 35, 36, 37, 38, 39, 41, 46, 49)),
    SubsetSpec(name="ckpt4", tasks=(40,)),
)


def pi_behavior_b1k_2stage() -> PipelineConfig:
    """The 1st-place recipe as one job: 50-task pretrain, then the seed's four subset fine-tunes (20/16/13/1 tasks).

    The fine-tune schedule is ours: the seed's per-group learning rates and step counts are unpublished.
    """
    return PipelineConfig(recipe="pi_behavior_b1k_2stage", train=pi_behavior_b1k(), subsets=SEED_SUBSETS,
                          finetune=FinetuneConfig(), eval=EvalConfig(), model_prefix="pi-behavior")


def pi_behavior_debug_2stage() -> PipelineConfig:
    """Tiny two-stage pipeline on synthetic data: 3 tasks, fine-tunes {0,1} and {40}; minutes on a CPU."""
    base = pi_behavior_debug()
    train = dataclasses.replace(
        base, num_steps=10, save_every=5, log_every=2,
        data=dataclasses.replace(base.data, synth_tasks=(0, 1, 40), synth_episodes_per_task=2, synth_frames=60))
    return PipelineConfig(
        recipe="pi_behavior_debug_2stage", train=train,
        subsets=(SubsetSpec(name="ckpt1", tasks=(0, 1)), SubsetSpec(name="ckpt4", tasks=(40,))),
        finetune=FinetuneConfig(num_steps=6, peak_lr=1e-3, warmup_steps=1, decay_steps=6, final_lr=1e-4,
                                save_every=2),
        eval=EvalConfig(holdout_fraction=0.5, max_samples_per_task=24, batch_size=8),
        model_prefix="pi-behavior-debug")


PIPELINES: dict[str, Callable[[], PipelineConfig]] = {
    "pi_behavior_b1k_2stage": pi_behavior_b1k_2stage,
    "pi_behavior_debug_2stage": pi_behavior_debug_2stage,
}


def recipe_names() -> list[str]:
    return sorted(RECIPES)


def get_pipeline(name: str) -> PipelineConfig:
    """The pipeline recipe's config; an unknown name raises ValueError with the closest match and the list."""
    if name not in PIPELINES:
        hint = difflib.get_close_matches(name, list(PIPELINES), n=1)
        raise ValueError(f"unknown pipeline recipe {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                         + f" (pipelines: {', '.join(sorted(PIPELINES))})")
    return PIPELINES[name]()


def _listing(title: str, registry: dict[str, Callable[[], object]]) -> str:
    """`title:` then one line per entry: its name and the first line of its docstring (for --help epilogs, which
    are printed as they are)."""
    width = max(len(n) for n in registry)
    return "\n".join([f"{title}:"] + [f"  {n:{width}s}  {(registry[n].__doc__ or '').strip().splitlines()[0]}"
                                      for n in sorted(registry)])


def pipelines_help() -> str:
    return _listing("pipelines", PIPELINES)


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
    return _listing("recipes", RECIPES)
