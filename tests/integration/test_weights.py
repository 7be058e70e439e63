"""Pretrained weights (models/pi_behavior/weights.py).

- PaliGemma parity: a tiny random transformers PaliGemma, saved with `save_pretrained` and read by
  `load_paligemma`, gives the same image tokens, prefix hidden states and per-layer keys/values as transformers
  (fp32, atol 1e-4), under a bidirectional prefix-LM mask and under the real pi-behavior block mask with padding.
- Key layouts: old/new HF PaliGemma names; openpi and LeRobot pi0.5 names (synthesised from a reference model of
  ours), dtype casts, strict all-at-once error reporting.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from models.pi_behavior import masks
from models.pi_behavior.config import tiny
from models.pi_behavior.model import PiBehavior
from models.pi_behavior.weights import (
    PALIGEMMA_PREFIXES,
    PI05_PREFIXES,
    WeightLoadError,
    load_paligemma,
    load_pi05,
)

transformers = pytest.importorskip("transformers")

HF_VOCAB = 320  # > tiny vocab (300): exercises the vocabulary slicing, like the Hub's 257216 -> 257152
IMAGE_TOKEN = 310
ATOL = 1e-4
B = 2
NEW_MODULES = ("task_stage.", "stage_head.", "fast_token_embedding.", "fast_token_proj.", "kv_transform.")


def _randomize_(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (zero-init norms / adaRMS included) so that a wrong mapping shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            if name.endswith("weight") and ("layer_norm" in name or "post_layernorm" in name):
                p.add_(1.0)  # SigLIP LayerNorm scales around 1 (Gemma RMSNorm is 1 + w already)


# --- PaliGemma ------------------------------------------------------------------------------------------------

def _hf_paligemma(cfg):
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    v, d = cfg.vision, cfg.vlm
    vision = SiglipVisionConfig(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.width,
                                num_hidden_layers=v.depth, intermediate_size=v.mlp_dim, num_attention_heads=v.num_heads,
                                layer_norm_eps=v.layer_norm_eps, vision_use_head=False)
    text = GemmaConfig(hidden_size=d.width, num_hidden_layers=d.depth, intermediate_size=d.mlp_dim,
                       num_attention_heads=d.num_heads, num_key_value_heads=d.num_kv_heads, head_dim=d.head_dim,
                       vocab_size=HF_VOCAB, hidden_act="gelu_pytorch_tanh", rms_norm_eps=d.rms_eps)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=d.width, hidden_size=d.width,
                             vocab_size=HF_VOCAB, image_token_index=IMAGE_TOKEN)
    hf = PaliGemmaForConditionalGeneration(config).eval()
    hf.set_attn_implementation("eager")
    _randomize_(hf, seed=0)
    return hf


@pytest.fixture(scope="module")
def paligemma(tmp_path_factory):
    """(our config, HF model, HF directory, our model loaded from it, report)."""
    cfg = tiny()
    hf = _hf_paligemma(cfg)
    hf_dir = str(tmp_path_factory.mktemp("paligemma"))
    hf.save_pretrained(hf_dir, max_shard_size="100KB")  # sharded: index + several files
    assert os.path.isfile(os.path.join(hf_dir, "model.safetensors.index.json"))
    torch.manual_seed(1)
    ours = PiBehavior(cfg).eval()
    report = load_paligemma(ours, hf_dir)
    return cfg, hf, hf_dir, ours, report


def test_paligemma_report_and_weights(paligemma):
    cfg, hf, _, ours, report = paligemma
    sd = ours.state_dict()
    assert report.loaded == sorted(k for k in sd if k.startswith(PALIGEMMA_PREFIXES))
    assert set(report.kept_at_init) == set(sd) - set(report.loaded)
    assert any(k.startswith("expert_layers.") for k in report.kept_at_init)
    assert any("first 300 of 320 vocabulary rows" in n for n in report.notes)
    hf_sd = hf.state_dict()
    torch.testing.assert_close(sd["embed_tokens.weight"], hf_sd["model.language_model.embed_tokens.weight"][:300],
                               rtol=0, atol=0)
    for i in range(cfg.vlm.depth):
        for rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.down_proj.weight",
                     "input_layernorm.weight", "post_attention_layernorm.weight"):
            assert torch.equal(sd[f"vlm_layers.{i}.{rest}"], hf_sd[f"model.language_model.layers.{i}.{rest}"])
    for i in range(cfg.vision.depth):
        assert torch.equal(sd[f"vision_tower.layers.{i}.self_attn.out_proj.weight"],
                           hf_sd[f"model.vision_tower.encoder.layers.{i}.self_attn.out_proj.weight"])
    assert torch.equal(sd["vlm_norm.weight"], hf_sd["model.language_model.norm.weight"])
    assert torch.equal(sd["multi_modal_projector.bias"], hf_sd["model.multi_modal_projector.linear.bias"])


def _images(cfg, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    return torch.rand(B, cfg.num_cameras, 3, size, size, generator=gen) * 2 - 1


@pytest.mark.parametrize("pattern", ["bidirectional", "causal"])
@torch.no_grad()
def test_paligemma_parity_full_pipeline(paligemma, pattern):
    """HF's own pipeline (pixel_values + input_ids) vs ours. bidirectional: token_type_ids = 0 (one prefix-LM
    block) vs our ar = all 0; causal: no token_type_ids vs our ar = all 1."""
    cfg, hf, _, ours, _ = paligemma
    images = _images(cfg, seed=2)
    n_img = cfg.num_image_tokens
    text_ids = torch.randint(0, cfg.vlm.vocab_size, (B, 8), generator=torch.Generator().manual_seed(3))

    # (a) image tokens: transformers 5 no longer divides them by sqrt(width) (nor multiplies inputs_embeds by it;
    # the scale lives in the token embedding), so they compare unscaled, as pi0.5 uses them.
    hf_img = hf.model.get_image_features(images.flatten(0, 1)).pooler_output.reshape(B, n_img, -1)
    our_img = ours.embed_images(images)
    img_diff = (hf_img - our_img).abs().max().item()
    assert img_diff < ATOL, img_diff

    # (b) final-normed prefix hidden states. Positions are passed 0-based (openpi; HF PaliGemma defaults to
    # 1-based, which RoPE makes equivalent up to rounding).
    input_ids = torch.cat([torch.full((B, n_img), IMAGE_TOKEN), text_ids], dim=1)
    s = input_ids.shape[1]
    extra = {"token_type_ids": torch.zeros_like(input_ids)} if pattern == "bidirectional" else {}
    hf_out = hf.model(input_ids=input_ids, pixel_values=images.flatten(0, 1), attention_mask=torch.ones_like(input_ids),
                      position_ids=torch.arange(s)[None].expand(B, -1), **extra)
    tokens = torch.cat([our_img, ours.embed_tokens(text_ids) * cfg.vlm.width ** 0.5], dim=1)
    ar = torch.full((s,), pattern == "causal", dtype=torch.bool)
    out, _, _ = ours.run_vlm(tokens, torch.ones(B, s, dtype=torch.bool), ar)
    diff = (hf_out.last_hidden_state - out).abs().max().item()
    print(f"parity {pattern}: image tokens max|diff| {img_diff:.2e}, hidden {diff:.2e}")
    assert diff < ATOL, diff


@torch.no_grad()
def test_paligemma_parity_block_mask_and_kv(paligemma):
    """The real pi-behavior prefix mask (images+task | stage+state | causal FAST, padding) given to HF as a 4D
    additive mask; compares final hidden states and every layer's post-RoPE keys and values."""
    cfg, hf, _, ours, _ = paligemma
    n_img, n_state, n_fast = cfg.num_image_tokens, 3, 4
    ar = masks.prefix_ar_mask(n_img, n_state, n_fast)
    s = ar.shape[0]
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, cfg.vlm.vocab_size, (B, s - n_img), generator=gen)
    tokens = torch.cat([ours.embed_images(_images(cfg, seed=5)),
                        ours.embed_tokens(ids) * cfg.vlm.width ** 0.5], dim=1)
    valid = torch.ones(B, s, dtype=torch.bool)
    valid[1, -2:] = False  # padded FAST tokens in sample 1
    out, ks, vs = ours.run_vlm(tokens, valid, ar)

    allowed = masks.ensure_nonempty_rows(masks.make_attn_mask(valid, ar[None].expand(B, -1)))
    mask4d = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]
    hf_out = hf.model.language_model(inputs_embeds=tokens, attention_mask=mask4d,
                                     position_ids=masks.positions_from_mask(valid), use_cache=True)
    diff = (hf_out.last_hidden_state - out)[valid].abs().max().item()
    kv_diff = max(max((layer.keys - ks[i]).abs().max().item(), (layer.values - vs[i]).abs().max().item())
                  for i, layer in enumerate(hf_out.past_key_values.layers))
    print(f"parity block mask: hidden max|diff| {diff:.2e}, per-layer k/v {kv_diff:.2e}")
    assert diff < ATOL, diff
    assert kv_diff < ATOL, kv_diff


