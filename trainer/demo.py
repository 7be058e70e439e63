"""`b1k-train demo`: the main job on the embedded default (local files, local processes).

synthesize a small BEHAVIOR-format dataset -> shard it -> compute norm stats -> stream model-ready batches,
printing each stage's result and the loader rate. Every stage is idempotent, so a re-run reuses finished work.
"""

from __future__ import annotations

import os
import time

from data_loaders import storage

DEMO_TASKS = [0, 1, 40]


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run_demo(workdir: str, *, seed: int = 0, episodes_per_task: int = 2, frames: int = 120,
             num_batches: int = 20, batch_size: int = 16) -> int:
    """Run the demo pipeline under `workdir`; returns a process exit code (0 on success)."""
    from data_loaders.norm_stats import NormStats
    from data_loaders.sharder import shard_dataset
    from data_loaders.stats import compute_norm_stats
    from data_loaders.stream import StreamConfig, StreamLoader
    from data_loaders.synth import synthesize

    os.makedirs(workdir, exist_ok=True)
    dataset = os.path.join(workdir, "dataset")
    shards = os.path.join(workdir, "shards")

    t0 = _stage(f"1/4 synthesize a BEHAVIOR-1K-format dataset at {dataset}")
    if os.path.exists(os.path.join(dataset, "meta", "info.json")):
        print("dataset already present; reusing it")
    else:
        print(synthesize(dataset, tasks=DEMO_TASKS, episodes_per_task=episodes_per_task, frames=frames, seed=seed))
    print(f"({time.perf_counter() - t0:.1f}s)")

    t0 = _stage(f"2/4 convert to webdataset shards at {shards}")
    manifest = shard_dataset(dataset, shards, workers=2, samples_per_shard=64)
    print(f"{len(manifest['shards'])} shards, {manifest['num_samples']} samples, "
          f"{sum(s['bytes'] for s in manifest['shards']) / manifest['num_samples'] / 1024:.1f} KiB/sample "
          f"({time.perf_counter() - t0:.1f}s)")

    t0 = _stage("3/4 normalization statistics")
    stats_url = compute_norm_stats(shards, seed=seed)
    stats = NormStats.load(stats_url)
    print(f"wrote {stats_url} ({time.perf_counter() - t0:.1f}s)")

    t0 = _stage(f"4/4 stream {num_batches} training batches (2 workers, augmentation on)")
    loader = StreamLoader(shards, StreamConfig(batch_size=batch_size, seed=seed, num_workers=2, train=True),
                          norm_stats=stats)
    first_at, n = None, 0
    for i, batch in enumerate(loader):
        if first_at is None:
            first_at = time.perf_counter()
            for k, v in batch.items():
                print(f"  {k:12s} {str(tuple(v.shape)):22s} {v.dtype}")
        else:
            n += v.shape[0] if (v := batch["task"]) is not None else 0
        if i + 1 == num_batches:
            break
    elapsed = time.perf_counter() - (first_at or time.perf_counter())
    rate = n / elapsed if elapsed > 0 else float("nan")
    print(f"loader rate after warm-up: {rate:.0f} samples/s on {os.cpu_count()} cores "
          f"({num_batches} batches of {batch_size}; epoch {loader.epoch})")
    print(f"\ndemo finished; artifacts under {storage.join(workdir)}")
    return 0
