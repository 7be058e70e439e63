"""Driver-side preparation of a run's data artifacts: shards, norm stats and FAST tokenizer.

Each step is skipped when its output exists, so re-running (resuming) a run costs nothing here. With no
`data.shards`, a small synthetic BEHAVIOR-format dataset is generated under the run directory first.
"""

from __future__ import annotations

import dataclasses
import logging

from data_loaders import storage
from data_loaders.manifest import MANIFEST_NAME
from data_loaders.norm_stats import NORM_STATS_NAME
from trainer.config import TrainConfig

log = logging.getLogger(__name__)
FAST_DIR = "fast_tokenizer"


@dataclasses.dataclass(frozen=True)
class DataArtifacts:
    shards: str
    norm_stats: str
    fast_tokenizer: str


def _exists(url: str) -> bool:
    fs, path = storage.resolve(url)
    return fs.exists(path)


def ensure_shards(cfg: TrainConfig, run_dir_url: str) -> str:
    """URL of the run's shards: `data.shards` (which must hold a manifest), or a synthetic dataset sharded under
    `<run_dir>/data` on first use."""
    cfg.data.check_source()
    shards = cfg.data.shards
    if not shards:
        from data_loaders.sharder import shard_dataset
        from data_loaders.synth import synthesize

        dataset = storage.join(run_dir_url, "data", "dataset")
        shards = storage.join(run_dir_url, "data", "shards")
        if not _exists(storage.join(dataset, "meta", "info.json")):
            log.info("synthesizing a BEHAVIOR-format dataset at %s", dataset)
            synthesize(dataset, tasks=list(cfg.data.synth_tasks), episodes_per_task=cfg.data.synth_episodes_per_task,
                       frames=cfg.data.synth_frames, seed=cfg.seed, overwrite=True)
        if not _exists(storage.join(shards, MANIFEST_NAME)):
            shard_dataset(dataset, shards, workers=1, samples_per_shard=cfg.data.synth_samples_per_shard,
                          progress=False)
    elif not _exists(storage.join(shards, MANIFEST_NAME)):
        raise FileNotFoundError(f"data.shards={shards} has no {MANIFEST_NAME}; run `b1k-train data shard SRC {shards}`")
    if cfg.data.tasks:
        shards = _task_view(shards, cfg.data.tasks, run_dir_url)
    return shards


def _task_view(shards: str, tasks: tuple[int, ...], run_dir_url: str) -> str:
    """A manifest view of `shards` holding only the episodes of `tasks` (under the run directory)."""
    from data_loaders.manifest import load_manifest
    from data_loaders.splits import episodes_by_task, write_view

    manifest = load_manifest(shards)
    by_task = episodes_by_task(manifest)
    missing = sorted(set(tasks) - set(by_task))
    if missing:
        raise ValueError(f"data.tasks asks for tasks {missing} that {shards} does not have (it has "
                         f"{sorted(by_task)})")
    name = "tasks-" + "-".join(str(t) for t in sorted(tasks))
    url = storage.join(run_dir_url, "data", "views", name)
    write_view(manifest, url, episodes=[e for t in sorted(tasks) for e in by_task[t]], name=name)
    return url


def prepare_data(cfg: TrainConfig, run_dir_url: str) -> DataArtifacts:
    """Make sure shards, norm_stats.json and the FAST tokenizer exist; return their URLs."""
    shards = ensure_shards(cfg, run_dir_url)
    norm_stats = cfg.data.norm_stats or storage.join(shards, NORM_STATS_NAME)
    if not _exists(norm_stats):
        from data_loaders.stats import compute_norm_stats

        log.info("computing %s", norm_stats)
        compute_norm_stats(shards, out=norm_stats, seed=cfg.seed)
    fast = cfg.data.fast_tokenizer or storage.join(shards, FAST_DIR)
    if not _exists(storage.join(fast, "tokenizer.json")):
        from models.pi_behavior.fast import fit_fast_tokenizer

        log.info("fitting the FAST tokenizer at %s", fast)
        fit_fast_tokenizer(shards, out=fast, norm_stats_url=norm_stats, seed=cfg.seed)
    return DataArtifacts(shards=shards, norm_stats=norm_stats, fast_tokenizer=fast)