def _write_hf_dir(path, hf_dir: str, tensors: dict[str, torch.Tensor]) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = f.read()
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config)
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    return str(path)


@pytest.mark.parametrize("layout", ["hub_old", "new_tied_head_only"])
def test_paligemma_key_layouts(paligemma, tmp_path, layout):
    cfg, hf, hf_dir, reference, _ = paligemma
    hf_sd = hf.state_dict()  # transformers 5 in-memory names: model.vision_tower.<no vision_model>...
    if layout == "hub_old":  # as on the Hub: vision_model level, language_model.model.*, plus the tied lm_head
        tensors = {}
        for k, v in hf_sd.items():
            k = k.replace("model.vision_tower.", "vision_tower.vision_model.")
            k = k.replace("model.multi_modal_projector.", "multi_modal_projector.")
            k = k.replace("model.language_model.", "language_model.model.")
            k = k.replace("lm_head.", "language_model.lm_head.")
            tensors[k] = v
        expect_ignored = {"language_model.lm_head.weight"}
    else:  # new names, embedding only as the tied lm_head (what safetensors' save_model keeps)
        tensors = {k.replace("model.vision_tower.", "model.vision_tower.vision_model."): v
                   for k, v in hf_sd.items() if k != "model.language_model.embed_tokens.weight"}
        expect_ignored = set()
    ours = PiBehavior(cfg)
    report = load_paligemma(ours, _write_hf_dir(tmp_path / layout, hf_dir, tensors))
    assert set(report.ignored) == expect_ignored
    ref_sd = reference.state_dict()
    for name in report.loaded:
        assert torch.equal(ours.state_dict()[name], ref_sd[name]), name


