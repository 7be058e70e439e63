"""The block attention mask of pi-behavior (§1.2) and token positions.

openpi's rule: with c = cumsum(ar_mask), token i may attend to token j iff c[j] <= c[i] and both are valid.
Prefix blocks and their ar flags:

    images (3 x P)  0...0      |  bidirectional with the task token, blind to everything later
    base task (1)   0          |
    stage (4)       1,0,0,0    |  bidirectional with state; see images + task
    state (32)      0...0      |
    FAST (F)        1...1      |  causal; see everything before (training only)
    actions (30)    1,0...0    |  bidirectional; see the whole prefix EXCEPT the FAST tokens

Legend: B batch, S tokens.
"""

from __future__ import annotations

import torch


def make_attn_mask(input_mask_BS: torch.Tensor, ar_mask_BS: torch.Tensor) -> torch.Tensor:
    """(B, S) validity and ar flags -> (B, S, S) bool, True where query i may attend to key j."""
    cum = torch.cumsum(ar_mask_BS.long(), dim=1)
    allowed = cum[:, None, :] <= cum[:, :, None]
    valid = input_mask_BS[:, None, :] & input_mask_BS[:, :, None]
    return allowed & valid


def ensure_nonempty_rows(mask_BST: torch.Tensor) -> torch.Tensor:
    """Padding queries have no allowed key; let them see key 0 so softmax stays finite (outputs are unused)."""
    empty = ~mask_BST.any(dim=-1, keepdim=True)
    if not bool(empty.any()):
        return mask_BST
    fix = torch.zeros_like(mask_BST)
    fix[..., 0] = True
    return mask_BST | (empty & fix)


def prefix_ar_mask(num_image_tokens: int, num_state_tokens: int, num_fast_tokens: int,
                   device: torch.device | None = None) -> torch.Tensor:
    """ar flags of the prefix: images, base task, 4 stage tokens, state tokens, FAST tokens."""
    flags = [0] * num_image_tokens + [0] + [1, 0, 0, 0] + [0] * num_state_tokens + [1] * num_fast_tokens
    return torch.tensor(flags, dtype=torch.bool, device=device)


def suffix_ar_mask(horizon: int, device: torch.device | None = None) -> torch.Tensor:
    return torch.tensor([1] + [0] * (horizon - 1), dtype=torch.bool, device=device)


def full_attention_mask(prefix_valid_BS: torch.Tensor, prefix_ar_S: torch.Tensor, num_fast_tokens: int,
                        horizon: int) -> torch.Tensor:
    """The joint (prefix + FAST + actions) mask of one training sequence, with action->FAST removed.

    This is the mask the model's separate prefix and expert passes implement block by block; it is spelled out
    whole for tests and documentation.
    """
    b = prefix_valid_BS.shape[0]
    ar = torch.cat([prefix_ar_S, suffix_ar_mask(horizon, prefix_ar_S.device)])[None].expand(b, -1)
    valid = torch.cat([prefix_valid_BS, torch.ones(b, horizon, dtype=torch.bool, device=prefix_valid_BS.device)],
                      dim=1)
    mask = make_attn_mask(valid, ar)
    p = prefix_valid_BS.shape[1]
    if num_fast_tokens:
        mask[:, p:, p - num_fast_tokens:p] = False
    return mask


def positions_from_mask(input_mask_BS: torch.Tensor) -> torch.Tensor:
    """RoPE positions = cumsum(valid) - 1."""
    return torch.cumsum(input_mask_BS.long(), dim=1) - 1


def suffix_mask(prefix_valid_BP: torch.Tensor, horizon: int, num_samples: int) -> torch.Tensor:
    """(B, N*H, P + N*H): every action token sees all valid prefix keys (FAST excluded by the caller) and the
    tokens of its own flow sample only (block diagonal), so N samples share one prefix in one pass."""
    b, p = prefix_valid_BP.shape
    n_tok = num_samples * horizon
    sample_id = torch.arange(n_tok, device=prefix_valid_BP.device) // horizon
    own = sample_id[:, None] == sample_id[None, :]
    to_prefix = prefix_valid_BP[:, None, :].expand(b, n_tok, p)
    return torch.cat([to_prefix, own[None].expand(b, n_tok, n_tok)], dim=2)
