"""Per-host resource choices: whether the Ray Train workers take GPUs, and how many intra-op threads each gives
PyTorch."""

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


USE_GPU_ENV = "B1K_USE_GPU"  # 1 / 0 / auto (default): set by the Helm chart from workers.gpusPerWorker


def workers_use_gpu(*, env_value: str | None, driver_has_cuda: bool, cluster_gpus: float) -> bool:
    """Whether the training workers each take a GPU (NCCL, CUDA bf16) or a CPU (gloo).

    Why not just the driver's torch.cuda: on Kubernetes the driver runs on the Ray head pod, which has no GPU,
    while the worker group has 8 per node. "auto" therefore also looks at the cluster's GPU resources; "1"/"0"
    force the choice (an explicit "1" on a cluster without GPUs then waits for GPU nodes, e.g. an autoscaler's).
    """
    value = (env_value or "auto").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    if value != "auto":
        raise ValueError(f"{USE_GPU_ENV}={env_value!r}: use 1 (GPU workers), 0 (CPU workers) or auto")
    return driver_has_cuda or cluster_gpus > 0
