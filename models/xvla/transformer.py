"""X-VLA's soft-prompted action transformer (xvla.md §1.4) with the BEHAVIOR variant's additive prompts (§3.2).

Sequence: [action tokens (T) | projected VLM features (view 0 + text) | projected other views] + learned
positions, then the prompt tokens (no position embedding), then pre-LN blocks; only the T action positions
are decoded. Prompt = soft_prompt_hub[domain] + task_prompt_hub[task] + skill_prompt_hub[skill]: the task and
skill tables start at zero, so a freshly initialised variant computes exactly what the base model computes.

Parameter names follow the X-VLA checkpoints (`transformer.*` keys, §4.3) so published weights load by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.xvla.config import XVLAConfig


def time_embedding(t: torch.Tensor, dim: int, max_period: float = 100.0) -> torch.Tensor:
    """(B,) times in [0, 1) -> (B, dim): [cos(t f_k), sin(t f_k)], f_k = exp(-ln(max_period) k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DomainAwareLinear(nn.Module):
    """A linear layer whose weight and bias are rows of embedding tables, one per domain."""

    def __init__(self, in_features: int, out_features: int, num_domains: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fc = nn.Embedding(num_domains, in_features * out_features)
        self.bias = nn.Embedding(num_domains, out_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.fc.weight)  # on the [domains, I*O] matrix, as the checkpoints were made
        nn.init.zeros_(self.bias.weight)

    def forward(self, x_BTI: torch.Tensor, domain_B: torch.Tensor) -> torch.Tensor:
        b = domain_B.shape[0]
        w = self.fc(domain_B).view(b, self.in_features, self.out_features).to(x_BTI.dtype)
        return torch.matmul(x_BTI, w) + self.bias(domain_B).to(x_BTI.dtype)[:, None]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x), approximate="tanh"))))


class Block(nn.Module):
    """Pre-LN: x + Attn(LN(x)), then x + MLP(LN(x)); bidirectional, no mask."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SoftPromptedTransformer(nn.Module):
    def __init__(self, cfg: XVLAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, n = cfg.hidden_size, cfg.num_domains
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.vlm_proj = nn.Linear(cfg.text.d_model, d)
        self.aux_visual_proj = nn.Linear(cfg.text.d_model, d)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.max_len_seq, d))
        self.norm = nn.LayerNorm(d)
        # [noisy action (max_action_dim) | proprio (max_state_dim) | time (dim_time)] per action token
        self.action_encoder = DomainAwareLinear(cfg.max_action_dim + cfg.max_state_dim + cfg.dim_time, d, n)
        self.action_decoder = DomainAwareLinear(d, cfg.max_action_dim, n)
        p = cfg.len_soft_prompts * d
        self.soft_prompt_hub = nn.Embedding(n, p)
        self.task_prompt_hub = nn.Embedding(cfg.num_tasks, p)
        self.skill_prompt_hub = nn.Embedding(cfg.num_skills, p)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, DomainAwareLinear):
                m.reset_parameters()
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.soft_prompt_hub.weight, std=0.02)
        nn.init.zeros_(self.task_prompt_hub.weight)  # the variant starts as the base model
        nn.init.zeros_(self.skill_prompt_hub.weight)

    def prompts(self, domain_B: torch.Tensor, task_B: torch.Tensor, skill_B: torch.Tensor) -> torch.Tensor:
        """(B, len_soft_prompts, D) additive prompt tokens."""
        p = self.soft_prompt_hub(domain_B) + self.task_prompt_hub(task_B) + self.skill_prompt_hub(skill_B)
        return p.view(domain_B.shape[0], self.cfg.len_soft_prompts, self.cfg.hidden_size)

    def forward(self, *, x_t: torch.Tensor, proprio: torch.Tensor, t: torch.Tensor, vlm_features: torch.Tensor,
                aux_visual: torch.Tensor, domain: torch.Tensor, task: torch.Tensor, skill: torch.Tensor
                ) -> torch.Tensor:
        """x_t (B, T, A) noisy chunk, proprio (B, S), t (B,) -> predicted clean chunk (B, T, A)."""
        b, horizon = x_t.shape[:2]
        time_tok = time_embedding(t, self.cfg.dim_time).to(x_t.dtype)[:, None].expand(b, horizon, -1)
        tokens = torch.cat([x_t, proprio[:, None].expand(b, horizon, -1).to(x_t.dtype), time_tok], dim=-1)
        x = torch.cat([self.action_encoder(tokens, domain), self.vlm_proj(vlm_features),
                       self.aux_visual_proj(aux_visual)], dim=1)
        if x.shape[1] > self.pos_emb.shape[1]:
            raise ValueError(f"sequence of {x.shape[1]} tokens exceeds max_len_seq={self.pos_emb.shape[1]}")
        x = x + self.pos_emb[:, : x.shape[1]]
        x = torch.cat([x, self.prompts(domain, task, skill).to(x.dtype)], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.action_decoder(self.norm(x[:, :horizon]), domain)
