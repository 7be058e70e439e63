"""trainer/optim.py: schedule values, param groups, freeze-then-unfreeze through AdamW steps, EMA, config checks."""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from trainer.activation_checkpointing import apply_activation_checkpointing
from trainer.optim import (
    EMA,
    PI_BEHAVIOR_VLM_PREFIXES,
    OptimConfig,
    apply_lrs,
    build_optimizer,
    build_param_groups,
    group_lrs,
    lr_at,
)


class TinyPiBehavior(nn.Module):
    """Same top-level module names as models/pi_behavior/model.py, a few weights each."""

    def __init__(self):
        super().__init__()
        self.vision_tower = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.multi_modal_projector = nn.Linear(4, 4)
        self.embed_tokens = nn.Embedding(8, 4)
        self.vlm_layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.vlm_norm = nn.LayerNorm(4)
        self.expert_layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.expert_norm = nn.LayerNorm(4)
        self.task_stage = nn.Linear(4, 4)
        self.stage_head = nn.Linear(4, 3)
        self.fast_token_embedding = nn.Embedding(8, 4)
        self.fast_token_proj = nn.Linear(4, 8)
        self.kv_transform = nn.Linear(2, 2)
        self.action_in_proj = nn.Linear(4, 4)
        self.action_out_proj = nn.Linear(4, 4)
        self.time_embedding = nn.Linear(4, 4)
        self.fixed = nn.Parameter(torch.ones(3), requires_grad=False)  # not trainable: in no group

    def transformer_blocks(self):
        return [*self.vlm_layers, *self.expert_layers]


class FakeFSDP1Wrapper(nn.Module):
    """Inserts the `_fsdp_wrapped_module` name segment the way FSDP1 (use_orig_params=True) does."""

    def __init__(self, inner):
        super().__init__()
        self._fsdp_wrapped_module = inner


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def names_in(group, model):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# --- schedule ---------------------------------------------------------------------------------------------------


def test_reference_schedule_values():
    cfg = OptimConfig()  # pi-behavior: 1e-4/1001 -> 1e-4 over 1k steps, cosine to 1e-5 at 20k, flat after
    assert lr_at(0, cfg) == pytest.approx(1e-4 / 1001, rel=1e-12)
    assert lr_at(500, cfg) == pytest.approx(1e-4 / 1001 + (1e-4 - 1e-4 / 1001) * 0.5, rel=1e-12)
    assert lr_at(1000, cfg) == pytest.approx(1e-4, rel=1e-12)
    # the cosine spans decay_steps - warmup_steps = 19k steps, so its midpoint is step 10_500
    assert lr_at(10_500, cfg) == pytest.approx(1e-5 + 9e-5 * 0.5, rel=1e-12)
    assert lr_at(5750, cfg) == pytest.approx(1e-5 + 9e-5 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    assert lr_at(20_000, cfg) == pytest.approx(1e-5, rel=1e-12)
    assert lr_at(20_001, cfg) == lr_at(200_000, cfg) == pytest.approx(1e-5, rel=1e-12)


def test_schedule_shape_and_options():
    cfg = OptimConfig(warmup_steps=10, decay_steps=30, peak_lr=1.0, final_lr=0.0, warmup_init_lr=0.0)
    lrs = [lr_at(s, cfg) for s in range(40)]
    assert lrs[:11] == pytest.approx([s / 10 for s in range(11)])
    assert all(a > b for a, b in zip(lrs[10:30], lrs[11:31]))
    assert lrs[30:] == [0.0] * 10
    no_warmup = OptimConfig(warmup_steps=0, decay_steps=10)
    assert lr_at(0, no_warmup) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, cfg)


def test_init_lr_follows_replace():
    cfg = dataclasses.replace(OptimConfig(), peak_lr=2e-4, warmup_steps=2000)
    assert cfg.warmup_init_lr is None and cfg.init_lr == pytest.approx(2e-4 / 2001)


# --- param groups -------------------------------------------------------------------------------------------------


def xvla_like_cfg(**kw):
    mults = tuple((p, 0.1) for p in PI_BEHAVIOR_VLM_PREFIXES) + (("task_stage", 0.1),)
    return OptimConfig(lr_multipliers=mults, freeze=PI_BEHAVIOR_VLM_PREFIXES, freeze_steps=5, warmup_steps=2,
                       decay_steps=100, **kw)