def test_paligemma_config_mismatch_names_fields(paligemma, tmp_path):
    cfg, _, hf_dir, _, _ = paligemma
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    config["text_config"]["num_key_value_heads"] = 2
    config["vision_config"]["patch_size"] = 28
    os.makedirs(tmp_path / "bad")
    with open(tmp_path / "bad" / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(WeightLoadError) as err:
        load_paligemma(PiBehavior(cfg), str(tmp_path / "bad"))
    msg = str(err.value)
    assert "text_config.num_key_value_heads = 2" in msg and "vlm.num_kv_heads = 1" in msg
    assert "vision_config.patch_size = 28" in msg and "config.json" in msg


# --- pi0.5 (openpi / LeRobot) ----------------------------------------------------------------------------------

def _openpi_key(name: str) -> str | None:
    """Our name -> openpi PyTorch pi0.5 key (transformers 4.53 module tree); None for pi-behavior additions."""
    pg, ex = "paligemma_with_expert.paligemma.", "paligemma_with_expert.gemma_expert."
    if name.startswith("vision_tower.layers."):
        return pg + "model.vision_tower.vision_model.encoder." + name[len("vision_tower."):]
    if name.startswith("vision_tower."):
        return pg + "model.vision_tower.vision_model." + name[len("vision_tower."):]
    if name.startswith("multi_modal_projector."):
        return pg + "model.multi_modal_projector.linear." + name.split(".", 1)[1]
    if name == "embed_tokens.weight":
        return pg + "lm_head.weight"  # safetensors save_model keeps the tied head's name, not embed_tokens
    if name.startswith("vlm_layers."):
        return pg + "model.language_model.layers." + name[len("vlm_layers."):]
    if name == "vlm_norm.weight":
        return pg + "model.language_model.norm.weight"
    if name.startswith("expert_layers."):
        return ex + "model.layers." + name[len("expert_layers."):]
    if name.startswith("expert_norm."):
        return ex + "model.norm." + name[len("expert_norm."):]
    if name.startswith(("action_in_proj.", "action_out_proj.")):
        return name
    if name.startswith("time_embedding."):
        return name[len("time_embedding."):]
    return None


@pytest.fixture(scope="module")
def pi05_reference():
    cfg = tiny()
    ref = PiBehavior(cfg)
    _randomize_(ref, seed=10)
    tensors = {_openpi_key(k): v for k, v in ref.state_dict().items() if _openpi_key(k) is not None}
    # Stored but unused: the expert's LM head (never filled by the openpi converter).
    tensors["paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.randn(cfg.vlm.vocab_size, cfg.expert.width)
    return cfg, ref, tensors


def _save(tensors: dict[str, torch.Tensor], path, prefix: str = "", dtype: torch.dtype | None = None) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({prefix + k: (v if dtype is None else v.to(dtype)).contiguous().clone() for k, v in tensors.items()},
              str(path))
    return str(path)


def _fresh(cfg) -> PiBehavior:
    torch.manual_seed(123)
    return PiBehavior(cfg)


@pytest.mark.parametrize("flavor", ["openpi_file", "lerobot_dir"])
def test_pi05_loads_everything_and_keeps_new_modules(pi05_reference, tmp_path, flavor):
    cfg, ref, tensors = pi05_reference
    if flavor == "openpi_file":
        path = _save(tensors, tmp_path / "ckpt" / "model.safetensors")
    else:
        _save(tensors, tmp_path / "lerobot" / "model.safetensors", prefix="model.")
        path = str(tmp_path / "lerobot")
    model = _fresh(cfg)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pi05(model, path)

    sd, ref_sd = model.state_dict(), ref.state_dict()
    covered = [k for k in sd if k.startswith(PI05_PREFIXES)]
    assert report.loaded == sorted(covered) and len(covered) == len(tensors) - 1
    for name in covered:
        assert torch.equal(sd[name], ref_sd[name]), name
    new = [k for k in sd if k.startswith(NEW_MODULES)]
    assert new and set(report.kept_at_init) == set(new)
    for name in new:  # untouched init, and (sanity) different from the reference's values
        assert torch.equal(sd[name], init[name]), name
        assert not torch.equal(sd[name], ref_sd[name]), name
    prefix = "model." if flavor == "lerobot_dir" else ""
    assert set(report.ignored) == {prefix + "paligemma_with_expert.gemma_expert.lm_head.weight"}
    assert any("taken from the tied" in n for n in report.notes)
    assert "kept at init (modules): task_stage, stage_head, fast_token_embedding" in report.summary()


def test_pi05_dtype_cast(pi05_reference, tmp_path):
    cfg, ref, tensors = pi05_reference
    bf16_file = _save(tensors, tmp_path / "bf16" / "model.safetensors", dtype=torch.bfloat16)
    model = _fresh(cfg)
    load_pi05(model, bf16_file)
    w = model.expert_layers[1].input_layernorm.dense.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, ref.expert_layers[1].input_layernorm.dense.weight.bfloat16().float())

    fp32_file = _save(tensors, tmp_path / "fp32" / "model.safetensors")
    model = _fresh(cfg).to(torch.bfloat16)
    report = load_pi05(model, fp32_file)
    assert model.vlm_layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.vlm_layers[0].mlp.up_proj.weight, ref.vlm_layers[0].mlp.up_proj.weight.bfloat16())
    assert "checkpoint dtype(s) F32 -> model dtype(s) bfloat16" in report.notes


