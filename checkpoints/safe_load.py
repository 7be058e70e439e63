"""The one way b1k-train unpickles torch files: `weights_only=True`, so a checkpoint from an untrusted source cannot
run code when loaded. Weights themselves are always safetensors; these are optimizer, EMA and RNG states."""

from __future__ import annotations

import pickle
from typing import Any

import torch


def load_torch_state(path: str, *, map_location: str = "cpu") -> Any:
    """The tensors and plain containers in `path`; ValueError (nothing executed) if it holds anything else."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing to unpickle {path}: it holds objects other than tensors, numbers, strings and "
                         f"containers, which could run code when loaded ({str(e).splitlines()[0]}). Only load "
                         f"checkpoints your own runs wrote, from storage only you can write.") from e
