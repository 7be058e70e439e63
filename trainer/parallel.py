"""One training-engine interface over DDP, FSDP2 and DeepSpeed ZeRO 1/2/3, applied to a model from outside.

`build_engine` builds the model on the meta device, parallelizes it, materializes and initializes it on the real
device, and builds the optimizer; the returned `Engine` runs micro-steps, optimizer steps, EMA, sharded save/load
and full-weight export the same way for every strategy:

    engine = build_engine("fsdp", lambda: PiBehavior(cfg), init_fn=..., param_groups_fn=..., optimizer_fn=...)
    for micro, batch in enumerate(micro_batches):
        metrics = engine.forward_backward(batch, generator=g, is_last_micro=micro == len(micro_batches) - 1)
    engine.set_lrs(lrs)
    grad_norm = engine.step()

Methods marked "Collective" must be called on every rank, in the same order. On CPU, DTensor has no distributed
RNG, so FSDP's sharded random init seeds each rank differently (`seed + rank`): the weights are deterministic for
a given seed and world size but differ from the other strategies' init. Load weights in `init_fn`
(`load_full_state_dict`) when strategies must start from the same point.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from checkpoints import sharded
from trainer.activation_checkpointing import apply_activation_checkpointing

STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
PRECISIONS = ("auto", "bf16", "fp32")
_CKPT_PREFIX = "_checkpoint_wrapped_module."


# --- device, backend, precision ------------------------------------------------------------------------------------

def select_device_and_backend(*, cuda_available: bool | None = None, local_rank: int | None = None,
                              environ: MutableMapping[str, str] | None = None) -> tuple[torch.device, str]:
    """(this process's device, process-group backend): the LOCAL_RANK GPU with NCCL, or the CPU with gloo.

    Only the GPU branch touches the environment: TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (unless it or
    TORCH_NCCL_BLOCKING_WAIT is already set), so torch's watchdog kills a hung NCCL collective after the
    process-group timeout instead of blocking forever. The arguments exist to fake capabilities in tests.
    """
    env = os.environ if environ is None else environ
    if not (torch.cuda.is_available() if cuda_available is None else cuda_available):
        return torch.device("cpu"), "gloo"
    if "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in env and "TORCH_NCCL_BLOCKING_WAIT" not in env:
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
    rank = int(env.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    return torch.device("cuda", rank), "nccl"


# Production NCCL settings for GPU workers; an operator's own value in the driver's environment wins.
NCCL_DEFAULTS = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # the watchdog aborts a timed-out collective and kills the process
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # flight recorder: the last 2000 collectives per rank...
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",  # ...dumped when a collective times out...
    # ...to this prefix + rank (read with torchfrtrace); per-pod /tmp, so no other user shares it.
    "TORCH_FR_DUMP_TEMP_FILE": "/tmp/b1k-nccl-trace-rank-",  # noqa: S108
}


def nccl_env(environ: Mapping[str, str] | None = None, *, use_gpu: bool) -> dict[str, str]:
    """Environment for the training workers' processes: NCCL_DEFAULTS on GPUs (unless set by the operator,
    including TORCH_NCCL_BLOCKING_WAIT in place of async error handling), nothing on CPU."""
    if not use_gpu:
        return {}
    env = os.environ if environ is None else environ
    out = {k: env.get(k, v) for k, v in NCCL_DEFAULTS.items()}
    if "TORCH_NCCL_BLOCKING_WAIT" in env and "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in env:
        del out["TORCH_NCCL_ASYNC_ERROR_HANDLING"]
        out["TORCH_NCCL_BLOCKING_WAIT"] = env["TORCH_NCCL_BLOCKING_WAIT"]
    for k in ("NCCL_DEBUG", "NCCL_DEBUG_SUBSYS", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA"):
        if k in env:
            out[k] = env[k]
    return out


def select_precision(requested: str, device: torch.device, *, bf16_supported: bool | None = None) -> str:
    """"bf16" or "fp32". "auto" means bf16 on a CUDA device that supports it, else fp32 (CPU bf16 is slow).

    An explicit "bf16" is honoured on CPU (useful for tests) but rejected on a GPU without bf16.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested == "fp32":
        return "fp32"
    on_cuda = device.type == "cuda"
    if on_cuda and bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if requested == "auto":
        return "bf16" if on_cuda and bf16_supported else "fp32"
    if on_cuda and not bf16_supported:
        raise ValueError(f"precision='bf16' but {device} does not support bf16; use 'fp32' or 'auto'")
    return "bf16"


