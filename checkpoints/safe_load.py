"""The one way b1k-train unpickles torch files: torch's weights-only unpickler, so a checkpoint from an untrusted
source cannot run code when loaded.

Weights themselves are safetensors, and DCP checkpoints are safetensors plus JSON (checkpoints/sharded.py). What
is left in torch's zip format are RNG and EMA states (ours: tensors and plain containers) and DeepSpeed's own
ZeRO files. DeepSpeed calls `torch.load(..., weights_only=False)` itself; `deepspeed_loads_weights_only` makes
those calls go through the weights-only unpickler with an allow-list of the few DeepSpeed classes its files hold.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
from collections.abc import Iterator
from typing import Any

import torch


class UnsafeCheckpointError(ValueError):
    """A file holds objects the weights-only loader refuses to build; nothing in it was executed."""


def _refusal(path: Any, e: BaseException) -> UnsafeCheckpointError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UnsafeCheckpointError(
        f"refusing to unpickle {path}: it holds objects other than tensors, numbers, strings and containers, "
        f"which could run code when loaded ({first[:200]}). Only load checkpoints your own runs wrote, from "
        f"storage only you can write.")


def load_torch_state(path: str, *, map_location: str = "cpu", mmap: bool = False) -> Any:
    """The tensors and plain containers in `path`; UnsafeCheckpointError (nothing executed) for anything else."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from e
    except RuntimeError as e:  # not a torch file at all (e.g. a raw pickle stream or garbage)
        raise UnsafeCheckpointError(f"{path} is not a readable torch file ({str(e).splitlines()[0][:200]})") from e


def _deepspeed_globals() -> list[Any]:
    """Classes DeepSpeed's ZeRO checkpoint files pickle besides tensors and containers (found by loading every
    file of a ZeRO 1/2/3 checkpoint, and its universal conversion, with weights_only=True)."""
    import argparse
    import collections

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, argparse.Namespace,
            collections.OrderedDict]


def deepspeed_classes_allowed() -> contextlib.AbstractContextManager:
    """Within the block, the weights-only unpickler may also build DeepSpeed's few checkpoint classes (used when
    verifying a ZeRO checkpoint's files before DeepSpeed reads them)."""
    return torch.serialization.safe_globals(_deepspeed_globals())


@contextlib.contextmanager
def deepspeed_loads_weights_only() -> Iterator[None]:
    """Within the block, every `torch.load` (DeepSpeed's included) uses the weights-only unpickler.

    DeepSpeed hard-codes `weights_only=False` and offers no hook, so the module attribute is swapped for the
    duration of a checkpoint load. That affects every thread of the process, which is what we want while the
    worker does nothing but load."""
    original = torch.load

    @functools.wraps(original)
    def weights_only_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise _refusal(f, e) from e

    with torch.serialization.safe_globals(_deepspeed_globals()):
        torch.load = weights_only_load
        try:
            yield
        finally:
            torch.load = original
