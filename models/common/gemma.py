"""Gemma decoder blocks (PaliGemma's Gemma-2B and the Pi0.5 action expert), numerically like HF `GemmaModel`.

Shape legend: B batch, S query tokens, T key tokens, D width, H query heads, K kv heads, E head dim.

- RMSNorm: x / rms(x) * (1 + w), computed in float32, w zero-initialised.
- AdaRMSNorm (action expert): no learned weight; a zero-initialised Dense(cond -> 3D) gives scale, shift, gate:
  y = norm(x) * (1 + scale) + shift, and the block's residual adds gate * f(y). At initialisation the gate is
  0, so an untrained expert block is the identity.
- Attention: multi-query (K = 1 for Gemma-2B/300M), RoPE (rotate-half, base 10000) on q and k, q scaled by
  E^-0.5, logits/softmax in float32, boolean masks (True = may attend).
- MLP: GeGLU with tanh-GELU.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaConfig:
    width: int  # hidden size D
    depth: int  # number of blocks
    mlp_dim: int  # GeGLU hidden size
    num_heads: int  # query heads H
    num_kv_heads: int  # key/value heads K (1 = multi-query)
    head_dim: int  # E
    vocab_size: int = 0  # token embedding rows (0 = no embedder, e.g. the action expert)
    rms_eps: float = 1e-6
    rope_base: float = 10_000.0

    def __post_init__(self) -> None:
        for name in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"GemmaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())
        return y.to(x.dtype), None


class AdaRMSNorm(nn.Module):
    """RMS norm modulated by a conditioning vector (the flow-time embedding); returns (y, gate)."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Zero modulation: scale 0, shift 0, gate 0 -> an untrained expert block adds nothing (identity).
        nn.init.zeros_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if cond is None:
            raise ValueError("AdaRMSNorm needs a conditioning tensor")
        if cond.dim() == 2:  # one condition per sequence -> broadcast over tokens
            cond = cond[:, None, :]
        modulation = self.dense(cond)
        if modulation.shape[1] not in (1, x.shape[1]):
            # One condition per group of consecutive tokens (a flow sample's action chunk): the Dense runs once
            # per group, not once per token, then is repeated over the group's tokens.
            if x.shape[1] % modulation.shape[1]:
                raise ValueError(f"{x.shape[1]} tokens cannot be split into {modulation.shape[1]} equal groups")
            modulation = modulation.repeat_interleave(x.shape[1] // modulation.shape[1], dim=1)
        scale, shift, gate = modulation.chunk(3, dim=-1)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = y * (1.0 + scale.float()) + shift.float()
        return y.to(x.dtype), gate


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, S, E) for integer positions (B, S), in float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x_BHSE: torch.Tensor, cos_BSE: torch.Tensor, sin_BSE: torch.Tensor) -> torch.Tensor:
    half = x_BHSE.shape[-1] // 2
    rotated = torch.cat([-x_BHSE[..., half:], x_BHSE[..., :half]], dim=-1)
    xf = x_BHSE.float()
    out = xf * cos_BSE[:, None] + rotated.float() * sin_BSE[:, None]
    return out.to(x_BHSE.dtype)


def attention(q_BHSE: torch.Tensor, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor,
              mask_BST: torch.Tensor) -> torch.Tensor:
    """Masked softmax attention in float32 (as the reference); mask True = allowed. Returns (B, S, H*E)."""
    b, h, s, e = q_BHSE.shape
    groups = h // k_BKTE.shape[1]
    k = k_BKTE.repeat_interleave(groups, dim=1) if groups > 1 else k_BKTE
    v = v_BKTE.repeat_interleave(groups, dim=1) if groups > 1 else v_BKTE
    out = F.scaled_dot_product_attention(q_BHSE.float(), k.float(), v.float(), attn_mask=mask_BST[:, None],
                                         scale=1.0 / math.sqrt(e))
    return out.to(q_BHSE.dtype).transpose(1, 2).reshape(b, s, h * e)


