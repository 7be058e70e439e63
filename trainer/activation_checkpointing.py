"""Activation checkpointing applied from outside the model: every repeated transformer block is wrapped so its
activations are recomputed in backward (about one extra forward pass of compute for a large memory saving)."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap each block listed by `model.transformer_blocks()` in place; returns how many were wrapped.

    Blocks already wrapped are left alone, so calling it twice is harmless.
    """
    targets = {id(b) for b in model.transformer_blocks() if not isinstance(b, CheckpointWrapper)}
    # Collect first, then replace: wrapping while walking the tree would visit (and wrap) the new wrappers.
    sites = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if id(child) in targets]
    for parent, name, child in sites:
        setattr(parent, name, checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
    return len(sites)