def test_groups_cover_every_trainable_param_once():
    model = TinyPiBehavior()
    groups = build_param_groups(model, xvla_like_cfg())
    assert [g["name"] for g in groups] == ["lr_x0.1_frozen", "lr_x1", "lr_x0.1"]  # order of first appearance
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in trainable(model)) and id(model.fixed) not in ids
    frozen, full, slow = groups
    assert {n.split(".")[0] for n in names_in(frozen, model)} == set(PI_BEHAVIOR_VLM_PREFIXES)
    assert {n.split(".")[0] for n in names_in(slow, model)} == {"task_stage"}
    assert (frozen["freeze"], full["freeze"], slow["freeze"]) == (True, False, False)
    assert frozen["initial_lr"] == frozen["lr"] == 0.0
    assert slow["initial_lr"] == pytest.approx(0.1 * full["initial_lr"])


def test_default_config_is_one_group():
    model = TinyPiBehavior()
    (group,) = build_param_groups(model, OptimConfig())
    assert group["name"] == "lr_x1" and len(group["params"]) == len(trainable(model))


def test_first_matching_prefix_wins_and_segments_match_whole():
    model = TinyPiBehavior()
    cfg = OptimConfig(lr_multipliers=(("vlm_layers.0", 0.5), ("vlm_layers", 0.1), ("vision_tower", 0.1)))
    groups = {g["name"]: names_in(g, model) for g in build_param_groups(model, cfg)}
    assert groups["lr_x0.5"] == {"vlm_layers.0.weight", "vlm_layers.0.bias"}
    assert {"vlm_layers.1.weight", "vision_tower.0.weight"} <= groups["lr_x0.1"]
    assert "vlm_norm.weight" in groups["lr_x1"]  # "vlm" prefixes do not leak into vlm_norm


@pytest.mark.parametrize("wrap", ["checkpoint", "fsdp1", "data_parallel"])
def test_wrapper_segments_are_ignored(wrap):
    model = TinyPiBehavior()
    if wrap == "checkpoint":
        assert apply_activation_checkpointing(model) == 4
        assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
        wrapped = model
    elif wrap == "fsdp1":
        wrapped = FakeFSDP1Wrapper(model)
    else:
        wrapped = nn.DataParallel(model)  # no GPUs: a plain wrapper named "module"
    expected = [(g["name"], len(g["params"])) for g in build_param_groups(TinyPiBehavior(), xvla_like_cfg())]
    groups = build_param_groups(wrapped, xvla_like_cfg())
    assert [(g["name"], len(g["params"])) for g in groups] == expected


def test_unknown_prefix_is_an_error():
    with pytest.raises(ValueError, match=r"vision_towr.*top-level modules.*vision_tower"):
        build_param_groups(TinyPiBehavior(), OptimConfig(lr_multipliers=(("vision_towr", 0.1),)))
    with pytest.raises(ValueError, match="fixed"):
        build_param_groups(TinyPiBehavior(), OptimConfig(freeze=("fixed",), freeze_steps=3))


def test_group_lrs_freeze_then_unfreeze():
    cfg = xvla_like_cfg()
    groups = build_param_groups(TinyPiBehavior(), cfg)
    for step in (0, 1, 4):
        frozen, full, slow = group_lrs(step, groups, cfg)
        assert frozen == 0.0 and full == lr_at(step, cfg) and slow == pytest.approx(0.1 * lr_at(step, cfg))
    for step in (5, 50, 500):
        assert group_lrs(step, groups, cfg) == pytest.approx([0.1 * lr_at(step, cfg), lr_at(step, cfg),
                                                              0.1 * lr_at(step, cfg)])


