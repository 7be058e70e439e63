"""The streaming loader: coverage, determinism, exact resume (same and different world size), bad shards.

Real multi-process DataLoaders (2 workers per rank) read real shards from a local dir and from the S3 server.
Ranks are separate loader instances with explicit rank/world_size, exactly what each Ray worker builds.
"""

from __future__ import annotations

import collections
import os
import time

import numpy as np
import pytest
import torch

from data_loaders import stream_plan
from data_loaders.manifest import ShardError
from data_loaders.stream import StreamConfig, StreamLoader
from tests.shard_factory import build_shards

LENGTHS = [37, 50, 23, 64, 41, 29]
TOTAL = sum(LENGTHS)


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("shards"))
    build_shards(d, lengths=LENGTHS, samples_per_shard=16, seed=3)
    return d


def ids(batch) -> list[tuple[int, int]]:
    return list(zip(batch["episode"].tolist(), batch["frame"].tolist()))


def run(loader, max_batches=None) -> list[dict]:
    out = []
    for b in loader:
        out.append(b)
        if max_batches is not None and len(out) == max_batches:
            break
    return out


def cfg(**kw) -> StreamConfig:
    base = dict(batch_size=8, seed=0, num_workers=2, shards_per_group=2, num_epochs=1, train=False)
    base.update(kw)
    return StreamConfig(**base)


def all_ids(batches) -> list[tuple[int, int]]:
    return [i for b in batches for i in ids(b)]


def test_two_ranks_two_workers_cover_each_sample_once(shards_dir):
    seen = []
    for rank in range(2):
        seen += all_ids(run(StreamLoader(shards_dir, cfg(), rank=rank, world_size=2)))
    assert len(seen) == TOTAL
    assert len(set(seen)) == TOTAL


def test_seed_fixes_order_and_different_seed_changes_it(shards_dir):
    a = all_ids(run(StreamLoader(shards_dir, cfg(seed=5))))
    b = all_ids(run(StreamLoader(shards_dir, cfg(seed=5))))
    c = all_ids(run(StreamLoader(shards_dir, cfg(seed=6))))
    assert a == b
    assert sorted(a) == sorted(c) and a != c
    # Shuffled across episodes, not read in file order.
    assert a != sorted(a)


def test_two_epochs_see_everything_twice_in_different_orders(shards_dir):
    seen = all_ids(run(StreamLoader(shards_dir, cfg(num_epochs=2, num_workers=1))))
    counts = collections.Counter(seen)
    assert len(seen) == 2 * TOTAL and set(counts.values()) == {2}
    assert seen[:TOTAL] != seen[TOTAL:]


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_resume_same_world_size_is_bitwise_identical(shards_dir):
    """With augmentation on: the resumed stream equals the uninterrupted one tensor for tensor."""
    c = cfg(train=True, num_epochs=2)
    full = [run(StreamLoader(shards_dir, c, rank=r, world_size=2)) for r in range(2)]
    first, states = [], []
    for r in range(2):
        loader = StreamLoader(shards_dir, c, rank=r, world_size=2)
        first.append(run(loader, max_batches=5))
        states.append(loader.state_dict())
    merged = stream_plan.merge_rank_states(states, num_workers_per_rank=[2, 2])
    for r in range(2):
        resumed = StreamLoader(shards_dir, c, rank=r, world_size=2)
        resumed.load_state_dict(merged)
        assert_batches_equal(first[r] + run(resumed), full[r])


def test_state_taken_mid_iteration_is_where_the_consumer_is_not_the_prefetcher(shards_dir):
    """The trainer checkpoints while its iterator is alive and the prefetch thread is batches ahead."""
    c = cfg(num_workers=2, prefetch_batches=3)
    full = run(StreamLoader(shards_dir, c))
    loader = StreamLoader(shards_dir, c)
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    time.sleep(0.5)  # let the producer fill its queue
    state = loader.state_dict()
    assert state["metrics"]["batches"] == 3
    resumed = StreamLoader(shards_dir, c)
    resumed.load_state_dict(state)
    assert_batches_equal(head + run(resumed), full)
    it.close()


def test_resume_single_rank_from_its_own_state(shards_dir):
    c = cfg(num_workers=2)
    full = run(StreamLoader(shards_dir, c))
    loader = StreamLoader(shards_dir, c)
    head = run(loader, max_batches=3)
    resumed = StreamLoader(shards_dir, c)
    resumed.load_state_dict(loader.state_dict())
    assert_batches_equal(head + run(resumed), full)


# (4, 1): as many slots as before but other ranks own them, so no rank can take a saved dataloader state.
@pytest.mark.parametrize("new_world,new_workers", [(3, 2), (1, 1), (4, 1)])
def test_resume_on_different_world_size_loses_and_repeats_nothing(shards_dir, new_world, new_workers):
    states, consumed = [], []
    for r in range(2):
        loader = StreamLoader(shards_dir, cfg(), rank=r, world_size=2)
        consumed += all_ids(run(loader, max_batches=4 + r))
        states.append(loader.state_dict())
    merged = stream_plan.merge_rank_states(states, num_workers_per_rank=[2, 2])
    rest = []
    for r in range(new_world):
        loader = StreamLoader(shards_dir, cfg(num_workers=new_workers), rank=r, world_size=new_world)
        loader.load_state_dict(merged)
        rest += all_ids(run(loader))
    assert not set(consumed) & set(rest)
    assert sorted(consumed + rest) == sorted(set(consumed + rest))
    assert len(consumed) + len(rest) == TOTAL


