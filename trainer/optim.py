"""Optimizer, LR schedule, per-module LR multipliers, freeze-then-unfreeze and EMA (pure PyTorch, no dist code).

Defaults are the 1st-place pi-behavior run (pi_behavior.md §3): AdamW(0.9, 0.95, eps 1e-8, wd 1e-10 on every
parameter, no mask), global-norm clip 1.0, optax-style warmup-cosine (1e-4/1001 -> 1e-4 over 1k steps, cosine to
1e-5 at step 20k, flat after), EMA 0.99. The X-VLA recipe (seeds/000) is expressed with `lr_multipliers`
(VLM at 0.1x), `freeze`/`freeze_steps` and X-VLA's schedule around the freeze (`restart_warmup_after_freeze`).

Use, with `step` = number of optimizer steps already taken (optax counts the same way, so update k uses lr_at(k)):

    groups = build_param_groups(model, cfg)
    opt = build_optimizer(groups, cfg)
    ema = EMA([p for g in groups for p in g["params"]]) if cfg.ema_decay is not None else None
    for step in ...:
        loss.backward(); clip_grad_norm_(params, cfg.grad_clip_norm)
        apply_lrs(opt, group_lrs(step, groups, cfg)); opt.step(); opt.zero_grad()
        if ema: ema.update(params, cfg.ema_decay)

Freezing is done with lr = 0, not by toggling `requires_grad`. AdamW then leaves the parameter bit-identical
(its decoupled decay is `p *= 1 - lr * wd`), and nothing about the parameter set changes mid-run, so it behaves the
same under DDP (no unused-parameter errors, no bucket rebuild), FSDP2 and DeepSpeed ZeRO (which partition
the trainable set once, at init). Costs: frozen parameters still get gradients (computed, reduced and counted in
the clip norm), and Adam's moments and step count accumulate during the freeze, so the first unfrozen steps use
gradient statistics gathered while frozen rather than a cold start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

# Top-level modules of PiBehavior that come from PaliGemma (the "VLM" of the X-VLA 0.1x recipe).
PI_BEHAVIOR_VLM_PREFIXES = ("vision_tower", "multi_modal_projector", "embed_tokens", "vlm_layers", "vlm_norm")

# Name segments added by wrappers (activation checkpointing, FSDP1 with use_orig_params, torch.compile).
_WRAPPER_SEGMENTS = frozenset({"_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod"})


def _check_prefix(prefix: object, field: str) -> None:
    if not isinstance(prefix, str) or not prefix or prefix.startswith(".") or prefix.endswith("."):
        raise ValueError(f"{field}: prefixes are dotted module names like 'vlm_layers' or 'vlm_layers.0', "
                         f"got {prefix!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    peak_lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8  # added after the sqrt, as in optax.adamw
    weight_decay: float = 1e-10  # decoupled, applied to every parameter (the reference has no decay mask)
    grad_clip_norm: float | None = 1.0  # global L2 norm; None disables clipping
    warmup_steps: int = 1000
    warmup_init_lr: float | None = None  # None = peak_lr / (warmup_steps + 1), openpi's choice; resolved in lr_at
    decay_steps: int = 20_000  # step at which the cosine reaches final_lr (warmup included); flat afterwards
    final_lr: float = 1e-5
    # (module-name prefix, multiplier) pairs; the first prefix that matches a parameter wins, others get 1.0.
    # A prefix matches whole dotted segments: "vlm_layers" matches "vlm_layers.3.mlp.w", not "vlm_layers_x".
    lr_multipliers: tuple[tuple[str, float], ...] = ()
    freeze: tuple[str, ...] = ()  # module-name prefixes held at lr 0 while step < freeze_steps
    freeze_steps: int = 0
    # False (pi-behavior, optax): one warmup-cosine from step 0 for every group, frozen groups held at 0 meanwhile.
    # True (X-VLA's train.py, xvla.md §2.1): while step < freeze_steps the groups that are not frozen train at their
    # constant base LR (peak_lr * multiplier, no warmup: the "prompt warm-up"); at freeze_steps every group's
    # warmup starts (from warmup_init_lr; X-VLA's is 0) and the cosine reaches final_lr at decay_steps.
    restart_warmup_after_freeze: bool = False
    ema_decay: float | None = 0.99  # ema = decay * ema + (1 - decay) * param after every step; None disables

    def __post_init__(self) -> None:
        # Accept lists (JSON / CLI round trips) but keep the frozen config hashable.
        if isinstance(self.freeze, str):
            raise ValueError(f"freeze must be a tuple of prefixes, got the string {self.freeze!r}; "
                             f"write freeze=({self.freeze!r},) with the trailing comma")
        mults = self.lr_multipliers
        if len(mults) == 2 and isinstance(mults[0], str):
            raise ValueError(f"lr_multipliers must be a tuple of (prefix, multiplier) pairs, got {mults!r}; "
                             f"write lr_multipliers=({tuple(mults)!r},)")
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "freeze", tuple(self.freeze))
        try:
            object.__setattr__(self, "lr_multipliers", tuple((p, float(m)) for p, m in mults))
        except (TypeError, ValueError) as e:
            raise ValueError(f"lr_multipliers must be (prefix, multiplier) pairs, got {mults!r}") from e

        if not (math.isfinite(self.peak_lr) and self.peak_lr > 0):
            raise ValueError(f"peak_lr must be a positive number, got {self.peak_lr}")
        if not 0 <= self.final_lr <= self.peak_lr:
            raise ValueError(f"final_lr must be in [0, peak_lr={self.peak_lr}], got {self.final_lr}; "
                             "for a constant LR set final_lr = peak_lr")
        if self.warmup_init_lr is not None and not 0 <= self.warmup_init_lr <= self.peak_lr:
            raise ValueError(f"warmup_init_lr must be in [0, peak_lr={self.peak_lr}] or None "
                             f"(= peak_lr / (warmup_steps + 1)), got {self.warmup_init_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm must be > 0, or None to disable clipping, got {self.grad_clip_norm}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps <= self.warmup_steps:
            raise ValueError(f"decay_steps ({self.decay_steps}) counts from step 0, warmup included, so it must "
                             f"be > warmup_steps ({self.warmup_steps})")

        seen: list[str] = []
        for prefix, mult in self.lr_multipliers:
            _check_prefix(prefix, "lr_multipliers")
            if not (math.isfinite(mult) and mult >= 0):
                raise ValueError(f"lr_multipliers[{prefix!r}] must be a finite number >= 0, got {mult}")
            shadow = next((s for s in seen if _matches(prefix, s)), None)
            if shadow is not None:
                raise ValueError(f"lr_multipliers: {prefix!r} can never apply because the earlier prefix "
                                 f"{shadow!r} already matches it (first match wins); put the more specific one first")
            seen.append(prefix)
        for prefix in self.freeze:
            _check_prefix(prefix, "freeze")
        if len(set(self.freeze)) != len(self.freeze):
            raise ValueError(f"freeze lists a prefix twice: {self.freeze}")
        if self.freeze_steps < 0:
            raise ValueError(f"freeze_steps must be >= 0, got {self.freeze_steps}")
        if bool(self.freeze) != (self.freeze_steps > 0):
            raise ValueError(f"freeze={self.freeze} with freeze_steps={self.freeze_steps} does nothing: set both "
                             "(prefixes and a positive step count) or neither")
        if self.restart_warmup_after_freeze and self.decay_steps <= self.freeze_steps + self.warmup_steps:
            raise ValueError(f"restart_warmup_after_freeze: the warmup restarts at freeze_steps "
                             f"({self.freeze_steps}), so decay_steps ({self.decay_steps}) must be > freeze_steps + "
                             f"warmup_steps ({self.freeze_steps + self.warmup_steps})")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), or None to disable EMA, got {self.ema_decay}")

    @property
    def init_lr(self) -> float:
        """LR at step 0 (the start of the linear warmup)."""
        if self.warmup_init_lr is not None:
            return self.warmup_init_lr
        return self.peak_lr / (self.warmup_steps + 1)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Base LR (multiplier 1, not frozen) for optimizer update number `step` (0-based).

    As optax.warmup_cosine_decay_schedule: linear from init_lr (step 0) to peak_lr (step warmup_steps), then a
    half cosine from peak_lr to final_lr over decay_steps - warmup_steps steps, then final_lr forever. With
    `restart_warmup_after_freeze`: peak_lr while step < freeze_steps, then that schedule started at freeze_steps
    (warmup to freeze_steps + warmup_steps, final_lr at decay_steps).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    decay_steps = cfg.decay_steps
    if cfg.restart_warmup_after_freeze:
        if step < cfg.freeze_steps:
            return cfg.peak_lr
        step, decay_steps = step - cfg.freeze_steps, decay_steps - cfg.freeze_steps
    if step < cfg.warmup_steps:
        return cfg.init_lr + (cfg.peak_lr - cfg.init_lr) * step / cfg.warmup_steps
    span = decay_steps - cfg.warmup_steps
    progress = min(step - cfg.warmup_steps, span) / span
    return cfg.final_lr + (cfg.peak_lr - cfg.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _clean_name(name: str) -> str:
    return ".".join(s for s in name.split(".") if s not in _WRAPPER_SEGMENTS)


def build_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """One AdamW param group per distinct (lr multiplier, frozen) class of the trainable parameters.

    Each group has "params", "name" (e.g. "lr_x0.1_frozen"), "lr_multiplier", "freeze", "initial_lr" and "lr"
    (both the step-0 LR). Groups are ordered by their first parameter in `model.named_parameters()`, so the order
    is the same on every rank and every run of the same model. Names are matched after dropping wrapper segments
    (activation checkpointing, FSDP1 `use_orig_params=True`, torch.compile); a DDP/DataParallel wrapper is
    unwrapped. FSDP2 (`fully_shard`) keeps names and yields DTensor parameters, which are grouped like any other.
    Parameters with `requires_grad=False` are left out. Raises ValueError if a configured prefix matches no
    trainable parameter (usually a typo).
    """
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    trainable = [(_clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad]

    used: set[str] = set()
    classes: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in trainable:
        mult = 1.0
        for prefix, m in cfg.lr_multipliers:
            if _matches(name, prefix):
                mult = m
                used.add(prefix)
                break
        frozen = False
        for prefix in cfg.freeze:
            if _matches(name, prefix):
                frozen = True
                used.add(prefix)
        classes.setdefault((mult, frozen), []).append(param)

    unused = [p for p in [p for p, _ in cfg.lr_multipliers] + list(cfg.freeze) if p not in used]
    if unused:
        tops = sorted({n.split(".")[0] for n, _ in trainable})
        raise ValueError(f"prefixes {unused} match no trainable parameter of {type(model).__name__}; "
                         f"top-level modules with trainable parameters: {tops}")

    groups = [{"params": params, "name": f"lr_x{mult:g}" + ("_frozen" if frozen else ""),
               "lr_multiplier": mult, "freeze": frozen} for (mult, frozen), params in classes.items()]
    for group, lr0 in zip(groups, group_lrs(0, groups, cfg)):
        group["initial_lr"] = group["lr"] = lr0

    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(trainable), "every trainable parameter in exactly one group"
    return groups


def group_lrs(step: int, groups: Sequence[dict], cfg: OptimConfig) -> list[float]:
    """LR of each group for update number `step`: lr_at(step) * multiplier, and 0 for freeze groups while
    step < freeze_steps (so with restart_warmup_after_freeze the other groups run at their constant base LR then).

    Pass the groups returned by build_param_groups (built from the current config), not optimizer.param_groups
    after optimizer.load_state_dict: torch restores the saved group dicts, including their old multipliers.
    """
    base = lr_at(step, cfg)
    return [0.0 if g["freeze"] and step < cfg.freeze_steps else base * g["lr_multiplier"] for g in groups]


def apply_lrs(optimizer: torch.optim.Optimizer, lrs: Sequence[float]) -> None:
    """Set each param group's "lr" (call before optimizer.step())."""
    if len(lrs) != len(optimizer.param_groups):
        raise ValueError(f"got {len(lrs)} LRs for {len(optimizer.param_groups)} param groups")
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `groups` with the config's betas, eps and weight decay (decay on every group).

    foreach=None lets torch pick its multi-tensor implementation whenever all parameters live on a device that
    supports it (CUDA, including FSDP2 DTensors) and the per-parameter loop otherwise (CPU).
    """
    return torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=cfg.betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=None, fused=False)


class EMA:
    """Float32 exponential moving average of a list of tensors (update: ema = decay * ema + (1 - decay) * t).

    It takes tensors, not a module, so the caller decides what each rank owns: full parameters under DDP or
    ZeRO-1/2, local shards under FSDP2 (`p.to_local()`) or ZeRO-3. The shadows live on the tensors' devices.
    FSDP2 DTensor parameters can also be passed as they are: the shadows are then DTensors with the same
    placements, which DCP saves sharded (plain local shards would need per-rank keys in a DCP checkpoint).
    `names` (e.g. parameter names) become the state_dict keys; without them the keys are "0", "1", ...
    """

    def __init__(self, tensors: Sequence[torch.Tensor], names: Sequence[str] | None = None):
        if names is not None and len(names) != len(tensors):
            raise ValueError(f"got {len(names)} names for {len(tensors)} tensors")
        self.names = list(names) if names is not None else [str(i) for i in range(len(tensors))]
        if len(set(self.names)) != len(self.names):
            raise ValueError("EMA names must be unique")
        with torch.no_grad():
            self.shadow = [t.detach().to(dtype=torch.float32, copy=True) for t in tensors]

    def _check(self, tensors: Sequence[torch.Tensor]) -> None:
        if len(tensors) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} tensors, got {len(tensors)}")

    @torch.no_grad()
    def update(self, tensors: Sequence[torch.Tensor], decay: float) -> None:
        """In place: ema <- decay * ema + (1 - decay) * tensor (a lerp towards the tensor by 1 - decay)."""
        self._check(tensors)
        if not 0 <= decay <= 1:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        torch._foreach_lerp_(self.shadow, [t.detach().float() for t in tensors], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite `tensors` with the EMA values (cast to each tensor's dtype)."""
        self._check(tensors)
        for t, s in zip(tensors, self.shadow):
            t.copy_(s)

    @contextlib.contextmanager
    def swap_into(self, tensors: Sequence[torch.Tensor]) -> Iterator[None]:
        """Evaluate with EMA weights inside the block; the original values are restored on exit, even on error.
        Holds one extra copy of `tensors` meanwhile."""
        self._check(tensors)
        with torch.no_grad():
            backup = [t.detach().clone() for t in tensors]
        self.copy_to(tensors)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, b in zip(tensors, backup):
                    t.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.names):
            missing, extra = sorted(set(self.names) - set(state)), sorted(set(state) - set(self.names))
            raise ValueError(f"EMA state does not match the tracked tensors: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        for name, s in zip(self.names, self.shadow):
            if tuple(state[name].shape) != tuple(s.shape):
                raise ValueError(f"EMA state {name!r} has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(s.shape)}")
        for name, s in zip(self.names, self.shadow):
            s.copy_(state[name])