def init_distributed(backend: str, device: torch.device, *, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Join the default process group from the torchrun-style env (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    unless one exists already (Ray Train creates it); returns (rank, world size)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def load_full_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                         broadcast_from_rank0: bool = False) -> None:
    """Load a full (unsharded) state dict into `model` inside `init_fn`, for plain and FSDP-sharded models alike.

    Every rank passes the same full weights; each keeps its own slice of a sharded parameter, so no collective
    runs (mismatched collectives during init are how gloo aborts a whole worker group). Names may carry wrapper
    prefixes (activation checkpointing); every parameter and persistent buffer must be present with its shape.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if broadcast_from_rank0:
        raise ValueError("broadcast_from_rank0 is not supported: give every rank the full weights")
    own = {clean_name(n): t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    persistent = {clean_name(k) for k in model.state_dict()}
    missing = sorted(k for k in own if k in persistent and k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    wrong = sorted(k for k in state_dict if k in own and tuple(state_dict[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(f"weights do not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                         f"wrong shape {wrong[:8]}")
    with torch.no_grad():
        for name, target in own.items():
            if name not in state_dict:
                continue
            full = state_dict[name].to(dtype=target.dtype)
            if isinstance(target, DTensor):
                local = distribute_tensor(full.to(target.device_mesh.device_type), target.device_mesh,
                                          target.placements, src_data_rank=None).to_local()
                target.to_local().copy_(local)
            else:
                target.copy_(full.to(target.device))


def clean_name(name: str) -> str:
    """Parameter FQN without wrapper prefixes (activation checkpointing, DDP), as in the plain model's state_dict."""
    name = name.replace(_CKPT_PREFIX, "")
    return name[len("module."):] if name.startswith("module.") else name


# --- EMA -------------------------------------------------------------------------------------------------------------

class LocalEMA:
    """fp32 exponential moving average of the tensors this rank owns (full params, FSDP shards or ZeRO-3 partitions).

    FSDP shadows stay DTensors so DCP can reshard them; updates run on the local shard only.
    """

    def __init__(self, sources: Mapping[str, torch.Tensor], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        with torch.no_grad():
            self.shadow = {n: t.detach().to(torch.float32, copy=True) for n, t in sources.items()}

    @torch.no_grad()
    def update(self, sources: Mapping[str, torch.Tensor]) -> None:
        for name, shadow in self.shadow.items():
            _local(shadow).lerp_(_local(sources[name]).to(torch.float32), 1.0 - self.decay)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


# --- engines ---------------------------------------------------------------------------------------------------------

class Engine:
    """Uniform training interface; see the module docstring. `model` is what evaluation code calls."""

    strategy: str
    model: nn.Module
    device: torch.device
    precision: str
    grad_accum_steps: int
    group_names: list[str]

    def __init__(self, *, strategy: str, device: torch.device, precision: str, grad_accum_steps: int,
                 grad_clip_norm: float | None, group_names: list[str]):
        self.strategy, self.device, self.precision = strategy, device, precision
        self.grad_accum_steps, self.grad_clip_norm, self.group_names = grad_accum_steps, grad_clip_norm, group_names
        self.ema: LocalEMA | None = None
        self._micro = 0

    # Subclasses provide _forward_backward, _step, _ema_sources, optimizer, save, load, full_model_state_dict.

    def forward_backward(self, batch: Mapping[str, torch.Tensor], *, generator: torch.Generator | None,
                         is_last_micro: bool) -> dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch (the loss is averaged over `grad_accum_steps` micro-batches).

        Collective on the last micro-batch (gradient reduction; FSDP/ZeRO-3 also gather weights every call).
        Returns the model's detached metrics for this micro-batch, unscaled.
        """
        self._micro += 1
        if is_last_micro != (self._micro == self.grad_accum_steps):
            raise ValueError(f"micro-batch {self._micro} of {self.grad_accum_steps}: is_last_micro={is_last_micro} "
                             "does not match grad_accum_steps")
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        return self._forward_backward(batch, generator, is_last_micro)

    def step(self) -> float:
        """Clip to `grad_clip_norm`, optimizer step, zero grads, then `ema_update()`. Collective.

        Returns the global grad norm before clipping. A non-finite norm skips the update (and the EMA) in every
        strategy; DeepSpeed then reports inf.
        """
        if self._micro != self.grad_accum_steps:
            raise RuntimeError(f"step() after {self._micro} of {self.grad_accum_steps} micro-batches")
        self._micro = 0
        norm = self._step()
        if math.isfinite(norm):
            self.ema_update()
        return norm

    def ema_update(self) -> None:
        """Fold the current weights into the EMA, on the tensors this rank owns (no communication).

        `step()` calls it after every applied update; it is a no-op when the engine has no EMA.
        """
        if self.ema is not None:
            self.ema.update(self._ema_sources())

    def set_lrs(self, lrs: Sequence[float]) -> None:
        """Per optimizer param group learning rates, in the order of `group_names`."""
        groups = self.optimizer.param_groups
        if len(lrs) != len(groups):
            raise ValueError(f"got {len(lrs)} learning rates for {len(groups)} param groups {self.group_names}")
        for group, lr in zip(groups, lrs):
            group["lr"] = float(lr)

    def reduce_metrics(self, metrics: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """Mean of each metric over the given micro-batches and all ranks. Collective: every rank must pass the
        same number of metric names (e.g. all with or all without FAST tokens)."""
        names = sorted(metrics[0]) if metrics else []
        local = torch.tensor([[float(m[n]) for n in names] for m in metrics], dtype=torch.float64).mean(0)
        local = local.to(self.device) if names else torch.zeros(0, device=self.device)
        dist.all_reduce(local)
        return dict(zip(names, (local / dist.get_world_size()).tolist()))

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def _meta(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "world_size": dist.get_world_size(), "precision": self.precision,
                "ema": self.ema is not None}


class TorchEngine(Engine):
    """DDP (full replicas, gradient all-reduce) or FSDP2 (fully_shard per block + root) with DCP checkpoints."""

    def __init__(self, *, module: nn.Module, wrapped: nn.Module, optimizer: torch.optim.Optimizer,
                 ema_decay: float | None, **kw):
        super().__init__(**kw)
        self.module, self._wrapped, self.optimizer = module, wrapped, optimizer
        self.model = module  # DDP: the plain replica; FSDP: the sharded root (call it on every rank)
        self._autocast = self.precision == "bf16" and self.strategy == "ddp"
        if ema_decay is not None:
            self.ema = LocalEMA(self._ema_sources(), ema_decay)

    def _forward_backward(self, batch, generator, is_last_micro):
        if self.strategy == "ddp":
            sync = contextlib.nullcontext() if is_last_micro else self._wrapped.no_sync()
        else:
            self._wrapped.set_requires_gradient_sync(is_last_micro)
            sync = contextlib.nullcontext()
        cast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self._autocast
                else contextlib.nullcontext())
        with sync:
            with cast:
                loss, metrics = self._wrapped(batch, generator=generator)
            (loss / self.grad_accum_steps).backward()
        return metrics

    def _step(self) -> float:
        params = [p for p in self.module.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()  # FSDP: per-rank partial norms -> global
        value = float(norm)
        if math.isfinite(value):
            if self.grad_clip_norm:
                torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip_norm, norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def _ema_sources(self) -> dict[str, torch.Tensor]:
        return {clean_name(n): p for n, p in self.module.named_parameters()}

    def save(self, local_dir: str) -> None:
        """Collective: DCP shards of {"model", "optim", "ema"} from every rank into `local_dir`."""
        sharded.dcp_save(local_dir, self._wrapped, self.optimizer, self.ema.shadow if self.ema else None,
                         meta=self._meta())

    def load(self, local_dir: str) -> None:
        """Collective: restore from a `save` directory; DCP reshards, so the world size may differ."""
        meta = sharded.dcp_load(local_dir, self._wrapped, self.optimizer, self.ema.shadow if self.ema else None)
        if self.ema is not None and not meta["ema"]:
            self.ema = LocalEMA(self._ema_sources(), self.ema.decay)  # no EMA saved: restart it from the weights

    def full_model_state_dict(self, ema: bool = False) -> dict[str, torch.Tensor] | None:
        """Collective: the full fp32 CPU state dict (EMA weights with `ema`) on rank 0, None elsewhere."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self._wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # On CPU (and FSDP at world size 1) entries can alias the live weights; the export must be a snapshot.
        live = {_local(t).untyped_storage().data_ptr() for t in [*self.module.parameters(), *self.module.buffers()]}
        sd = {k: v.clone() if v.untyped_storage().data_ptr() in live else v for k, v in sd.items()}
        if ema:
            if self.ema is None:
                raise ValueError("full_model_state_dict(ema=True) but the engine was built with ema_decay=None")
            for name, shadow in self.ema.shadow.items():
                full = shadow.full_tensor() if hasattr(shadow, "full_tensor") else shadow
                if dist.get_rank() == 0:
                    sd[name] = full.detach().cpu().clone()
        return sd if dist.get_rank() == 0 else None


# --- building --------------------------------------------------------------------------------------------------------

def build_engine(strategy: str, model_fn: Callable[[], nn.Module], *, init_fn: Callable[[nn.Module], None],
                 param_groups_fn: Callable[[nn.Module], list[dict]],
                 optimizer_fn: Callable[[list[dict]], torch.optim.Optimizer],
                 device: torch.device | None = None, precision: str = "auto", grad_accum_steps: int = 1,
                 grad_clip_norm: float | None = None, activation_checkpointing: bool = False,
                 ema_decay: float | None = None, micro_batch_size: int = 1, seed: int = 0,
                 forward_methods: Sequence[str] = ("sample_actions", "expected_actions"),
                 find_unused_parameters: bool = False) -> Engine:
    """Build, parallelize, initialize and wrap a model for `strategy` (one of STRATEGIES). Collective.

    Order: `model_fn()` under the meta device -> `param_groups_fn` on that plain meta model (clean parameter
    names; groups are re-resolved by name after wrapping) -> activation checkpointing -> strategy:
    - ddp: `init_fn` -> DistributedDataParallel (bf16 = autocast, fp32 weights and gradients);
    - fsdp: `fully_shard` each `transformer_blocks()` element, then the root (bf16 = MixedPrecisionPolicy with
      fp32 reduction; the model's optional `fp32_modules()` get their own fp32 units, and its root inputs are then
      not cast) -> `init_fn` on the sharded model (plain tensors act as replicated: implicit_replication);
    - zero1/2/3: `init_fn` -> `deepspeed.initialize` with a generated config and the client optimizer.
    `init_fn` must materialize (`to_empty`) and initialize/load; it runs after `torch.manual_seed(seed)`.
    Group dicts reach `optimizer_fn` unchanged apart from "params" (keys such as trainer/optim.py's "freeze"
    LR-0 window are the optimizer's business); every trainable parameter must be in exactly one group. To freeze
    parameters for good, set requires_grad=False in `model_fn` or `param_groups_fn` and leave them out of the
    groups (DeepSpeed bf16 then keeps them in bf16 only).
    `micro_batch_size` is only DeepSpeed bookkeeping. `forward_methods` are extra entry points besides forward
    (FSDP gathers the root's weights for them). `find_unused_parameters` goes to DDP (needed when a batch can
    skip a head, e.g. no FAST tokens). `seed` seeds the init (FSDP on CPU: `seed + rank`, see the module doc).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    if device is None:
        device, backend = select_device_and_backend()
    else:
        backend = "nccl" if device.type == "cuda" else "gloo"
    precision = select_precision(precision, device)
    rank, world_size = init_distributed(backend, device)

    with torch.device("meta"):
        model = model_fn()
    group_specs = _group_specs(model, param_groups_fn(model))
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    common = dict(strategy=strategy, device=device, precision=precision, grad_accum_steps=grad_accum_steps,
                  grad_clip_norm=grad_clip_norm)

    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
        from torch.distributed.tensor.experimental import implicit_replication

        mesh = init_device_mesh(device.type, (world_size,))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16" else MixedPrecisionPolicy())
        for block in model.transformer_blocks():
            fully_shard(block, mesh=mesh, mp_policy=mp)
        root_mp = mp
        if precision == "bf16" and hasattr(model, "fp32_modules"):
            # The model's fp32 islands (e.g. KV-mixing coefficients, action projections) keep fp32 parameters. Such
            # a model casts to its parameters' dtype itself, so its inputs stay as given: fp32 action targets and
            # states are not rounded to bf16 at the root.
            keep = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                        cast_forward_inputs=False)
            for module in model.fp32_modules():
                fully_shard(module, mesh=mesh, mp_policy=keep)
            root_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                           cast_forward_inputs=False)
        fully_shard(model, mesh=mesh, mp_policy=root_mp)
        for method in forward_methods:
            if hasattr(model, method):
                register_fsdp_forward_method(model, method)
        # DTensor's distributed RNG refuses CPU meshes: each rank then draws its shard from its own generator,
        # and equal seeds would give every rank's shard the same random values.
        torch.manual_seed(seed if device.type != "cpu" else seed + rank)
        with implicit_replication(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
            init_fn(model)
        _check_materialized(model)
        groups = _resolve_groups(model, group_specs)
        return TorchEngine(module=model, wrapped=model, optimizer=optimizer_fn(groups), ema_decay=ema_decay,
                           group_names=[g["name"] for g in groups], **common)

    torch.manual_seed(seed)
    init_fn(model)
    _check_materialized(model)
    groups = _resolve_groups(model, group_specs)
    optimizer = optimizer_fn(groups)
    common["group_names"] = [g["name"] for g in groups]
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Buffers are constants set by init_fn: synced once at init (with the weights), not before every forward.
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          forward_sync_buffers=False, find_unused_parameters=find_unused_parameters)
        return TorchEngine(module=model, wrapped=wrapped, optimizer=optimizer, ema_decay=ema_decay, **common)

    from trainer import parallel_zero

    stage = int(strategy[-1])
    ds_engine = parallel_zero.initialize(model, optimizer, stage=stage, precision=precision, device=device,
                                         backend=backend, grad_accum_steps=grad_accum_steps,
                                         grad_clip_norm=grad_clip_norm, micro_batch_size=micro_batch_size)
    return parallel_zero.DeepSpeedEngine(ds_engine=ds_engine, optimizer=optimizer, stage=stage,
                                         ema_decay=ema_decay, **common)


def _group_specs(model: nn.Module, groups: list[dict]) -> list[dict[str, Any]]:
    """Param groups as parameter names, so they can be re-resolved after wrapping replaces the parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen: set[str] = set()
    specs = []
    for i, group in enumerate(groups):
        params = [names[id(p)] for p in group["params"]]
        dup = seen.intersection(params)
        if dup:
            raise ValueError(f"parameters in more than one param group: {sorted(dup)[:5]}")
        seen.update(params)
        specs.append({"name": f"group{i}", **group, "params": params})
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in seen)
    if missing:
        raise ValueError(f"param_groups_fn left {len(missing)} trainable parameters out (e.g. {missing[:5]}); "
                         "put them in a group, or set requires_grad=False to freeze them")
    return specs


def _resolve_groups(model: nn.Module, specs: list[dict[str, Any]]) -> list[dict]:
    """The groups with the model's current parameter objects in place of the names."""
    params = {clean_name(n): p for n, p in model.named_parameters()}
    return [{**spec, "params": [params[n] for n in spec["params"]]} for spec in specs]


def _check_materialized(model: nn.Module) -> None:
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"init_fn left {len(meta)} tensors on the meta device (e.g. {meta[:3]}); it must call "
                           "model.to_empty(device=...) and initialize or load every parameter and buffer")
