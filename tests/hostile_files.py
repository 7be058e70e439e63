"""Hostile files for the untrusted-storage tests: a pickle that creates a marker file if anything unpickles it."""

from __future__ import annotations

import pickle

import torch


class _Plant:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path: str, marker: str) -> None:
    """Replace `path` with a pickle that would create `marker` (a torch zip for .pt files, raw otherwise)."""
    if path.endswith(".pt"):
        torch.save({"x": _Plant(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(_Plant(marker), f)