def xvla_reference_lr(step: int, base: float, frozen_first: bool, *, freeze: int, warmup: int, iters: int,
                      min_ratio: float) -> float:
    """X-VLA train.py's schedule for one group (xvla.md §2.1), written out independently of trainer/optim.py."""
    if step < freeze:
        return 0.0 if frozen_first else base
    p = step - freeze
    if p < warmup:
        return base * p / warmup
    progress = min(1.0, (p - warmup) / (iters - freeze - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class TinyXVLA(nn.Module):
    """Same module names as models/xvla/model.py (building even the tiny X-VLA takes ~15 s on a busy CPU)."""

    def __init__(self):
        super().__init__()
        vlm_parts = ("vision_tower", "multi_modal_projector", "language_model")
        self.vlm = nn.ModuleDict({n: nn.Linear(2, 2) for n in vlm_parts})
        t = nn.Module()
        t.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
        for name in ("vlm_proj", "aux_visual_proj", "action_encoder", "action_decoder"):
            setattr(t, name, nn.Linear(2, 2))
        t.pos_emb = nn.Parameter(torch.zeros(1, 3, 2))
        t.norm = nn.LayerNorm(2)
        for name in ("soft_prompt_hub", "task_prompt_hub", "skill_prompt_hub"):
            setattr(t, name, nn.Embedding(3, 2))
        self.transformer = t
        self.skill_classifier = nn.Linear(2, 3)


def test_xvla_recipe_schedule_per_group_at_the_boundaries():
    """The real X-VLA recipe on X-VLA's module names: 4 groups like X-VLA's train.py. The table of each group's LR
    at the boundary steps is printed (pytest -s)."""
    from trainer.recipes_xvla import xvla_b1k_lr1e4

    cfg = xvla_b1k_lr1e4().optim
    lr, freeze, warmup, iters = 1e-4, 1000, 2000, 100_000
    model = TinyXVLA()
    groups = build_param_groups(model, cfg)
    kind = {"lr_x0.1_frozen": "vlm", "lr_x0.1": "soft_prompts", "lr_x1_frozen": "transformer_core",
            "lr_x1": "action_heads"}
    assert sorted(g["name"] for g in groups) == sorted(kind)
    by_kind = {kind[g["name"]]: names_in(g, model) for g in groups}
    assert all(n.startswith("vlm.") for n in by_kind["vlm"])
    assert {n.split(".")[1] for n in by_kind["soft_prompts"]} == {"soft_prompt_hub", "task_prompt_hub",
                                                                   "skill_prompt_hub"}
    assert {n.split(".")[1] for n in by_kind["action_heads"]} == {"action_encoder", "action_decoder"}
    assert "skill_classifier.weight" in by_kind["transformer_core"]  # upstream grouping: LR 0 in the freeze

    base = {"vlm": 0.1 * lr, "soft_prompts": 0.1 * lr, "transformer_core": lr, "action_heads": lr}
    frozen_first = {"vlm": True, "soft_prompts": False, "transformer_core": True, "action_heads": False}
    steps = (0, 1, freeze - 1, freeze, freeze + 1, freeze + warmup // 2, freeze + warmup - 1, freeze + warmup,
             freeze + warmup + 1, (freeze + warmup + iters) // 2, iters - 1, iters, iters + 10)
    print(f"{'step':>7} " + " ".join(f"{kind[g['name']]:>17}" for g in groups))
    for step in steps:
        got = group_lrs(step, groups, cfg)
        print(f"{step:>7} " + " ".join(f"{v:17.4e}" for v in got))
        for g, value in zip(groups, got):
            k = kind[g["name"]]
            want = xvla_reference_lr(step, base[k], frozen_first[k], freeze=freeze, warmup=warmup, iters=iters,
                                     min_ratio=0.1)
            assert value == pytest.approx(want, rel=1e-12, abs=1e-20), (step, k)
    # The boundary facts in words: prompts and heads at their constant base LR through the freeze, every group at
    # 0 at the unfreeze step (its warmup starts there), peak at freeze + warmup, the 0.1x floor at the end.
    assert group_lrs(freeze - 1, groups, cfg) == pytest.approx(
        [0.0 if frozen_first[kind[g["name"]]] else base[kind[g["name"]]] for g in groups])
    assert group_lrs(freeze, groups, cfg) == [0.0] * 4
    assert group_lrs(freeze + warmup, groups, cfg) == pytest.approx([base[kind[g["name"]]] for g in groups])
    assert group_lrs(iters, groups, cfg) == pytest.approx([0.1 * base[kind[g["name"]]] for g in groups])


def test_restart_warmup_needs_room_after_the_freeze():
    with pytest.raises(ValueError, match="freeze_steps"):
        OptimConfig(freeze=("vlm",), freeze_steps=500, warmup_steps=600, decay_steps=1000,
                    restart_warmup_after_freeze=True)


# --- optimizer -------------------------------------------------------------------------------------------------


def test_frozen_params_do_not_move_until_unfrozen():
    torch.manual_seed(0)
    model = TinyPiBehavior()
    cfg = xvla_like_cfg(weight_decay=0.1, peak_lr=1e-2)  # decay large enough to show up in one step
    groups = build_param_groups(model, cfg)
    opt = build_optimizer(groups, cfg)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8 and not opt.defaults["fused"]
    frozen_names = names_in(groups[0], model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    def step(k):
        for p in trainable(model):
            p.grad = torch.randn_like(p)
        apply_lrs(opt, group_lrs(k, groups, cfg))
        opt.step()

    for k in range(cfg.freeze_steps):
        step(k)
    for n, p in model.named_parameters():
        if n in frozen_names or n == "fixed":
            assert torch.equal(p, start[n]), n
        else:
            assert not torch.equal(p, start[n]), n
    step(cfg.freeze_steps)
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in frozen_names)


def test_apply_lrs_checks_length():
    model = TinyPiBehavior()
    opt = build_optimizer(build_param_groups(model, OptimConfig()), OptimConfig())
    with pytest.raises(ValueError, match="param groups"):
        apply_lrs(opt, [1e-4, 1e-5])


# --- EMA -------------------------------------------------------------------------------------------------------


def test_ema_update_matches_manual_math():
    torch.manual_seed(0)
    params = [torch.randn(3, 2), torch.randn(5).to(torch.bfloat16)]
    ema = EMA(params)
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    assert ema.shadow[0].data_ptr() != params[0].data_ptr()  # a copy even when already fp32
    expected = [p.float().clone() for p in params]
    for _ in range(3):
        for p in params:
            p.add_(torch.randn_like(p))
        ema.update(params, 0.9)
        expected = [0.9 * e + 0.1 * p.float() for e, p in zip(expected, params)]
    for s, e in zip(ema.shadow, expected):
        torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-6)


def test_ema_tracks_parameters_without_autograd():
    lin = nn.Linear(3, 3)
    ema = EMA(list(lin.parameters()))
    ema.update(list(lin.parameters()), 0.99)
    assert not any(s.requires_grad for s in ema.shadow)


def test_ema_state_round_trip_and_errors():
    params = [torch.randn(2, 2), torch.randn(3)]
    ema = EMA(params, names=["a.weight", "b.bias"])
    ema.update([p + 1 for p in params], 0.5)
    state = {k: v.clone() for k, v in ema.state_dict().items()}
    assert list(state) == ["a.weight", "b.bias"]
    other = EMA(params, names=["a.weight", "b.bias"])
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"a.weight": state["a.weight"]})
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({"a.weight": torch.zeros(4), "b.bias": state["b.bias"]})
    with pytest.raises(ValueError, match="tracks 2"):
        ema.update(params[:1], 0.5)


