"""Held-out split and manifest views: deterministic, leak-free, readable like any manifest."""

import json

import pytest

from data_loaders.manifest import load_manifest, read_shard_bytes
from data_loaders.splits import episodes_by_task, holdout_episodes, write_view
from data_loaders.stream import StreamConfig, StreamLoader
from tests.shard_factory import build_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("shards"))
    # 9 episodes over tasks 0, 1, 40 (three each), 3 shards per episode.
    build_shards(url, lengths=[24] * 9, samples_per_shard=8)
    return url


def test_holdout_is_deterministic_per_seed_and_keeps_training_episodes(shards):
    m = load_manifest(shards)
    a = holdout_episodes(m, fraction=0.34, seed=0)
    assert a == holdout_episodes(m, fraction=0.34, seed=0)
    assert sorted(a) == [0, 1, 40] and all(len(v) == 1 for v in a.values())
    by_task = episodes_by_task(m)
    assert all(set(a[t]) <= set(by_task[t]) for t in a)
    seeds = {json.dumps(holdout_episodes(m, fraction=0.34, seed=s)) for s in range(8)}
    assert len(seeds) > 1  # the seed matters
    # A large fraction still leaves one training episode per task; a tiny one still holds one out.
    assert all(len(v) == 2 for v in holdout_episodes(m, fraction=0.99, seed=0).values())
    assert all(len(v) == 1 for v in holdout_episodes(m, fraction=0.01, seed=0).values())


def test_holdout_errors_name_the_problem(shards, tmp_path):
    m = load_manifest(shards)
    with pytest.raises(ValueError, match="tasks \\[7\\] have no episodes"):
        holdout_episodes(m, fraction=0.5, seed=0, tasks=[0, 7])
    with pytest.raises(ValueError, match="holdout_fraction"):
        holdout_episodes(m, fraction=0.0, seed=0)
    single = str(tmp_path / "single")
    build_shards(single, lengths=[24], samples_per_shard=8, tasks=[0])
    with pytest.raises(ValueError, match="task 0 has 1 episode.*at least 2"):
        holdout_episodes(load_manifest(single), fraction=0.5, seed=0)


def test_views_select_episodes_read_the_base_shards_and_refuse_changes(shards, tmp_path):
    m = load_manifest(shards)
    held = holdout_episodes(m, fraction=0.34, seed=0)
    held_eps = {e for v in held.values() for e in v}
    train_eps = [e for eps in episodes_by_task(m).values() for e in eps if e not in held_eps]
    train = write_view(m, str(tmp_path / "train"), episodes=train_eps, name="train")
    evalv = write_view(m, str(tmp_path / "eval"), episodes=held_eps, name="eval", max_samples_per_task=10)
    assert train.num_samples == 6 * 24 and train.base_url == shards
    assert {s.episode_index for s in train.shards}.isdisjoint({s.episode_index for s in evalv.shards})
    # The cap keeps whole shards spread over the episode: first and last of three (16 >= 10 samples).
    assert [s.first_frame for s in evalv.shards] == [0, 16] * 3
    assert evalv.num_samples == 3 * 16
    read_shard_bytes(evalv, evalv.shards[0])  # opened at the base URL, checksum verified
    loader = StreamLoader(str(tmp_path / "eval"), StreamConfig(batch_size=8, num_workers=0, num_epochs=1,
                                                               train=False, shards_per_group=1))
    eps = set()
    for batch in loader:
        eps.update(batch["episode"].tolist())
    assert eps == held_eps
    # Same content again: fine (idempotent). Different content at the same place: refused.
    write_view(m, str(tmp_path / "train"), episodes=train_eps, name="train")
    with pytest.raises(ValueError, match="already holds a different view"):
        write_view(m, str(tmp_path / "train"), episodes=train_eps[:-1], name="train")
    with pytest.raises(ValueError, match="not in"):
        write_view(m, str(tmp_path / "x"), episodes=[123456], name="x")