def test_resume_after_a_worker_ran_out_is_bitwise_identical(shards_dir):
    """The StatefulDataLoader skips an exhausted worker in its round-robin; a resumed one must skip it too."""
    c = cfg(num_workers=2, batch_size=4, prefetch_batches=0)
    full = run(StreamLoader(shards_dir, c))
    for cut in range(len(full) - 1, 0, -1):
        loader = StreamLoader(shards_dir, c)
        head = run(loader, max_batches=cut)
        state = loader.state_dict()
        # The layout stream.worker_cursors reads (torchdata 0.11): one dataset state per worker.
        assert sorted(state["dataloader"]["_snapshot"]["_worker_snapshots"]) == ["worker_0", "worker_1"]
        plan = loader._state
        sizes = [sum(loader.planner.group_size(0, i.group) - i.skip for i in plan.slot_items(loader.planner, 0, s))
                 for s in range(2)]
        consumed = [sum(loader.planner.group_size(0, i.group) - i.skip
                        for i in plan.slot_items(loader.planner, 0, s)[:c_.item_pos]) + c_.offset
                    for s, c_ in enumerate(stream_plan.Cursor(*x) for x in state["local_cursors"])]
        if any(done == size for done, size in zip(consumed, sizes)) and consumed != sizes:
            break
    else:
        pytest.fail("no cut where exactly one worker had run out; change LENGTHS or batch_size")
    resumed = StreamLoader(shards_dir, c)
    resumed.load_state_dict(state)
    assert_batches_equal(head + run(resumed), full)


def test_stateful_dataloader_state_does_not_fit_another_worker_count():
    """Why stream_plan.reshard exists (stream.StreamLoader._dataloader_state_for): torchdata's state is per
    process and per worker count, so a rank's state cannot be loaded by a loader with a different num_workers
    (let alone be split across ranks)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    two = StatefulDataLoader(_Counter(), batch_size=None, num_workers=2, multiprocessing_context="fork")
    it = iter(two)
    assert [list(next(it)) for _ in range(4)] == [[0, 0], [1, 0], [0, 1], [1, 1]]  # round-robin, in order
    state = two.state_dict()
    del it
    one = StatefulDataLoader(_Counter(), batch_size=None, num_workers=1, multiprocessing_context="fork")
    one.load_state_dict(state)
    with pytest.raises(AssertionError):
        next(iter(one))


class _Counter(torch.utils.data.IterableDataset):
    """(worker id, n) forever; Stateful in torchdata's sense."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        while True:
            self.n += 1
            yield (info.id if info else 0, self.n - 1)


def test_reshard_twice_then_finish_epoch(shards_dir):
    """2 ranks -> 3 ranks (partial) -> 1 rank: still every sample of the epoch exactly once."""
    consumed, states = [], []
    for r in range(2):
        loader = StreamLoader(shards_dir, cfg(), rank=r, world_size=2)
        consumed += all_ids(run(loader, max_batches=3))
        states.append(loader.state_dict())
    merged = stream_plan.merge_rank_states(states, num_workers_per_rank=[2, 2])
    states = []
    for r in range(3):
        loader = StreamLoader(shards_dir, cfg(), rank=r, world_size=3)
        loader.load_state_dict(merged)
        consumed += all_ids(run(loader, max_batches=2))
        states.append(loader.state_dict())
    merged = stream_plan.merge_rank_states(states, num_workers_per_rank=[2, 2, 2])
    loader = StreamLoader(shards_dir, cfg(num_workers=1))
    loader.load_state_dict(merged)
    consumed += all_ids(run(loader))
    assert len(consumed) == TOTAL and len(set(consumed)) == TOTAL


def test_state_for_other_shards_is_refused(shards_dir, tmp_path):
    other = str(tmp_path / "other")
    build_shards(other, lengths=[20, 30], samples_per_shard=16)
    loader = StreamLoader(other, cfg())
    run(loader, max_batches=1)
    with pytest.raises(ValueError, match="different shard set"):
        StreamLoader(shards_dir, cfg()).load_state_dict(loader.state_dict())


def test_stream_from_s3_equals_local(shards_dir, s3_bucket):
    url = f"{s3_bucket}/shards"
    build_shards(url, lengths=LENGTHS, samples_per_shard=16, seed=3)
    local = run(StreamLoader(shards_dir, cfg(train=True)))
    remote = run(StreamLoader(url, cfg(train=True)))
    assert_batches_equal(local, remote)


