"""The pipeline's data stage: shards -> deterministic held-out split -> per-stage views -> norm stats + FAST.

Layout under the pipeline root:

    data/views/train-pretrain/   every task's training episodes; norm_stats.json and fast_tokenizer/ live here
    data/views/train-<subset>/   the subset's training episodes (fine-tune data)
    data/views/eval-<subset>/    the subset's held-out episodes (at most eval.max_samples_per_task per task)
    data/views/eval-pretrain/    every task's held-out episodes (when eval.include_pretrain)

Statistics come from training episodes only, so nothing evaluated has leaked into normalisation either. The
fine-tunes reuse the pretrain's statistics: their weights start in those units.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable

from data_loaders import storage
from data_loaders.manifest import load_manifest
from data_loaders.splits import episodes_by_task, holdout_episodes, write_view
from trainer.data_prep import ensure_shards, prepare_data
from trainer.pipeline_config import PipelineConfig
from trainer.redact import REDACTOR

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineData:
    base_shards: str  # the conversion the views select from
    train_views: dict[str, str]  # stage name -> view URL
    eval_views: dict[str, str]
    train_fingerprints: dict[str, str]
    held_out: dict[int, list[int]]  # task -> held-out episode indices
    norm_stats: str
    fast_tokenizer: str


def read_json(url: str) -> Any | None:
    fs, path = storage.resolve(url)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def write_json(url: str, obj: Any) -> None:
    fs, path = storage.resolve(url)
    if storage.is_local(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    text = json.dumps(REDACTOR.obj(obj), indent=1, sort_keys=True, default=str)
    storage.write_bytes_atomic(fs, path, (REDACTOR(text) + "\n").encode())


def prepare_pipeline_data(cfg: PipelineConfig, root: str, out: Callable[[str], None]) -> PipelineData:
    """Make (or find) the shards, split and views of the pipeline at `root`; idempotent."""
    base = ensure_shards(cfg.train, root)
    manifest = load_manifest(base)
    by_task = episodes_by_task(manifest)
    cfg.check_tasks(set(by_task))
    held = holdout_episodes(manifest, fraction=cfg.eval.holdout_fraction, seed=cfg.train.seed, tasks=cfg.tasks)
    held_set = {e for eps in held.values() for e in eps}
    views = storage.join(root, "data", "views")
    cap = cfg.eval.max_samples_per_task
    train_views, eval_views, fingerprints = {}, {}, {}

    def make(kind: str, stage: str, tasks: tuple[int, ...], *, held_out: bool) -> str:
        eps = [e for t in tasks for e in by_task[t] if (e in held_set) == held_out]
        url = storage.join(views, f"{kind}-{stage}")
        view = write_view(manifest, url, episodes=eps, name=f"{kind}-{stage}",
                          max_samples_per_task=cap if held_out else None)
        if not held_out:
            fingerprints[stage] = view.raw["view"]["fingerprint"]
        return url

    train_views["pretrain"] = make("train", "pretrain", cfg.tasks, held_out=False)
    if cfg.eval.include_pretrain:
        eval_views["pretrain"] = make("eval", "pretrain", cfg.tasks, held_out=True)
    for s in cfg.subsets:
        train_views[s.name] = make("train", s.name, s.tasks, held_out=False)
        eval_views[s.name] = make("eval", s.name, s.tasks, held_out=True)
    n_held = sum(len(v) for v in held.values())
    out(f"== data: {manifest.num_samples} samples, {manifest.raw['num_episodes']} episodes of {len(by_task)} tasks "
        f"at {base}; {n_held} episodes held out ({cfg.eval.holdout_fraction:g} per task, seed {cfg.train.seed}); "
        f"views under {views}")
    stats_cfg = dataclasses.replace(cfg.train, data=dataclasses.replace(cfg.train.data, shards=train_views["pretrain"]))
    arts = prepare_data(stats_cfg, root)
    return PipelineData(base_shards=base, train_views=train_views, eval_views=eval_views,
                        train_fingerprints=fingerprints, held_out=held, norm_stats=arts.norm_stats,
                        fast_tokenizer=arts.fast_tokenizer)

