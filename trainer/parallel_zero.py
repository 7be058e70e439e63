"""DeepSpeed ZeRO stage 1/2/3 behind trainer.parallel's Engine interface (imported only for the zero* strategies).

The client torch optimizer is wrapped by ZeRO; DeepSpeed owns gradient accumulation (`engine.backward` divides by
`gradient_accumulation_steps`, the boundary is set from `is_last_micro`), clipping (`gradient_clipping`) and the
global grad norm. EMA shadows are the full module parameters for ZeRO 1/2 and this rank's unpadded partition
(`param.ds_tensor`) for ZeRO-3. bf16 is torch autocast inside DeepSpeed's forward: parameters stay fp32.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from checkpoints import sharded
from trainer.parallel import Engine, LocalEMA, clean_name


def deepspeed_config(*, stage: int, precision: str, grad_accum_steps: int, grad_clip_norm: float | None,
                     micro_batch_size: int) -> dict[str, Any]:
    """The generated DeepSpeed config (the client optimizer is passed separately)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": float(grad_clip_norm or 0.0),
        "zero_optimization": {"stage": stage},
        # bf16 through torch autocast, not DeepSpeed's bf16 mode: that mode casts every parameter to bf16, so the
        # model's fp32 islands (mixing coefficients, inpainting map, action projections) would lose their
        # precision (a 0.999 coefficient reads as 1.0). Under autocast the parameters and ZeRO's partitions stay
        # fp32 and the islands compute in fp32; DeepSpeed reduces nn.Linear gradients in bf16 (its default
        # lower-precision-safe modules) and everything else, the coefficients included, in fp32. The fp32
        # optimizer skips a non-finite update itself.
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # progress is logged by the trainer, not DeepSpeed
        "wall_clock_breakdown": False,
    }


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, *, stage: int, precision: str,
               device: torch.device, backend: str, **cfg) -> Any:
    """`deepspeed.initialize` on the materialized model with the generated config; returns the DeepSpeed engine.

    The first call on a machine JIT-builds DeepSpeed's shared-memory comm op (~1 min on 2 cores, cached in
    ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR); it needs g++ and ninja, and is skipped without them.
    """
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed first resolves its accelerator
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)  # reuses the existing process group
    config = deepspeed_config(stage=stage, precision=precision, **cfg)
    ds_engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return ds_engine


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO stage 1/2/3 around the client torch optimizer; DeepSpeed checkpoints + per-rank EMA files."""

    def __init__(self, *, ds_engine: Any, optimizer: torch.optim.Optimizer, stage: int, ema_decay: float | None,
                 **kw):
        super().__init__(**kw)
        self.ds_engine, self.optimizer, self.stage = ds_engine, optimizer, stage
        self.model = ds_engine.module  # ZeRO-3: partitioned, gathered by hooks (call it on every rank)
        if ema_decay is not None:
            self.ema = LocalEMA(self._ema_sources(), ema_decay)

    def _forward_backward(self, batch, generator, is_last_micro):
        self.ds_engine.set_gradient_accumulation_boundary(is_last_micro)
        loss, metrics = self.ds_engine(batch, generator=generator)
        self.ds_engine.backward(loss)  # divides by gradient_accumulation_steps itself
        return metrics

    def _step(self) -> float:
        self.ds_engine.step()
        norm = self.ds_engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def _ema_sources(self) -> dict[str, torch.Tensor]:
        params = {clean_name(n): p for n, p in self.ds_engine.module.named_parameters()}
        if self.stage < 3:
            return params
        return {n: p.ds_tensor.narrow(0, 0, _zero3_valid(p)) for n, p in params.items()}

    def _zero3_layout(self) -> dict[str, dict[str, Any]]:
        return {clean_name(n): {"numel": p.ds_numel, "shape": list(p.ds_shape), "partition": p.ds_tensor.ds_numel}
                for n, p in self.ds_engine.module.named_parameters()}

    def save(self, local_dir: str) -> None:
        """Collective: DeepSpeed's checkpoint (tag "zero", universal-convertible) plus this rank's EMA file."""
        layout = self._zero3_layout() if self.stage == 3 else None
        sharded.deepspeed_save(local_dir, self.ds_engine, self.ema.shadow if self.ema else None,
                               meta={**self._meta(), "zero3_layout": layout})

    def load(self, local_dir: str) -> None:
        """Collective: restore from a `save` directory. At a different world size the checkpoint is converted to
        DeepSpeed's universal format first (rank 0, written next to it) and loaded from there."""
        meta = sharded.deepspeed_load(local_dir, self.ds_engine, self.strategy)
        if self.ema is not None and meta["ema"]:
            layout = self._zero3_layout() if self.stage == 3 else None
            sharded.load_rank_ema(local_dir, self.ema.shadow, zero3_layout=layout)
        elif self.ema is not None:
            self.ema = LocalEMA(self._ema_sources(), self.ema.decay)

    def full_model_state_dict(self, ema: bool = False) -> dict[str, torch.Tensor] | None:
        """Collective: full fp32 CPU state dict (EMA weights with `ema`) on rank 0, None elsewhere.

        Weights come from ZeRO's fp32 parameters (gathered across ranks).
        """
        from deepspeed.utils import safe_get_full_fp32_param

        if ema and self.ema is None:
            raise ValueError("full_model_state_dict(ema=True) but the engine was built with ema_decay=None")
        rank0 = dist.get_rank() == 0
        module = self.ds_engine.module
        out: dict[str, torch.Tensor] = {}
        for key, value in module.state_dict(keep_vars=True).items():
            if not isinstance(value, nn.Parameter):
                if rank0:
                    out[key] = value.detach().cpu().clone()
                continue
            if ema:
                full = self._full_ema(key, value)
            else:
                full = safe_get_full_fp32_param(value)
                if full is None:  # frozen: not in the optimizer, gathered from the module
                    full = self._gather_frozen(value)
            if rank0:
                out[key] = full.detach().float().cpu().clone()
        return out if rank0 else None

    def _gather_frozen(self, param: nn.Parameter) -> torch.Tensor:
        if self.stage < 3:
            return param.detach()
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().clone()

    def _full_ema(self, name: str, param: nn.Parameter) -> torch.Tensor:
        shadow = self.ema.shadow[name]
        if self.stage < 3:
            return shadow
        padded = torch.zeros(param.ds_tensor.ds_numel, dtype=shadow.dtype, device=shadow.device)
        padded[:shadow.numel()] = shadow
        parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, padded)
        return torch.cat(parts)[:param.ds_numel].reshape(param.ds_shape)


def _zero3_valid(p: nn.Parameter) -> int:
    """How many elements of this rank's ZeRO-3 partition are real (the last partitions carry padding)."""
    size = p.ds_tensor.ds_numel
    return max(0, min(size, p.ds_numel - dist.get_rank() * size))