def test_batch_shapes_and_dtypes(shards_dir):
    b = next(iter(StreamLoader(shards_dir, cfg(num_workers=0))))
    assert b["images"].shape == (8, 3, 16, 16, 3) and b["images"].dtype == torch.uint8
    assert b["state"].shape == (8, 23) and b["actions"].shape == (8, 30, 23)
    assert b["action_mask"].dtype == torch.bool and b["task"].dtype == torch.int64


# --- bad shards ---------------------------------------------------------------------------------------------

@pytest.fixture
def damaged(tmp_path):
    d = str(tmp_path / "damaged")
    raw = build_shards(d, lengths=[40, 40], samples_per_shard=16, seed=1)
    return d, raw


def test_truncated_shard_names_the_shard(damaged):
    d, raw = damaged
    name = raw["shards"][1]["name"]
    path = os.path.join(d, name)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ShardError, match=name):
        run(StreamLoader(d, cfg()))
    # Without checksums the tar reader itself notices the truncation.
    with pytest.raises(ShardError, match=name):
        run(StreamLoader(d, cfg(verify_checksums=False, num_workers=0)))
    # In skip mode the damaged shard is left out and counted.
    loader = StreamLoader(d, cfg(on_bad_shard="skip"))
    seen = all_ids(run(loader))
    assert len(seen) == 80 - raw["shards"][1]["num_samples"]
    assert loader.metrics["skipped_shards"] == 1
    assert loader.metrics["skipped_samples"] == raw["shards"][1]["num_samples"]


def test_missing_shard_names_the_shard(damaged):
    d, raw = damaged
    name = raw["shards"][2]["name"]
    os.remove(os.path.join(d, name))
    with pytest.raises(ShardError, match=f"{name}.*missing"):
        run(StreamLoader(d, cfg()))


def test_a_worker_error_shuts_the_workers_down_before_the_prefetch_thread_ends(damaged):
    """The real error reaches the caller and stays the only one: the workers are shut down (not SIGKILLed
    by PR_SET_PDEATHSIG when the prefetch thread that forked them exits, which made torch's SIGCHLD
    handler raise "DataLoader worker is killed by signal" in the main thread while the error was held)."""
    import psutil
    from torch.utils.data import DataLoader

    list(DataLoader(range(4), num_workers=1))  # installs torch's process-wide SIGCHLD handler, as training does
    d, raw = damaged
    os.remove(os.path.join(d, raw["shards"][2]["name"]))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ShardError, match="missing") as info:
        run(StreamLoader(d, cfg(num_workers=2)))
    time.sleep(2.0)  # the error (and its traceback, which references the loader iterator) is still held here
    assert info.value is not None
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert [p.pid for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []


def test_missing_manifest_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="b1k-train data shard"):
        StreamLoader(str(tmp_path), cfg())


def test_unlisted_shards_are_never_read(damaged):
    d, _ = damaged
    with open(os.path.join(d, "shard-99999999-0000.tar"), "wb") as f:
        f.write(b"garbage from a killed conversion")
    assert len(all_ids(run(StreamLoader(d, cfg())))) == 80


def test_too_few_shards_for_the_slots_is_a_clear_error(shards_dir):
    with pytest.raises(ValueError, match="fewer than the 16 loader slots"):
        StreamLoader(shards_dir, cfg(shards_per_group=4, num_workers=4), rank=0, world_size=4)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        StreamConfig(batch_size=0)
    with pytest.raises(ValueError, match="on_bad_shard"):
        StreamConfig(batch_size=1, on_bad_shard="ignore")


def test_stream_state_roundtrips_json():
    import json

    st = stream_plan.StreamState.fresh(fingerprint="f", seed=1, shards_per_group=2, num_slots=4)
    st.overrides[3] = [stream_plan.Item(1, 5)]
    again = stream_plan.StreamState.from_dict(json.loads(json.dumps(st.to_dict())))
    assert again == st


def test_normalized_batches_invert_to_source(shards_dir):
    """Model-ready actions (delta, per-timestep z-score, padded) map back to the raw source chunk."""
    from data_loaders.transforms import Normalizer

    rng = np.random.default_rng(0)
    mean_t = np.zeros((30, 32), np.float32)
    mean_t[:, :23] = rng.normal(size=(30, 23))
    std_t = np.ones((30, 32), np.float32)
    std_t[:, :23] = rng.uniform(0.5, 2.0, size=(30, 23))

    class Stats:  # the attribute surface of NormStats that the loader uses
        state_mean = rng.normal(size=23).astype(np.float32)
        state_std = rng.uniform(0.5, 2, size=23).astype(np.float32)
        per_timestep_mean, per_timestep_std = mean_t, std_t

    raw = next(iter(StreamLoader(shards_dir, cfg(num_workers=0))))
    norm = next(iter(StreamLoader(shards_dir, cfg(num_workers=0), norm_stats=Stats())))
    assert norm["state"].shape == (8, 32) and norm["actions"].shape == (8, 30, 32)
    assert torch.all(norm["state"][:, 23:] == 0)
    back = Normalizer.from_norm_stats(Stats()).unnormalize_actions(norm["actions"].numpy(), raw["state"].numpy())
    np.testing.assert_allclose(back, raw["actions"].numpy(), atol=1e-4)
