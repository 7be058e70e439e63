"""Deterministic held-out episodes per task, and manifest *views* that select shards without copying them.

Shards never span episodes (ShardInfo.episode_index), so any set of episodes is a set of shards. A view is a
manifest.json in its own directory that lists those shards and points "base_url" at the conversion holding them;
every reader (stream, stats, FAST) then works on the view as on any other manifest.

    held = holdout_episodes(manifest, fraction=0.05, seed=0)         # {task: [episode, ...]}
    train = write_view(manifest, url_a, episodes=train_eps)           # a Manifest over those episodes
    evalv = write_view(manifest, url_b, episodes=held_eps, max_samples_per_task=512)
"""

from __future__ import annotations

import copy
import hashlib
from typing import Iterable

from data_loaders import storage
from data_loaders.manifest import MANIFEST_NAME, Manifest, load_manifest, manifest_to_bytes


def episodes_by_task(manifest: Manifest) -> dict[int, list[int]]:
    """{task: sorted episode indices} over the episodes the manifest holds."""
    out: dict[int, list[int]] = {}
    for ep in manifest.raw["episodes"]:
        out.setdefault(int(ep["task_index"]), []).append(int(ep["episode_index"]))
    return {t: sorted(eps) for t, eps in sorted(out.items())}


def holdout_episodes(manifest: Manifest, *, fraction: float, seed: int, tasks: Iterable[int] | None = None,
                     min_per_task: int = 1) -> dict[int, list[int]]:
    """Held-out episodes per task: round(fraction x n) of each task's n episodes (at least `min_per_task`, at most
    n - 1, so training keeps one), chosen by a seeded hash of the episode index. The choice of an episode does not
    depend on which other episodes exist, so adding data never moves an episode between train and held-out
    unless the count per task changes."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}; "
                         f"e.g. --set eval.holdout_fraction=0.05")
    by_task = episodes_by_task(manifest)
    wanted = sorted(by_task) if tasks is None else sorted(set(tasks))
    missing = [t for t in wanted if t not in by_task]
    if missing:
        raise ValueError(f"tasks {missing} have no episodes in {manifest.url} (it has tasks {sorted(by_task)}); "
                         f"fix the subsets or the data")
    held: dict[int, list[int]] = {}
    for task in wanted:
        eps = by_task[task]
        if len(eps) < 2:
            raise ValueError(f"task {task} has {len(eps)} episode in {manifest.url}; a held-out split needs at least 2 "
                             f"per task (one to train on, one to evaluate)")
        k = min(len(eps) - 1, max(min_per_task, round(fraction * len(eps))))
        ranked = sorted(eps, key=lambda e: hashlib.blake2b(f"{seed}:{e}".encode(), digest_size=8).digest())
        held[task] = sorted(ranked[:k])
    return held


def _spread(shards: list[dict], limit: int) -> list[dict]:
    """Shards evenly spaced through the list until their samples reach `limit` (whole episodes' phases covered)."""
    if sum(s["num_samples"] for s in shards) <= limit:
        return shards
    picked: list[dict] = []
    total = 0
    n = len(shards)
    for count in range(1, n + 1):
        idx = sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(count)})
        picked = [shards[i] for i in idx]
        total = sum(s["num_samples"] for s in picked)
        if total >= limit:
            break
    return picked


def view_raw(manifest: Manifest, *, episodes: Iterable[int], name: str,
             max_samples_per_task: int | None = None) -> dict:
    """The manifest dict of a view over `episodes` (optionally at most ~max_samples_per_task per task)."""
    wanted = set(int(e) for e in episodes)
    known = {int(ep["episode_index"]) for ep in manifest.raw["episodes"]}
    if wanted - known:
        raise ValueError(f"episodes {sorted(wanted - known)[:10]} are not in {manifest.url}")
    eps = [ep for ep in manifest.raw["episodes"] if int(ep["episode_index"]) in wanted]
    task_of = {int(ep["episode_index"]): int(ep["task_index"]) for ep in eps}
    shards = [s for s in manifest.raw["shards"] if int(s["episode_index"]) in wanted]
    if max_samples_per_task is not None:
        per_task: dict[int, list[dict]] = {}
        for s in shards:
            per_task.setdefault(task_of[int(s["episode_index"])], []).append(s)
        shards = [s for t in sorted(per_task) for s in _spread(per_task[t], max_samples_per_task)]
    kept_names = {s["name"] for s in shards}
    raw = copy.deepcopy(manifest.raw)
    raw["base_url"] = manifest.base_url
    raw["shards"] = shards
    raw["episodes"] = [{**ep, "shards": [n for n in ep["shards"] if n in kept_names]} for ep in eps]
    raw["num_samples"] = sum(int(s["num_samples"]) for s in shards)
    raw["num_episodes"] = len(eps)
    raw["tasks"] = {k: v for k, v in manifest.raw["tasks"].items() if int(k) in set(task_of.values())}
    raw["skipped_episodes"] = []
    raw["view"] = {"name": name, "of": manifest.url, "fingerprint": view_fingerprint(shards)}
    return raw


def view_fingerprint(shards: list[dict]) -> str:
    """Identifies a set of shards by content (names and checksums): equal fingerprints, equal data."""
    h = hashlib.sha256()
    for s in sorted(shards, key=lambda s: s["name"]):
        h.update(f"{s['name']}:{s['sha256']};".encode())
    return h.hexdigest()[:16]


def write_view(manifest: Manifest, out_url: str, *, episodes: Iterable[int], name: str,
               max_samples_per_task: int | None = None) -> Manifest:
    """Write (or find) the view at `out_url`; returns it loaded. An existing different view is refused: runs
    trained on it would no longer match their data."""
    raw = view_raw(manifest, episodes=episodes, name=name, max_samples_per_task=max_samples_per_task)
    if not raw["shards"]:
        raise ValueError(f"view {name!r} of {manifest.url} selects no shards")
    data = manifest_to_bytes(raw)
    fs, path = storage.resolve(out_url)
    target = storage.join(path, MANIFEST_NAME)
    if fs.exists(target):
        if fs.cat_file(target) != data:
            raise ValueError(f"{out_url}/{MANIFEST_NAME} already holds a different view {name!r} (other data, split "
                             f"or settings); runs trained on it would not match. Use a new --run-name or delete it")
    else:
        if storage.is_local(fs):
            fs.makedirs(path, exist_ok=True)
        storage.write_bytes_atomic(fs, target, data)
    return load_manifest(out_url)
