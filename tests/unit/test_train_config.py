"""Recipes, typed overrides and config validation (the trainer's command-line surface)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trainer.config import TrainConfig
from trainer.overrides import apply_overrides, flatten
from trainer.recipes import get_recipe, recipe_names


def test_registry_has_the_reference_recipe_with_the_first_place_values():
    assert {"pi_behavior_b1k", "pi_behavior_debug"} <= set(recipe_names())
    cfg = get_recipe("pi_behavior_b1k")
    o = cfg.optim
    assert (o.peak_lr, o.warmup_steps, o.decay_steps, o.final_lr) == (1e-4, 1000, 20_000, 1e-5)
    assert (o.betas, o.weight_decay, o.grad_clip_norm, o.ema_decay) == ((0.9, 0.95), 1e-10, 1.0, 0.99)
    assert cfg.num_steps == 200_000 and cfg.model == "full" and cfg.global_batch_size == 2048


def test_unknown_recipe_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'pi_behavior_debug'"):
        get_recipe("pi_behavior_debg")


def test_overrides_are_typed_and_validated():
    cfg = apply_overrides(get_recipe("pi_behavior_debug"), [
        "optim.peak_lr=3e-4", "strategy=zero2", "num_steps=2e3", "data.augment=false", "data.synth_tasks=0,5",
        'optim.lr_multipliers=[["vlm_layers", 0.1]]'])
    assert cfg.optim.peak_lr == 3e-4 and cfg.strategy == "zero2" and cfg.num_steps == 2000
    assert cfg.data.augment is False and cfg.data.synth_tasks == (0, 5)
    assert cfg.optim.lr_multipliers == (("vlm_layers", 0.1),)
    with pytest.raises(ValueError, match="did you mean 'peak_lr'"):
        apply_overrides(cfg, ["optim.peak_lrr=1"])
    with pytest.raises(ValueError, match="expected an integer"):
        apply_overrides(cfg, ["num_steps=1.5"])
    with pytest.raises(ValueError, match="not one of"):
        apply_overrides(cfg, ["strategy=horovod"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, ["strategy"])
    with pytest.raises(ValueError, match="nested config"):
        apply_overrides(cfg, ["optim=1"])


def test_global_batch_must_split_over_workers():
    cfg = get_recipe("pi_behavior_debug")  # global 8, micro 4
    assert cfg.grad_accum_steps(1) == 2 and cfg.grad_accum_steps(2) == 1
    with pytest.raises(ValueError, match="not divisible"):
        cfg.grad_accum_steps(3)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        TrainConfig(recipe="x", global_batch_size=10, micro_batch_size=4)


def test_real_recipe_without_shards_says_how_to_fix():
    with pytest.raises(ValueError, match="data.shards=s3://"):
        get_recipe("pi_behavior_b1k").data.check_source()


def test_flatten_gives_dotted_keys():
    flat = flatten(get_recipe("pi_behavior_debug"))
    assert flat["optim.peak_lr"] == 3e-3 and flat["data.num_workers"] == 1 and flat["strategy"] == "ddp"


def test_cli_lists_recipes_and_reports_bad_input_without_traceback():
    help_text = subprocess.run([sys.executable, "-m", "trainer", "fit", "--help"], capture_output=True, text=True)
    assert "pi_behavior_b1k" in help_text.stdout and "pi_behavior_debug" in help_text.stdout
    bad = subprocess.run([sys.executable, "-m", "trainer", "fit", "pi_behavior_debug", "--run-name", "r",
                          "--storage", "/tmp/unused", "--set", "micro_batch_size=3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "multiple of micro_batch_size" in bad.stderr and "Traceback" not in bad.stderr


def test_dependent_fields_can_be_overridden_together():
    from trainer.overrides import apply_overrides
    from trainer.recipes import get_recipe

    base = get_recipe("pi_behavior_debug")
    assert base.optim.final_lr > 1e-5  # so that moving peak_lr alone below it is invalid...
    with pytest.raises(ValueError, match="final_lr must be in"):
        apply_overrides(base, ["optim.peak_lr=1e-5"])
    cfg = apply_overrides(base, ["optim.peak_lr=1e-5", "optim.final_lr=1e-6", "num_steps=9", "num_steps=10"])
    assert (cfg.optim.peak_lr, cfg.optim.final_lr, cfg.num_steps) == (1e-5, 1e-6, 10)  # ...but together it is
    with pytest.raises(ValueError, match="unknown field 'optm' of TrainConfig; did you mean 'optim'"):
        apply_overrides(base, ["optm.peak_lr=1"])
