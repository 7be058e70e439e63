"""fp32 islands of pi-behavior under bf16 (pi_behavior.md §1.6, §1.7, §4.1): the KV-mixing einsum, the inpainting
shift, action_in/out_proj, the time MLP, the task/stage fusion and the stage/FAST heads compute in fp32 under CPU
bf16 autocast, and their parameters stay fp32 under FSDP's bf16 MixedPrecisionPolicy and under ZeRO's bf16 (world
size 1, gloo), so a mixing coefficient of 0.999 (bf16: 1.0) survives an optimizer step.
"""

from __future__ import annotations

import dataclasses
import socket

import pytest
import torch
import torch.distributed as dist

from models.pi_behavior.config import PiBehaviorConfig, tiny
from models.pi_behavior.flow import CorrelatedNoise, Inpainter
from models.pi_behavior.model import PiBehavior
from tests.unit.test_pi_behavior_model import make_batch
from trainer.optim import OptimConfig, build_optimizer, build_param_groups

BF16 = torch.bfloat16
B = 2  # inpainting batch


def small() -> PiBehaviorConfig:
    """The tiny config with 2 flow samples instead of 15 (bf16 matmuls are slow on a CPU)."""
    return dataclasses.replace(tiny(), num_flow_samples=2)


def set_mixing(model: PiBehavior) -> None:
    """Coefficients that bf16 cannot hold: 0.999 and 1.003 round to 1.0, 0.004 to 0.0040 (8-bit mantissa).
    The expert's adaRMS modulation is made non-zero too: at init its gates are 0 and the prefix has no effect."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if name.startswith(("expert_layers.", "expert_norm.")) and ".dense." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        w = torch.tensor([[0.999, 0.004], [0.003, 1.003]])
        model.kv_transform.k_coeffs.copy_(w)
        model.kv_transform.v_coeffs.copy_(w.T)
    assert torch.equal(w.to(BF16).float()[torch.eye(2, dtype=torch.bool)], torch.ones(2))


def output_dtypes(model: PiBehavior, names: tuple[str, ...]) -> tuple[dict[str, set], list]:
    seen: dict[str, set] = {n: set() for n in names}

    def hook(name):
        def record(module, args, out):
            outs = out if isinstance(out, tuple) else (out,)
            seen[name].update(o.dtype for o in outs)
        return record

    handles = [getattr(model, n).register_forward_hook(hook(n)) for n in names]
    return seen, handles


ISLANDS = ("task_stage", "stage_head", "fast_token_proj", "action_in_proj", "action_out_proj", "time_embedding")


def test_islands_compute_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = PiBehavior(small())
    set_mixing(model)
    seen, handles = output_dtypes(model, ISLANDS)
    with torch.autocast("cpu", dtype=BF16):
        loss, _ = model(make_batch(), generator=torch.Generator().manual_seed(1))
        tokens, valid, ar, _ = model.embed_prefix(make_batch(), with_fast=False)
        _, ks, vs = model.run_vlm(tokens, valid, ar)
    for h in handles:
        h.remove()
    assert ks.dtype == BF16  # the backbone itself does run in bf16
    assert {n: s for n, s in seen.items()} == {n: {torch.float32} for n in ISLANDS}

    # KV mixing: bit-equal to the fp32 einsum of the bf16 cache (then cast back to the cache dtype), not to a
    # bf16 einsum, which reads 0.999 as 1.0.
    with torch.autocast("cpu", dtype=BF16):
        mixed_k, mixed_v = model.kv_transform(ks, vs)
    w = model.kv_transform.k_coeffs.detach()
    fp32 = torch.einsum("ji,ibkpe->jbkpe", w, ks.float()).to(BF16)
    bf16 = torch.einsum("ji,ibkpe->jbkpe", w.to(BF16), ks)
    assert mixed_k.dtype == BF16 and torch.equal(mixed_k, fp32)
    assert not torch.equal(fp32, bf16) and (fp32.float() - bf16.float()).abs().max() > 1e-3
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_inpainting_shift_is_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(960, 960, generator=g, dtype=torch.float64) / 960 ** 0.5
    chol = torch.linalg.cholesky(a @ a.T + torch.eye(960, dtype=torch.float64))
    inpainter = Inpainter.for_noise(CorrelatedNoise(chol, beta=0.5), max_correction=1e9)
    z = torch.randn(B, 30, 32, generator=g)
    state = inpainter.start(torch.randn(B, 4, 32, generator=g), z)
    assert state.m_UO.dtype == torch.float32
    x = torch.randn(B, 30, 32, generator=g)
    plain = inpainter.apply(x, 0.9, state)
    with torch.autocast("cpu", dtype=BF16):
        cast = inpainter.apply(x, 0.9, state)
        bf16_matmul = x.reshape(B, -1)[:, :128] @ state.m_UO.mT  # what an unguarded matmul does here
    assert cast.dtype == torch.float32 and torch.equal(cast, plain)
    assert bf16_matmul.dtype == BF16  # (so the guard is what keeps the shift fp32)


def test_a_0999_coefficient_survives_an_optimizer_step_under_autocast():
    torch.manual_seed(0)
    model = PiBehavior(small())
    set_mixing(model)
    cfg = OptimConfig(peak_lr=1e-5, warmup_steps=0, decay_steps=10, final_lr=1e-5)
    opt = build_optimizer(build_param_groups(model, cfg), cfg)
    with torch.autocast("cpu", dtype=BF16):
        loss, _ = model(make_batch(fast=False), generator=torch.Generator().manual_seed(1))
    loss.backward()
    grad = model.kv_transform.k_coeffs.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0
    opt.step()
    c = model.kv_transform.k_coeffs.detach()
    assert c.dtype == torch.float32
    assert c[0, 0] != 0.999 and abs(float(c[0, 0]) - 0.999) <= 1.01e-5  # moved by one Adam step of lr 1e-5
    assert abs(float(c[1, 1]) - 1.003) <= 1.01e-5


# --- FSDP bf16 (world size 1) ------------------------------------------------------------------------------------


@pytest.fixture
def gloo_world_of_one(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    assert not dist.is_initialized()
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_fsdp_bf16_keeps_island_parameters_fp32(gloo_world_of_one):
    from trainer import parallel

    cfg = OptimConfig(peak_lr=1e-5, warmup_steps=0, decay_steps=10, final_lr=1e-5, ema_decay=None)

    def init_fn(model):
        model.to_empty(device="cpu")
        model.init_weights()
        set_mixing(model)

    engine = parallel.build_engine(
        "fsdp", lambda: PiBehavior(small()), init_fn=init_fn, param_groups_fn=lambda m: build_param_groups(m, cfg),
        optimizer_fn=lambda groups: build_optimizer(groups, cfg), device=torch.device("cpu"), precision="bf16")
    model = engine.model
    seen: dict[str, torch.dtype] = {}

    def record(name, get):
        def hook(module, args) -> None:  # runs after FSDP's own pre-forward hook (unshard, input casts)
            seen[name] = get(module, args).dtype
        return hook

    watched = {"kv_transform": (model.kv_transform, lambda m, a: m.k_coeffs),
               "action_in_proj": (model.action_in_proj, lambda m, a: m.weight),
               "action_out_proj": (model.action_out_proj, lambda m, a: m.weight),
               "time_embedding": (model.time_embedding, lambda m, a: m.time_mlp_in.weight),
               "task_stage": (model.task_stage, lambda m, a: m.gate_task.weight),
               "vlm_layers.0": (model.vlm_layers[0], lambda m, a: m.self_attn.q_proj.weight),
               "actions": (model, lambda m, a: a[0]["actions"])}
    hooks = [module.register_forward_pre_hook(record(name, get)) for name, (module, get) in watched.items()]
    engine.train()
    engine.forward_backward(make_batch(fast=False), generator=torch.Generator().manual_seed(1), is_last_micro=True)
    engine.step()
    for h in hooks:
        h.remove()
    assert seen == {"kv_transform": torch.float32, "action_in_proj": torch.float32, "action_out_proj": torch.float32,
                    "time_embedding": torch.float32, "task_stage": torch.float32,
                    "vlm_layers.0": BF16,  # the bf16 policy is on for the backbone
                    "actions": torch.float32}  # flow targets are not rounded to bf16 at the root
    full = engine.full_model_state_dict()
    c = full["kv_transform.k_coeffs"]
    assert c.dtype == torch.float32 and c[0, 0] != 0.999 and abs(float(c[0, 0]) - 0.999) <= 1.01e-5


# --- DeepSpeed ZeRO bf16 (world size 1) ---------------------------------------------------------------------------


def test_zero3_bf16_keeps_island_parameters_fp32(gloo_world_of_one):
    """ZeRO's bf16 (one config for stages 1-3) is torch autocast inside DeepSpeed's forward: the backbone's
    matmuls run in bf16 while every parameter (ZeRO-3: every gathered one) stays fp32, the islands output fp32,
    and 0.999 survives a step."""
    from trainer import parallel

    cfg = OptimConfig(peak_lr=1e-5, warmup_steps=0, decay_steps=10, final_lr=1e-5, ema_decay=None)

    def init_fn(model):
        model.to_empty(device="cpu")
        model.init_weights()
        set_mixing(model)

    engine = parallel.build_engine(
        "zero3", lambda: PiBehavior(small()), init_fn=init_fn, param_groups_fn=lambda m: build_param_groups(m, cfg),
        optimizer_fn=lambda groups: build_optimizer(groups, cfg), device=torch.device("cpu"), precision="bf16")
    model = engine.model
    params: dict[str, torch.dtype] = {}
    outputs: dict[str, torch.dtype] = {}

    def record_param(name, get):
        def hook(module, args) -> None:  # after DeepSpeed's own pre-forward hooks (ZeRO-3 gathers here)
            params[name] = get(module).dtype
        return hook

    def record_output(name):
        def hook(module, args, out) -> None:
            outputs[name] = out.dtype
        return hook

    watched = {"kv_transform": (model.kv_transform, lambda m: m.k_coeffs),
               "action_in_proj": (model.action_in_proj, lambda m: m.weight),
               "action_out_proj": (model.action_out_proj, lambda m: m.weight),
               "vlm_layers.0.q_proj": (model.vlm_layers[0].self_attn.q_proj, lambda m: m.weight)}
    hooks = [module.register_forward_pre_hook(record_param(name, get)) for name, (module, get) in watched.items()]
    hooks += [module.register_forward_hook(record_output(name)) for name, (module, _) in watched.items()
              if name != "kv_transform"]
    engine.train()
    engine.forward_backward(make_batch(fast=False), generator=torch.Generator().manual_seed(1), is_last_micro=True)
    norm = engine.step()
    for h in hooks:
        h.remove()
    assert all(dtype == torch.float32 for dtype in params.values()), params
    assert outputs == {"action_in_proj": torch.float32, "action_out_proj": torch.float32,
                       "vlm_layers.0.q_proj": BF16}  # autocast is on for the backbone, off in the islands
    assert torch.isfinite(torch.tensor(norm)) and norm > 0
    full = engine.full_model_state_dict()
    c = full["kv_transform.k_coeffs"]
    assert c.dtype == torch.float32 and c[0, 0] != 0.999 and abs(float(c[0, 0]) - 0.999) <= 1.01e-5