def test_swap_into_restores_originals():
    params = [torch.randn(4), torch.randn(2, 2).to(torch.bfloat16)]
    originals = [p.clone() for p in params]
    ema = EMA(params)
    ema.update([torch.zeros(4), torch.zeros(2, 2)], 0.0)  # decay 0: the EMA becomes the new values
    with ema.swap_into(params):
        assert all(torch.count_nonzero(p) == 0 for p in params)
    assert all(torch.equal(p, o) for p, o in zip(params, originals))
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swap_into(params):
            raise RuntimeError("boom")
    assert all(torch.equal(p, o) for p, o in zip(params, originals))


# --- config validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"peak_lr": 0.0}, "peak_lr"),
    ({"final_lr": 2e-4}, "final_lr"),
    ({"warmup_init_lr": -1.0}, "warmup_init_lr"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"eps": 0.0}, "eps"),
    ({"weight_decay": -1e-3}, "weight_decay"),
    ({"grad_clip_norm": 0.0}, "None to disable"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"warmup_steps": 100, "decay_steps": 100}, "warmup included"),
    ({"lr_multipliers": ("vision_tower", 0.1)}, "trailing|pairs"),
    ({"lr_multipliers": (("vision_tower", -0.1),)}, ">= 0"),
    ({"lr_multipliers": (("vlm_layers", 0.1), ("vlm_layers.0", 1.0))}, "more specific one first"),
    ({"lr_multipliers": ((".vlm", 0.1),)}, "dotted module names"),
    ({"freeze": "vision_tower", "freeze_steps": 10}, "trailing comma"),
    ({"freeze": ("vision_tower",)}, "set both"),
    ({"freeze_steps": 10}, "set both"),
    ({"freeze": ("a", "a"), "freeze_steps": 1}, "twice"),
    ({"ema_decay": 1.0}, "ema_decay"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig(**kwargs)


def test_config_json_round_trip():
    cfg = xvla_like_cfg()
    again = OptimConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))  # lists come back as tuples
    assert again == cfg and hash(again) == hash(cfg)
