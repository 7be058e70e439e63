"""X-VLA served without pi-behavior's tricks: its export's serving.json and a directory without one both turn off
inpainting, voting, the 26->20 speed-up and the correction rules; the model has no stage source, so a gripper
rule asked for is stage-free and the all-zero stage logits never pick a table row."""

from __future__ import annotations

import json
import os
import types

import torch

from serving.config import XVLA_SETTINGS, ServingConfig
from tests.serving_support import first_action, observation
from tests.unit.test_xvla_loading import LEROBOT_DIR


def _export(tmp_path) -> str:
    import data_loaders.manifest
    from tests.unit.test_norm_stats import _random_stats
    from trainer import family_xvla
    from trainer.recipes import get_recipe

    cfg = get_recipe("xvla_debug")
    norm = tmp_path / "norm_stats.json"
    norm.write_text(_random_stats().to_json())
    data = types.SimpleNamespace(norm_stats=str(norm), shards=str(tmp_path))
    manifest = types.SimpleNamespace(tasks={0: "turn on the radio"})
    real = data_loaders.manifest.load_manifest
    data_loaders.manifest.load_manifest = lambda url: manifest  # no shards needed for the export's task list
    try:
        # Only serving.json is read back: any weights do.
        return family_xvla.export({"w": torch.zeros(1)}, cfg, data, str(tmp_path / "export"), step=1,
                                  extra_state=None)
    finally:
        data_loaders.manifest.load_manifest = real


def test_xvla_export_and_lerobot_dir_serve_without_pi_behavior_tricks(tmp_path):
    from serving.policy import ServingPolicy

    out = _export(tmp_path)
    written = json.loads(open(os.path.join(out, "serving.json")).read())
    assert ServingConfig.from_dict(written) == ServingConfig(**XVLA_SETTINGS)
    assert written["gripper_rule"] == "off" and not written["radio_rule"] and not written["interpolation"]
    policy = ServingPolicy.load(LEROBOT_DIR)  # no serving.json: the same settings
    assert policy.cfg == ServingConfig(**XVLA_SETTINGS)
    info = policy.info(0)
    assert not info.stage_source and info.correction is None
    asked = ServingPolicy.load(LEROBOT_DIR, overrides=["gripper_rule=seed"])
    assert asked.cfg.gripper_rule == "seed" and not asked.cfg.radio_rule and not asked.cfg.interpolation
    # Task 7 never closes the left in the seed's tables (stage-free): an empty grasp opens. Task 0's closing
    # depends on the stage, which X-VLA does not have: untouched (the reference's table at the placeholder
    # stage 0 would have opened it).
    shut = observation(7, gripper_width=0.0)
    assert first_action(asked, shut)[14] == 1.0
    assert first_action(asked, observation(0, gripper_width=0.0))[14] != 1.0
