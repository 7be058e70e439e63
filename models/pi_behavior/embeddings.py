"""Prefix token builders of pi-behavior: task + stage fusion (§1.3), discretised state tokens (§1.4), and the
sin-cos encodings shared with the flow-time embedding (§1.7).

Initialisation follows the Flax defaults of the reference (§1.1): Linear kernels LeCun-normal (truncated),
zero bias; embedding tables normal with std 1/sqrt(features).

Precision: these modules are the reference's plain nnx.Linear/Embed layers outside the bf16 Gemma/SigLIP
backbones. Their parameters are fp32 and, with fp32 kernels, Flax promotes even bf16 inputs to an fp32 matmul.
So FlaxLinear computes in fp32 under autocast too, and every module here returns fp32. Keeping their
*parameters* fp32 under FSDP/ZeRO mixed precision is the trainer's job (PiBehavior.fp32_modules()).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def posemb_sincos(pos: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """openpi's posemb_sincos: periods geometric in [min, max]; returns [sin, cos] of pos * 2pi / period."""
    if dim % 2:
        raise ValueError(f"sin-cos dim must be even, got {dim}")
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=pos.device)
    period = min_period * (max_period / min_period) ** fraction
    x = pos.double()[..., None] * (2.0 * math.pi / period)
    return torch.cat([torch.sin(x), torch.cos(x)], dim=-1).float()


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Truncated-normal LeCun init (variance 1/fan_in), Flax's default Dense kernel init."""
    fan_in = weight.shape[1]
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # correct for truncation at 2 std
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class FlaxLinear(nn.Linear):
    """nn.Linear with Flax's default init (LeCun-normal kernel, zero bias), also on reset_parameters(), computed
    in fp32 whatever the input dtype and autocast say (an fp32 nnx.Linear); returns fp32."""

    def reset_parameters(self) -> None:
        lecun_normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)


class FlaxEmbedding(nn.Embedding):
    """nn.Embedding with nnx.Embed's init: normal, std 1/sqrt(features)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.embedding_dim))


def flax_linear(in_dim: int, out_dim: int) -> nn.Linear:
    return FlaxLinear(in_dim, out_dim)


def flax_embedding(num: int, dim: int) -> nn.Embedding:
    return FlaxEmbedding(num, dim)


def state_to_bins(state_BD: torch.Tensor, num_bins: int = 256) -> torch.Tensor:
    """z-scored state -> bin ids: clip(floor((x + 1) * num_bins / 2), 0, num_bins - 1).

    Equivalent to openpi's digitize on linspace(-1, 1, 257); |z| > 1 saturates at the end bins (§7.6).
    """
    return torch.clamp(torch.floor((state_BD.float() + 1.0) * (num_bins / 2)), 0, num_bins - 1).long()


class TaskStageFusion(nn.Module):
    """50 task embeddings + per-task learned stage embeddings -> [base task token, f1, f2, f3, f4] (5 tokens)."""

    def __init__(self, *, width: int, stage_dim: int, task_num_stages: tuple[int, ...]):
        super().__init__()
        self.stage_dim = stage_dim
        self.task_num_stages = tuple(task_num_stages)
        self.register_buffer("num_stages", torch.zeros(len(task_num_stages), dtype=torch.long), persistent=False)
        self.register_buffer("stage_offsets", torch.zeros(len(task_num_stages), dtype=torch.long), persistent=False)
        self._fill_buffers()
        cat_dim = width + 2 * stage_dim
        self.task_embeddings = flax_embedding(len(task_num_stages), width)
        self.task_stage_embeddings = flax_embedding(sum(task_num_stages), stage_dim)
        self.gate_sincos = flax_linear(cat_dim, stage_dim)
        self.gate_learned = flax_linear(cat_dim, stage_dim)
        self.gate_task = flax_linear(cat_dim, width)
        self.fusion_layer1 = flax_linear(cat_dim, cat_dim)
        self.fusion_layer2 = flax_linear(cat_dim, width)
        self.stage_projection = flax_linear(2 * stage_dim, width)

    def _fill_buffers(self) -> None:
        if self.num_stages.is_meta:
            return
        with torch.no_grad():
            counts = torch.tensor(self.task_num_stages, dtype=torch.long)
            self.num_stages.copy_(counts)
            self.stage_offsets.copy_(torch.cumsum(counts, 0) - counts)

    def reset_parameters(self) -> None:
        """Recompute the stage-count tables (children re-init their own weights)."""
        self._fill_buffers()

    def forward(self, task_B: torch.Tensor, stage_B: torch.Tensor) -> torch.Tensor:
        """(B,) task ids and (B,) stages -> (B, 5, width) fp32."""
        n = self.num_stages[task_B]
        stage_B = torch.minimum(stage_B, n - 1)
        frac = stage_B.float() / torch.clamp(n - 1, min=1).float()
        e_task = self.task_embeddings(task_B).float()
        sincos = posemb_sincos(frac, self.stage_dim, 1e-3, 1.0)
        learned = self.task_stage_embeddings(self.stage_offsets[task_B] + stage_B).float()
        x_all = torch.cat([e_task, sincos, learned], dim=-1)
        g_s = torch.sigmoid(self.gate_sincos(x_all))
        g_l = torch.sigmoid(self.gate_learned(x_all))
        g_t = torch.sigmoid(self.gate_task(x_all))
        f1 = e_task * g_t
        f2 = self.fusion_layer2(F.relu(self.fusion_layer1(x_all)))
        f3 = self.stage_projection(torch.cat([sincos * g_s, learned * g_l], dim=-1))
        f4 = torch.cat([sincos, learned], dim=-1)
        if f4.shape[-1] != e_task.shape[-1]:
            # [sincos; learned] is a width-sized token only when 2 * stage_dim == width (true for full and tiny).
            raise ValueError(f"2 * stage_dim ({f4.shape[-1]}) must equal the VLM width ({e_task.shape[-1]})")
        return torch.stack([e_task, f1, f2, f3, f4], dim=1)


class TimeEmbedding(nn.Module):
    """Flow time t -> adaRMS condition: swish(out(swish(in(sincos(t))))), fp32."""

    def __init__(self, width: int, min_period: float, max_period: float):
        super().__init__()
        self.width, self.min_period, self.max_period = width, min_period, max_period
        self.time_mlp_in = flax_linear(width, width)
        self.time_mlp_out = flax_linear(width, width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = posemb_sincos(t, self.width, self.min_period, self.max_period)
        return F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(emb))))
