"""How many intra-op threads a training worker gives PyTorch on its host."""

from __future__ import annotations


def torch_threads(*, requested: int, cpu_count: int, local_world_size: int, loader_workers: int) -> int:
    """Threads for this rank's torch ops: `requested` when > 0, else the rank's share of the host's cores
    minus its DataLoader worker processes, at least 1.

    Why subtract the loader: each loader process keeps a core busy decoding and augmenting. Oversubscribed
    intra-op pools spin and get preempted mid-kernel, which cost 37% step time on a 2-core host (179 ms vs
    131 ms per step of the tiny model with one loader worker, bench/README.md).
    """
    if requested < 0:
        raise ValueError(f"cpu_threads must be >= 0 (0 = automatic), got {requested}")
    if requested:
        return requested
    share = max(1, cpu_count // max(1, local_world_size))
    return max(1, share - max(0, loader_workers))
