"""Our X-VLA against LeRobot 0.4.4's own X-VLA: tests/fixtures/golden/xvla_lerobot_tiny/ (its README: how the
files were made, the conventions, the tolerance). The LeRobot directory is loaded the way a user would,
`XVLA.from_pretrained(dir)`, and every output LeRobot wrote is reproduced within allclose(atol=2e-5, rtol=1e-4).
A second test breaks one key mapping and shows the comparison catches it."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from models.modeling_xvla import XVLA

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "fixtures", "golden", "xvla_lerobot_tiny")
ATOL, RTOL = 2e-5, 1e-4


@pytest.fixture(scope="module")
def golden():
    inputs = load_file(os.path.join(GOLDEN, "inputs.safetensors"))
    outputs = load_file(os.path.join(GOLDEN, "outputs.safetensors"))
    return inputs, outputs


def _outputs(model: XVLA, x: dict) -> dict[str, torch.Tensor]:
    """Every quantity LeRobot stored, computed by our model from the same inputs."""
    b = x["input_ids"].shape[0]
    pixels = x["pixel_values"]
    task, skill = torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)
    out = {}
    with torch.no_grad():
        out["vision_tokens"] = model.vlm.encode_images(pixels.flatten(0, 1)).view(b, pixels.shape[1], -1,
                                                                                 model.cfg.text.d_model)
        vlm, aux = model.vlm(pixels, x["image_mask"], x["input_ids"])
        out["vlm_features"], out["aux_visual"] = vlm, aux
        out["pred_clean"] = model.transformer(x_t=x["x_t"], proprio=x["proprio"], t=x["t"], vlm_features=vlm,
                                              aux_visual=aux, domain=x["domain_id"], task=task, skill=skill)
        batch = {"images": pixels, "image_mask": x["image_mask"], "input_ids": x["input_ids"],
                 "proprio": x["proprio"], "actions": x["actions"], "task": task, "skill": torch.full((b,), -1)}
        _, metrics = model(batch, generator=torch.Generator().manual_seed(1234))
        # Upstream X-VLA's auto loss is 100 * MSE (ours); LeRobot's joints_loss is the plain MSE.
        out["joints_loss"] = (metrics["action_loss"] / model.cfg.action_loss_scale).reshape(1)
        for steps in (10, 2):
            out[f"actions_steps{steps}"] = model.generate_actions(
                images=pixels, input_ids=x["input_ids"], task_id=task, skill_id=skill, proprio=x["proprio"],
                image_mask=x["image_mask"], steps=steps, generator=torch.Generator().manual_seed(4321))
        out["policy_actions_allviews_steps10"] = model.generate_actions(
            images=pixels, input_ids=x["input_ids"], task_id=task, skill_id=skill, proprio=x["proprio"],
            steps=10, generator=torch.Generator().manual_seed(4321))
    return out


def _errors(ours: dict, theirs: dict) -> dict[str, float]:
    return {k: float((ours[k] - theirs[k]).abs().max()) for k in theirs}


def _failures(ours: dict, theirs: dict) -> list[str]:
    return [k for k in theirs if not torch.allclose(ours[k], theirs[k], atol=ATOL, rtol=RTOL)]


def test_lerobot_directory_reproduces_lerobot_outputs(golden):
    inputs, expected = golden
    model = XVLA.from_pretrained(GOLDEN + "/model", domain_id=3)  # LeRobot takes the domain per batch
    cfg = model.cfg
    # What the loader read from LeRobot's config.json.
    assert (cfg.num_actions, cfg.max_action_dim, cfg.max_state_dim, cfg.real_action_dim, cfg.max_text_len,
            cfg.action_mode, cfg.num_views, cfg.image_size, cfg.len_soft_prompts) == (
        30, 23, 23, 23, 24, "auto", 3, 96, 4)
    assert cfg.text.dropouts() == (0.0, 0.0, 0.0) and not model.training
    report = model.load_report
    assert len(report.kept) == 223 - 1 and report.dropped == ["model.vlm.language_model.final_logits_bias"]
    assert not report.reinitialized and not report.partial_layers
    assert report.new == ["skill_classifier.bias", "skill_classifier.weight", "skill_row_mask",
                          "transformer.skill_prompt_hub.weight", "transformer.task_prompt_hub.weight"]
    assert torch.count_nonzero(model.transformer.task_prompt_hub.weight) == 0  # new rows: the base model
    assert torch.count_nonzero(model.transformer.skill_prompt_hub.weight) == 0
    # Our uint8 -> ImageNet normalisation equals LeRobot's processor steps.
    torch.testing.assert_close(model.pixels(inputs["images_u8"]), inputs["pixel_values"], atol=1e-6, rtol=0)

    ours = _outputs(model, inputs)
    errors = _errors(ours, expected)
    print("max abs error vs LeRobot:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert not _failures(ours, expected), errors
    # The training draws: Generator(1234) rand(()) / randn(B, T, A) are LeRobot's torch.manual_seed draws.
    g = torch.Generator().manual_seed(1234)
    assert torch.equal(torch.rand((), generator=g).reshape(1), inputs["loss_u"])
    assert torch.equal(torch.randn(inputs["actions"].shape, generator=g), inputs["loss_eps"])


def test_a_broken_key_mapping_fails_the_golden_comparison(golden, monkeypatch):
    """Swap one rename rule (DaViT's attention-side and FFN-side LayerNorms): the file still loads (same shapes),
    and the comparison catches it."""
    from models.xvla import weights

    rules = list(weights._RULES)
    i, j = (next(k for k, (p, _) in enumerate(rules) if s in p.pattern) for s in (r"_attn)\.norm", r"ffn\.norm"))
    (pi, ri), (pj, rj) = rules[i], rules[j]
    rules[i], rules[j] = (pi, rj), (pj, ri)
    monkeypatch.setattr(weights, "_RULES", tuple(rules))
    inputs, expected = golden
    model = XVLA.from_pretrained(GOLDEN + "/model", domain_id=3)
    broken = _failures(_outputs(model, inputs), expected)
    assert {"vision_tokens", "vlm_features", "aux_visual", "pred_clean", "actions_steps10"} <= set(broken)
