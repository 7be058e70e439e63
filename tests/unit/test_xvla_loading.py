"""Loading X-VLA directories: LeRobot's layout through every entry point (XVLA.from_pretrained local and s3://,
init_from=xvla:, the policy server), one-line errors for unknown layouts and bad fields, strict prompt and
classifier keys with allow_reinit, and the skill-row mask."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models.modeling_xvla import XVLA
from models.xvla.config import tiny
from models.xvla.weights import XVLAWeightError

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "fixtures", "golden", "xvla_lerobot_tiny")
LEROBOT_DIR = os.path.join(GOLDEN, "model")


def _vision_tokens(model: XVLA) -> torch.Tensor:
    pixels = load_file(os.path.join(GOLDEN, "inputs.safetensors"))["pixel_values"]
    with torch.no_grad():
        return model.vlm.encode_images(pixels.flatten(0, 1))


def test_lerobot_dir_from_s3(s3_bucket, s3fs_client):
    url = f"{s3_bucket}/lerobot-xvla"
    for name in os.listdir(LEROBOT_DIR):
        s3fs_client.put(os.path.join(LEROBOT_DIR, name), f"{url}/{name}")
    remote = XVLA.from_pretrained(url, domain_id=3)
    local = XVLA.from_pretrained(LEROBOT_DIR, domain_id=3)
    assert remote.cfg == local.cfg and remote.load_report.kept == local.load_report.kept
    for k in local.load_report.kept:
        assert torch.equal(remote.state_dict()[k], local.state_dict()[k]), k
    from serving.policy import ServingPolicy  # b1k-train serve --model s3://...

    served = ServingPolicy.load(url)
    assert served.model.load_report.kept == local.load_report.kept


def test_init_from_lerobot_dir_fills_the_tiny_recipe_model():
    from tests.unit.test_norm_stats import _random_stats
    from trainer import family_xvla
    from trainer.overrides import apply_overrides
    from trainer.recipes import get_recipe

    cfg = apply_overrides(get_recipe("xvla_debug"), [f"init_from=xvla:{LEROBOT_DIR}"])
    model = family_xvla.build_model_fn(cfg)()
    family_xvla.make_init_fn(cfg, _random_stats(), torch.device("cpu"))(model)
    reference = XVLA.from_pretrained(LEROBOT_DIR)
    torch.testing.assert_close(_vision_tokens(model.eval()), _vision_tokens(reference), rtol=0, atol=0)
    torch.testing.assert_close(model.transformer.soft_prompt_hub.weight, reference.transformer.soft_prompt_hub.weight)


def test_served_from_a_lerobot_dir():
    from serving.policy import ServingPolicy
    from tests.serving_support import first_action, observation

    policy = ServingPolicy.load(LEROBOT_DIR)
    assert not policy.cfg.inpainting and not policy.cfg.stage_voting  # no serving.json: X-VLA's own defaults
    action = first_action(policy, observation(0))
    assert action.shape == (23,) and np.isfinite(action).all()


def test_unknown_layout_and_bad_fields_fail_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"type": "pi05"}))
    with pytest.raises(XVLAWeightError) as e:
        XVLA.from_pretrained(str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and "not an X-VLA checkpoint directory" in message
    assert "b1k-train" in message and "published" in message and "LeRobot" in message and "type='pi05'" in message

    bad = tmp_path / "bad"
    shutil.copytree(LEROBOT_DIR, bad)
    doc = json.loads((bad / "config.json").read_text())
    for field, value, match in (("chunk_size", "thirty", "field 'chunk_size' must be a non-negative int"),
                                ("action_mode", "ee6d", "field 'action_mode' is 'ee6d'"),
                                ("tokenizer_max_length", -1, "field 'tokenizer_max_length'")):
        (bad / "config.json").write_text(json.dumps({**doc, field: value}))
        with pytest.raises(XVLAWeightError, match=match) as e:
            XVLA.from_pretrained(str(bad))
        assert "\n" not in str(e.value) and str(bad) in str(e.value)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(XVLAWeightError, match="config.json: not readable as JSON"):
        XVLA.from_pretrained(str(bad))
    (bad / "config.json").write_text(json.dumps(doc))
    (bad / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(XVLAWeightError, match="model.safetensors: not a readable safetensors file"):
        XVLA.from_pretrained(str(bad))


def _variant_dir(tmp_path, drop: tuple[str, ...] = (), rename: dict[str, str] | None = None) -> str:
    """A variant checkpoint (LeRobot-style names plus the task/skill tables and the classifier)."""
    out = tmp_path / "variant"
    shutil.copytree(LEROBOT_DIR, out)
    tensors = load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    tensors["model.transformer.task_prompt_hub.weight"] = torch.randn(50, 4 * 32, generator=g)
    tensors["model.transformer.skill_prompt_hub.weight"] = torch.randn(34, 4 * 32, generator=g)
    tensors["model.skill_classifier.weight"] = torch.randn(34, 32, generator=g)
    tensors["model.skill_classifier.bias"] = torch.randn(34, generator=g)
    for key in drop:
        del tensors[key]
    for old, new in (rename or {}).items():
        tensors[new] = tensors.pop(old)
    save_file(tensors, str(out / "model.safetensors"))
    return str(out)


def test_variant_keys_are_strict_unless_allow_reinit_names_them(tmp_path):
    whole = XVLA.from_pretrained(_variant_dir(tmp_path / "a"))
    assert {"skill_classifier.weight", "transformer.skill_prompt_hub.weight"} <= set(whole.load_report.kept)
    # The classifier under another name: loading fails naming the missing tensors and the unused ones.
    renamed = _variant_dir(tmp_path / "b", rename={"model.skill_classifier.weight": "model.skill_head.weight",
                                                   "model.skill_classifier.bias": "model.skill_head.bias"})
    with pytest.raises(XVLAWeightError) as e:
        XVLA.from_pretrained(renamed)
    message = str(e.value)
    assert "missing prompt/classifier tensors ['skill_classifier.bias', 'skill_classifier.weight']" in message
    assert "model.skill_head.weight" in message and "--set allow_reinit=skill_classifier" in message
    model = XVLA.from_pretrained(renamed, allow_reinit=("skill_classifier",))
    assert "skill_classifier.weight" in model.load_report.new and "model.skill_head.weight" in model.load_report.dropped
    # soft_prompt_hub is required even from a base file; a typo in allow_reinit is an error too.
    no_prompt = _variant_dir(tmp_path / "c", drop=("model.transformer.soft_prompt_hub.weight",
                                                   "model.transformer.task_prompt_hub.weight",
                                                   "model.transformer.skill_prompt_hub.weight",
                                                   "model.skill_classifier.weight", "model.skill_classifier.bias"))
    with pytest.raises(XVLAWeightError, match="transformer.soft_prompt_hub.weight"):
        XVLA.from_pretrained(no_prompt)
    with pytest.raises(XVLAWeightError, match="allow_reinit names no tensor of the model: \\['skil_classifier'\\]"):
        XVLA.from_pretrained(whole_dir := _variant_dir(tmp_path / "d"), allow_reinit=("skil_classifier",))
    del whole_dir


def test_trainer_allow_reinit_reaches_the_loader(tmp_path):
    from tests.unit.test_norm_stats import _random_stats
    from trainer import family_xvla
    from trainer.overrides import apply_overrides
    from trainer.recipes import get_recipe

    renamed = _variant_dir(tmp_path, rename={"model.skill_classifier.weight": "model.skill_head.weight",
                                             "model.skill_classifier.bias": "model.skill_head.bias"})
    for sets, ok in (([], False), (["allow_reinit=skill_classifier"], True)):
        cfg = apply_overrides(get_recipe("xvla_debug"), [f"init_from=xvla:{renamed}", *sets])
        model = family_xvla.build_model_fn(cfg)()
        init = family_xvla.make_init_fn(cfg, _random_stats(), torch.device("cpu"))
        if ok:
            init(model)
        else:
            with pytest.raises(XVLAWeightError, match="allow_reinit=skill_classifier"):
                init(model)


def test_unused_skill_rows_are_never_predicted_nor_in_the_loss():
    from data_loaders.instructions import skill_rows_used, unused_skill_rows

    counts = np.zeros(31, np.int64)
    counts[[0, 1, 5]] = [10, 3, 1]
    used = skill_rows_used(counts)
    assert used.shape == (34,) and used.sum() == 3 and not used[31:].any()
    assert unused_skill_rows(counts)[-1] == "row 33 (raw 102 sweep off)" and len(unused_skill_rows(counts)) == 31
    torch.manual_seed(0)
    model = XVLA(tiny()).eval()
    with torch.no_grad():
        model.skill_classifier.bias.zero_()
        model.skill_classifier.bias[20] = 50.0  # the raw classifier prefers an unused row
    g = torch.Generator().manual_seed(0)
    x = {"images": torch.randint(0, 256, (2, 3, 64, 64, 3), generator=g, dtype=torch.uint8),
         "input_ids": torch.randint(3, 200, (2, 16), generator=g)}
    assert set(model.encode(x)[2].argmax(-1).tolist()) == {20}
    model.set_skill_rows_used(torch.from_numpy(used))
    logits = model.encode(x)[2]
    assert set(logits.argmax(-1).tolist()) <= {0, 1, 5}
    assert float(torch.softmax(logits, -1)[:, ~torch.from_numpy(used)].sum()) == 0.0
    model.train()
    batch = {**x, "proprio": torch.zeros(2, 23), "actions": torch.zeros(2, 30, 23), "task": torch.tensor([0, 1]),
             "skill": torch.tensor([0, 5])}
    _, metrics = model(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(metrics["skill_loss"]) and float(metrics["skill_loss"]) < 60.0