def grouped_prefix_attention(q_BHSE: torch.Tensor, k_BKPE: torch.Tensor, v_BKPE: torch.Tensor,
                             valid_BP: torch.Tensor, ks_BKSE: torch.Tensor, vs_BKSE: torch.Tensor,
                             group: int) -> torch.Tensor:
    """Attention of S = G * group query tokens over a shared prefix (P keys, `valid_BP` marks usable ones) plus
    their own group's `group` keys only (block diagonal), in float32. Returns (B, S, H*E).

    Equal to one softmax over [prefix; all S tokens] with a block-diagonal mask, but it never forms the S x S
    cross-group scores: cost S * (P + group) instead of S * (P + S), which is what makes N flow samples in one
    pass cheaper than N passes.
    """
    b, h, s, e = q_BHSE.shape
    g = s // group
    rep = h // k_BKPE.shape[1]
    q = q_BHSE.float() / math.sqrt(e)
    kp = k_BKPE.float().repeat_interleave(rep, dim=1)
    vp = v_BKPE.float().repeat_interleave(rep, dim=1)
    logits_p = q @ kp.transpose(-1, -2)  # (B, H, S, P)
    logits_p = logits_p.masked_fill(~valid_BP[:, None, None, :], float("-inf"))
    qg = q.reshape(b, h, g, group, e)
    ksg = ks_BKSE.float().repeat_interleave(rep, dim=1).reshape(b, h, g, group, e)
    vsg = vs_BKSE.float().repeat_interleave(rep, dim=1).reshape(b, h, g, group, e)
    logits_s = (qg @ ksg.transpose(-1, -2)).reshape(b, h, s, group)  # (B, H, S, group)
    weights = torch.softmax(torch.cat([logits_p, logits_s], dim=-1), dim=-1)
    p = logits_p.shape[-1]
    out = weights[..., :p] @ vp + (weights[..., p:].reshape(b, h, g, group, group) @ vsg).reshape(b, h, s, e)
    return out.to(q_BHSE.dtype).transpose(1, 2).reshape(b, s, h * e)


class GemmaMLP(nn.Module):
    def __init__(self, width: int, mlp_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, mlp_dim, bias=False)
        self.up_proj = nn.Linear(width, mlp_dim, bias=False)
        self.down_proj = nn.Linear(mlp_dim, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)

    def qkv(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Post-RoPE q (B, H, S, E), k and v (B, K, S, E)."""
        b, s, _ = x_BSD.shape
        c = self.cfg
        q = self.q_proj(x_BSD).view(b, s, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSD).view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class GemmaBlock(nn.Module):
    """One decoder block. With `cond_dim` its norms are adaptive (action expert)."""

    def __init__(self, cfg: GemmaConfig, cond_dim: int | None = None):
        super().__init__()
        norm = (lambda: AdaRMSNorm(cfg.width, cond_dim, cfg.rms_eps)) if cond_dim else \
            (lambda: RMSNorm(cfg.width, cfg.rms_eps))
        self.input_layernorm = norm()
        self.self_attn = GemmaAttention(cfg)
        self.post_attention_layernorm = norm()
        self.mlp = GemmaMLP(cfg.width, cfg.mlp_dim)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask_BST: torch.Tensor,
                cond: torch.Tensor | None = None, extra_k: torch.Tensor | None = None,
                extra_v: torch.Tensor | None = None, group: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (new hidden, this block's post-RoPE k, v).

        `extra_k/v` (B, K, T0, E) are prepended keys. With `group`, the tokens form independent groups of that
        size which see the extra keys and their own group only, and `mask_BST` is instead the (B, T0) validity
        of the extra keys (grouped_prefix_attention).
        """
        h, gate = self.input_layernorm(x_BSD, cond)
        q, k, v = self.self_attn.qkv(h, cos, sin)
        if group is not None:
            if extra_k is None or extra_v is None:
                raise ValueError("grouped attention needs the prefix keys/values")
            attn = grouped_prefix_attention(q, extra_k.to(k.dtype), extra_v.to(v.dtype), mask_BST, k, v, group)
        else:
            keys = k if extra_k is None else torch.cat([extra_k.to(k.dtype), k], dim=2)
            values = v if extra_v is None else torch.cat([extra_v.to(v.dtype), v], dim=2)
            attn = attention(q, keys, values, mask_BST)
        out = self.self_attn.o_proj(attn)
        x_BSD = x_BSD + (out if gate is None else out * gate)
        h, gate = self.post_attention_layernorm(x_BSD, cond)
        out = self.mlp(h)
        x_BSD = x_BSD + (out if gate is None else out * gate)
        return x_BSD, k, v
