"""pi-behavior behaviour on the tiny config: shapes, gradients, stage masking, determinism, save/load, meta
build, activation checkpointing, and that the batched 15-sample expert pass equals 15 separate passes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models.pi_behavior.config import tiny
from models.pi_behavior.flow import CorrelatedNoise
from models.pi_behavior.model import PiBehavior
from trainer.activation_checkpointing import apply_activation_checkpointing

B = 3


def make_batch(seed: int = 0, fast: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {
        "images": torch.randint(0, 256, (B, 3, 224, 224, 3), dtype=torch.uint8, generator=g),
        "state": torch.randn(B, 32, generator=g) * 0.7,
        "actions": torch.randn(B, 30, 32, generator=g),
        "task": torch.tensor([0, 40, 7]),
        "stage": torch.tensor([4, 0, 11]),
    }
    if fast:
        batch["fast_tokens"] = torch.randint(0, 1024, (B, 32), generator=g)
        mask = torch.ones(B, 32, dtype=torch.bool)
        mask[1, 20:] = False  # a shorter FAST sequence, padded
        batch["fast_mask"] = mask
    return batch


@pytest.fixture
def model() -> PiBehavior:
    torch.manual_seed(0)
    return PiBehavior(tiny())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_and_losses(model):
    loss, m = model(make_batch(), generator=gen(0))
    assert loss.shape == () and torch.isfinite(loss)
    assert set(m) == {"loss", "action_loss", "stage_loss", "stage_acc", "fast_loss", "fast_acc"}
    expected = m["action_loss"] + 0.1 * m["stage_loss"] + 0.05 * m["fast_loss"]
    assert torch.allclose(loss.detach(), expected)
    actions, logits = model.sample_actions(make_batch(fast=False), generator=gen(0))
    assert actions.shape == (B, 30, 32) and logits.shape == (B, 15)


def test_stage_logits_are_masked_beyond_each_tasks_stage_count(model):
    _, logits = model.sample_actions(make_batch(fast=False), generator=gen(0))
    # task 0 has 5 stages, task 40 has 5, task 7 has 15 (TASK_NUM_STAGES)
    for row, n in zip(logits, (5, 5, 15)):
        assert torch.isfinite(row[:n]).all() and torch.isneginf(row[n:]).all()


def test_gradients_reach_every_trainable_module(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # The adaRMS gates start at zero (an untrained expert block is the identity), so the first step only
    # opens them; from the second step on, every parameter must receive gradient.
    for step in range(2):
        opt.zero_grad()
        loss, _ = model(make_batch(step), generator=gen(step))
        loss.backward()
        if step == 0:
            opt.step()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert dead == []
    for name in ("task_stage.task_embeddings.weight", "task_stage.fusion_layer1.weight", "kv_transform.k_coeffs",
                 "kv_transform.v_bias", "fast_token_proj.weight", "fast_token_embedding.weight",
                 "expert_layers.0.self_attn.q_proj.weight", "vision_tower.layers.0.mlp.fc1.weight"):
        assert torch.any(dict(model.named_parameters())[name].grad != 0), name


def test_seeded_determinism(model):
    l1, _ = model(make_batch(), generator=gen(5))
    l2, _ = model(make_batch(), generator=gen(5))
    l3, _ = model(make_batch(), generator=gen(6))
    assert torch.equal(l1, l2) and not torch.equal(l1, l3)
    a1, _ = model.sample_actions(make_batch(fast=False), generator=gen(1))
    a2, _ = model.sample_actions(make_batch(fast=False), generator=gen(1))
    assert torch.equal(a1, a2)


def test_save_load_gives_identical_outputs(model, tmp_path):
    model(make_batch(), generator=gen(0))[0].backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # move away from init so a failed load would show
    path = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    torch.manual_seed(123)
    other = PiBehavior(tiny())
    other.load_state_dict(load_file(path), strict=True)
    assert torch.equal(model(make_batch(), generator=gen(2))[0], other(make_batch(), generator=gen(2))[0])
    a1, _ = model.sample_actions(make_batch(fast=False), generator=gen(3))
    a2, _ = other.sample_actions(make_batch(fast=False), generator=gen(3))
    assert torch.equal(a1, a2)


def test_meta_build_then_materialize_and_init(model):
    with torch.device("meta"):
        m = PiBehavior(tiny())
    m.to_empty(device="cpu")
    m.init_weights()
    assert torch.equal(m.kv_transform.k_coeffs, torch.eye(2))
    assert torch.all(m.expert_layers[0].input_layernorm.dense.weight == 0)
    assert m.task_stage.num_stages.tolist()[:3] == [5, 6, 15]
    assert torch.allclose(m.noise.chol_reg, torch.eye(960))
    loss, _ = m(make_batch(), generator=gen(0))
    assert torch.isfinite(loss)


def test_activation_checkpointing_keeps_loss_and_gradients(model):
    batch = make_batch()
    loss, _ = model(batch, generator=gen(0))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert apply_activation_checkpointing(model) == 2 + 2 + 2
    assert apply_activation_checkpointing(model) == 0  # idempotent
    loss2, _ = model(batch, generator=gen(0))
    loss2.backward()
    assert torch.allclose(loss, loss2)
    for n, p in model.named_parameters():
        key = n.replace("._checkpoint_wrapped_module", "")
        if key in grads:
            assert torch.allclose(p.grad, grads[key], atol=1e-6), n


def test_batched_flow_samples_equal_separate_passes(model):
    """The N samples share one prefix in one expert pass; each must equal its own single-sample pass."""
    batch = make_batch(fast=False)
    _, ks, vs, valid, _ = model.prefix_cache(batch, with_fast=False)
    x = torch.randn(B, 15, 30, 32)
    t = torch.rand(B, 15)
    with torch.no_grad():
        batched = model.run_expert(x, t, ks, vs, valid)
        t0 = time.perf_counter()
        single = torch.stack([model.run_expert(x[:, i:i + 1], t[:, i:i + 1], ks, vs, valid)[:, 0]
                              for i in range(15)], dim=1)
    assert time.perf_counter() - t0 > 0
    assert torch.allclose(batched, single, atol=1e-5)


def test_correlated_noise_is_used_by_the_model(model):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(960, 960)) * 0.03
    sigma = a @ a.T + np.eye(960)
    d = np.sqrt(np.diag(sigma))
    chol = np.linalg.cholesky(sigma / d[:, None] / d[None, :])
    model.set_action_correlation(torch.from_numpy(chol))
    assert isinstance(model.noise, CorrelatedNoise)
    z = model.noise.sample((4000,), generator=gen(0)).reshape(4000, 960).double()
    emp = (z.T @ z / 4000).numpy()
    target = 0.5 * (chol @ chol.T) + 0.5 * np.eye(960)
    assert np.abs(emp - target).mean() < 0.02
    assert torch.isfinite(model(make_batch(), generator=gen(0))[0])


def test_inpainting_changes_the_chunk_and_is_deterministic(model):
    batch = make_batch(fast=False)
    kept = torch.randn(B, 4, 32)
    free, _ = model.sample_actions(batch, generator=gen(0))
    a1, _ = model.sample_actions(batch, initial_actions=kept, generator=gen(0))
    a2, _ = model.sample_actions(batch, initial_actions=kept, generator=gen(0))
    assert torch.equal(a1, a2) and not torch.allclose(a1, free)


def test_bad_inputs_are_named(model):
    batch = make_batch(fast=False)
    batch["state"] = batch["state"][:, :23]
    with pytest.raises(ValueError, match="padded to 32"):
        model.sample_actions(batch)
    batch = make_batch(fast=False)
    batch["images"] = batch["images"][:, :2]
    with pytest.raises(ValueError, match="expected 3 cameras"):
        model.sample_actions(batch)