def test_pi05_reports_all_problems_at_once(pi05_reference, tmp_path):
    cfg, _, tensors = pi05_reference
    bad = dict(tensors)
    del bad["paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.weight"]  # missing
    bad["paligemma_with_expert.gemma_expert.model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)  # unexpected
    bad["some_head.weight"] = torch.zeros(3, 4)  # unexpected
    bad["action_in_proj.weight"] = torch.zeros(cfg.expert.width, 31)  # wrong shape
    bad["model.action_out_proj.bias"] = torch.zeros(cfg.action_dim)  # conflicts with action_out_proj.bias
    path = _save(bad, tmp_path / "bad" / "model.safetensors")
    model = _fresh(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightLoadError) as err:
        load_pi05(model, path)
    msg = str(err.value)
    assert path in msg
    assert "1 missing, 2 unexpected, 1 wrongly shaped, 1 conflicting" in msg
    assert "expert_layers.1.mlp.up_proj.weight (64, 32)" in msg
    assert "gemma_expert.model.layers.0.self_attn.q_proj.bias (32,)" in msg and "some_head.weight (3, 4)" in msg
    assert "action_in_proj.weight: checkpoint (32, 31) (action_in_proj.weight), model (32, 32)" in msg
    assert "action_out_proj.bias <- both action_out_proj.bias and model.action_out_proj.bias" in msg
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed load must not modify the model"


def test_pi0_checkpoint_hint(pi05_reference, tmp_path):
    cfg, _, tensors = pi05_reference
    pi0 = {k: v for k, v in tensors.items() if ".dense." not in k}
    pi0["paligemma_with_expert.gemma_expert.model.norm.weight"] = torch.zeros(cfg.expert.width)
    pi0["state_proj.weight"] = torch.zeros(cfg.expert.width, cfg.action_dim)
    with pytest.raises(WeightLoadError, match="pi0 \\(not pi0.5\\)"):
        load_pi05(_fresh(cfg), _save(pi0, tmp_path / "pi0" / "model.safetensors"))


def test_meta_model_is_refused(pi05_reference, tmp_path):
    cfg, _, tensors = pi05_reference
    with torch.device("meta"):
        model = PiBehavior(cfg)
    with pytest.raises(ValueError, match="meta device"):
        load_pi05(model, _save(tensors, tmp_path / "m" / "model.safetensors"))
