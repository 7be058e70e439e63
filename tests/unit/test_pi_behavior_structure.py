"""pi-behavior structure: the block attention mask, full-size parameter counts (meta device) and FLOPs."""

from __future__ import annotations

import pytest
import torch

from models.pi_behavior import config as pb_config
from models.pi_behavior import masks
from models.pi_behavior.flops import flops_per_sample, parameter_counts
from models.pi_behavior.model import PiBehavior


def expected_pairs(n_img: int, n_state: int, n_fast: int, horizon: int, fast_valid: list[bool]) -> set:
    """Allowed (query, key) pairs written from the block semantics of pi_behavior.md §1.2."""
    blocks: dict[str, list[int]] = {}
    i = 0
    for name, size in (("I", n_img), ("T", 1), ("S", 4), ("X", n_state), ("F", n_fast), ("A", horizon)):
        blocks[name] = list(range(i, i + size))
        i += size
    invalid = {blocks["F"][k] for k, ok in enumerate(fast_valid) if not ok}
    sees = {"I": "IT", "T": "IT", "S": "ITSX", "X": "ITSX", "F": "ITSX", "A": "ITSXA"}
    pairs = set()
    for qb, kbs in sees.items():
        for q in blocks[qb]:
            for kb in kbs:
                pairs.update((q, k) for k in blocks[kb])
            if qb == "F":  # causal among FAST tokens
                pairs.update((q, k) for k in blocks["F"] if k <= q)
    return {(q, k) for q, k in pairs if q not in invalid and k not in invalid}


@pytest.mark.parametrize("fast_valid", [[True, True, True], [True, True, False]])
def test_block_mask_allows_exactly_the_specified_pairs(fast_valid):
    n_img, n_state, n_fast, horizon = 6, 3, 3, 4
    ar = masks.prefix_ar_mask(n_img, n_state, n_fast)
    valid = torch.tensor([[True] * (n_img + 5 + n_state) + fast_valid])
    mask = masks.full_attention_mask(valid, ar, n_fast, horizon)[0]
    got = {(q, k) for q, k in zip(*torch.nonzero(mask, as_tuple=True)) for q, k in [(int(q), int(k))]}
    assert got == expected_pairs(n_img, n_state, n_fast, horizon, fast_valid)


def test_suffix_mask_is_block_diagonal_over_flow_samples():
    m = masks.suffix_mask(torch.tensor([[True, True, False]]), horizon=2, num_samples=3)[0]
    assert m.shape == (6, 3 + 6)
    assert m[:, :3].tolist() == [[True, True, False]] * 6
    own = m[:, 3:]
    for q in range(6):
        assert own[q].nonzero().flatten().tolist() == [2 * (q // 2), 2 * (q // 2) + 1]


def test_positions_skip_padding():
    pos = masks.positions_from_mask(torch.tensor([[True, True, False, True]]))
    assert pos.tolist() == [[0, 1, 1, 2]]


def test_full_config_parameter_counts_on_meta_device():
    cfg = pb_config.full()
    with torch.device("meta"):
        model = PiBehavior(cfg)
    assert all(p.is_meta for p in model.parameters())
    c = parameter_counts(model)
    assert 400e6 <= c["vision_tower"] <= 430e6, c  # SigLIP So400m/14 (~412M)
    assert 1.95e9 <= c["vlm_blocks"] <= 2.0e9, c  # Gemma-2B transformer (~1.98B) ...
    assert c["vlm_embedding"] == 257152 * 2048  # ... plus its 527M-row vocabulary embedding
    assert 300e6 <= c["expert_blocks"] <= 320e6, c  # Gemma-300M expert (~311M) ...
    assert c["expert_adarms"] == 18 * 2 * 1024 * 3072 + (1024 * 3072 + 3072) - 0 + 18 * 2 * 3072  # + adaRMS
    assert c["projector"] == 1152 * 2048 + 2048
    assert 2.9e9 <= c["total"] <= 3.6e9, c


def test_prefix_length_and_task_token_index_match_the_reference():
    cfg = pb_config.full()
    assert cfg.prefix_len == 805 and cfg.task_token_index == 768 and cfg.num_image_tokens == 768


def test_flops_per_sample_full_config_near_the_anchor():
    f = flops_per_sample(pb_config.full())
    # performance_anchors.md §4: pi0.5 with 3 cameras and a 200-token text prompt is ~14.0 TFLOP per training
    # sample. pi-behavior has 805 + 200 FAST prefix tokens (vs 968) and 15 x 30 action tokens (vs 50).
    assert 13.5e12 <= f["total"] <= 17.0e12, f
    assert f["vlm"] > f["vision"] > 0 and f["expert"] > 0
    inference = flops_per_sample(pb_config.full(), training=False)
    assert 4e12 <= inference["total"] <= 6e12, inference  # anchor: 3.9-4.6 prefix + 0.24-0.39 expert TFLOP


def test_config_validation():
    cfg = pb_config.tiny()
    with pytest.raises(ValueError, match="share depth"):
        pb_config.PiBehaviorConfig(vision=cfg.vision, vlm=cfg.vlm,
                                   expert=pb_config.GemmaConfig(width=32, depth=3, mlp_dim=8, num_heads=2,
                                                                num_kv_heads=1, head_dim=16))
    with pytest.raises(ValueError, match="unknown pi-behavior config"):
        pb_config.get_config("huge")


def test_grouped_prefix_attention_equals_block_diagonal_masked_attention():
    from models.common.gemma import attention, grouped_prefix_attention

    g = torch.Generator().manual_seed(0)
    b, h, e, p, group, n = 2, 4, 8, 7, 3, 5
    q = torch.randn(b, h, n * group, e, generator=g)
    kp, vp = torch.randn(b, 1, p, e, generator=g), torch.randn(b, 1, p, e, generator=g)
    ks, vs = torch.randn(b, 1, n * group, e, generator=g), torch.randn(b, 1, n * group, e, generator=g)
    valid = torch.ones(b, p, dtype=torch.bool)
    valid[1, -2:] = False
    full = attention(q, torch.cat([kp, ks], 2), torch.cat([vp, vs], 2), masks.suffix_mask(valid, group, n))
    grouped = grouped_prefix_attention(q, kp, vp, valid, ks, vs, group)
    assert torch.allclose(full, grouped, atol=1e-5)
