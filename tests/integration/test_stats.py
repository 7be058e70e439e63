"""compute_norm_stats on real shard tars (local and S3) against an in-memory numpy reference of the same arrays."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from data_loaders import storage
from data_loaders.behavior_facts import (
    ACTION_DIM,
    ACTION_HORIZON,
    CAMERAS,
    DELTA_ACTION_MASK,
    MODEL_DIM,
    episode_index,
    stage_label,
)
from data_loaders.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, manifest_to_bytes, write_tar
from data_loaders.norm_stats import CONSTANT_STD, NormStats
from data_loaders.running_stats import hash64, unit_interval
from data_loaders.sample_format import encode_sample, sample_key
from data_loaders.stats import _SALT_SELECT, compute_norm_stats

pytestmark = pytest.mark.integration

CONSTANT_DIM = 6  # trunk dim 6 is constant in the real data too (pi_behavior §1.9)
LENGTHS = {episode_index(0, 0): 75, episode_index(0, 1): 48, episode_index(1, 0): 17, episode_index(40, 3): 96}


def _episodes(seed: int = 0) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """episode -> (state (T, 23), actions (T, 23)): smooth random walks with large offsets and one constant dim."""
    rng = np.random.default_rng(seed)
    out = {}
    for ep, n in LENGTHS.items():
        actions = np.cumsum(rng.normal(0, 0.05, (n, ACTION_DIM)), axis=0) + rng.normal(0, 50, ACTION_DIM)
        actions[:, CONSTANT_DIM] = 0.25
        state = actions + rng.normal(0, 0.02, (n, ACTION_DIM))  # state tracks the commanded action
        out[ep] = (state.astype(np.float32), actions.astype(np.float32))
    return out


def _write_shards(url: str, episodes: dict, *, samples_per_shard: int = 40, shard_order: list[int] | None = None,
                  with_stages: bool = False):
    """Shards + manifest in the layout of manifest.py; `shard_order` permutes the manifest's shard list;
    `with_stages` labels every sample with its time-based stage (as `data shard` does)."""
    rng = np.random.default_rng(1)
    samples, firsts = [], []
    for ep, (state, actions) in episodes.items():
        n = len(state)
        for t in range(n):
            idx = np.minimum(np.arange(t, t + ACTION_HORIZON), n - 1)  # past the end: repeat the last action
            meta = {"episode": ep, "frame": t, "episode_length": n, "task": ep // 10000}
            if with_stages:
                meta["stage"] = stage_label(t, n, ep // 10000)
            files = encode_sample(
                images={c: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for c in CAMERAS}, state=state[t],
                actions=actions[idx], action_mask=np.arange(t, t + ACTION_HORIZON) < n, meta=meta,
                image_format="png", quality=90)
            samples.append((sample_key(ep, t), files))
            firsts.append((ep, t))
    shards = []
    fs, root = storage.resolve(url)
    for i in range(0, len(samples), samples_per_shard):
        data = write_tar(samples[i:i + samples_per_shard])
        name = f"shard-{i // samples_per_shard:06d}.tar"
        storage.write_bytes_atomic(fs, storage.join(root, name), data)
        shards.append({"name": name, "num_samples": len(samples[i:i + samples_per_shard]), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest(), "episode_index": firsts[i][0],
                       "first_frame": firsts[i][1]})
    if shard_order is not None:
        shards = [shards[i] for i in shard_order]
    raw = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
           "settings": {"samples_per_shard": samples_per_shard, "image_format": "png", "quality": 90,
                        "image_size": 8, "action_horizon": ACTION_HORIZON},
           "source": {"url": "synthetic", "layout": "b1k", "codebase_version": "v2.1", "fps": 30},
           "tasks": {"0": "t0", "1": "t1", "40": "t40"}, "num_samples": len(samples), "num_episodes": len(episodes),
           "episodes": [{"episode_index": ep, "task_index": ep // 10000, "length": len(s), "shards": []}
                        for ep, (s, _) in episodes.items()],
           "shards": shards, "skipped_episodes": []}
    storage.write_bytes_atomic(fs, storage.join(root, MANIFEST_NAME), manifest_to_bytes(raw))
    return len(shards)


def _reference(episodes: dict, *, fraction: float = 1.0, seed: int = 42) -> dict[str, np.ndarray]:
    """Straightforward numpy: all sliding windows i = 0..len-30, delta, pad, pool."""
    chunks = []
    for ep, (state, actions) in episodes.items():
        for i in range(len(state) - ACTION_HORIZON + 1):
            u = unit_interval(hash64(seed, _SALT_SELECT, np.array([ep]), np.array([i])))[0]
            if u >= fraction:
                continue
            d = actions[i:i + ACTION_HORIZON].astype(np.float64)
            d[:, DELTA_ACTION_MASK] -= state[i, DELTA_ACTION_MASK].astype(np.float64)
            chunks.append(np.pad(d, ((0, 0), (0, MODEL_DIM - ACTION_DIM))))
    c = np.stack(chunks)
    flat = c.reshape(len(c), -1)
    live = flat.std(axis=0) >= CONSTANT_STD
    corr = np.eye(flat.shape[1])
    corr[np.ix_(live, live)] = np.corrcoef(flat[:, live], rowvar=False)
    states = np.concatenate([s for s, _ in episodes.values()]).astype(np.float64)
    rows = c[:, :, :ACTION_DIM].reshape(-1, ACTION_DIM)
    return {"chunks": c, "corr": corr, "live": live, "states": states, "rows": rows}


@pytest.fixture(scope="module")
def episodes() -> dict:
    return _episodes()


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory, episodes) -> str:
    url = str(tmp_path_factory.mktemp("shards"))
    _write_shards(url, episodes)
    return url


@pytest.fixture(scope="module")
def full_stats(local_shards) -> NormStats:
    return NormStats.load(compute_norm_stats(local_shards))


def test_matches_numpy_reference(full_stats, episodes, local_shards):
    ref = _reference(episodes)
    s, c, states = full_stats, ref["chunks"], ref["states"]
    assert s.num_frames == sum(LENGTHS.values())
    assert s.num_chunks == s.num_full_chunks == len(c) == sum(max(0, n - 29) for n in LENGTHS.values())
    np.testing.assert_allclose(s.state_mean, states.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.state_std, states.std(0), rtol=1e-9)
    np.testing.assert_array_equal(s.state_min, states.min(0))
    np.testing.assert_array_equal(s.state_max, states.max(0))
    np.testing.assert_allclose(s.state_q01, np.quantile(states, 0.01, axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.state_q99, np.quantile(states, 0.99, axis=0), rtol=1e-12)
    # Per-timestep stats: real dims from the chunks; padded dims 0/1; the constant dim keeps its ~0 std.
    np.testing.assert_allclose(s.per_timestep_mean[:, :ACTION_DIM], c.mean(0)[:, :ACTION_DIM], rtol=1e-10, atol=1e-12)
    ref_std = c.std(0)[:, :ACTION_DIM]
    np.testing.assert_allclose(s.per_timestep_std[:, :ACTION_DIM], ref_std, rtol=1e-8, atol=1e-12)
    assert np.all(s.per_timestep_mean[:, ACTION_DIM:] == 0) and np.all(s.per_timestep_std[:, ACTION_DIM:] == 1)
    assert np.all(s.per_timestep_std[:, CONSTANT_DIM] < 1e-6) and np.all(s.per_timestep_mean[:, CONSTANT_DIM] == 0.25)
    # Single-step stats and true percentiles of the delta rows.
    np.testing.assert_allclose(s.action_mean, ref["rows"].mean(0), rtol=1e-10, atol=1e-12)
    ref_step_std = ref["rows"].std(0)
    assert ref_step_std[CONSTANT_DIM] == 0 and s.action_std[CONSTANT_DIM] < 1e-6
    np.testing.assert_allclose(s.action_std, ref_step_std, rtol=1e-8, atol=1e-12)
    # (the reservoir keeps float32 rows, the data's own precision)
    np.testing.assert_allclose(s.action_q01, np.quantile(ref["rows"], 0.01, axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s.action_q99, np.quantile(ref["rows"], 0.99, axis=0), rtol=1e-6, atol=1e-7)
    # Correlation: L L^T = corrcoef + jitter I, unit diagonal, identity rows for constant coordinates.
    chol, live = s.action_correlation_cholesky, ref["live"]
    assert s.correlation_jitter == 1e-6
    np.testing.assert_allclose(chol @ chol.T, ref["corr"] + 1e-6 * np.eye(len(live)), atol=1e-8)
    np.testing.assert_allclose(np.diag(chol @ chol.T), 1.0, atol=2e-6)
    constant = np.flatnonzero(~live)
    assert len(constant) == ACTION_HORIZON * (MODEL_DIM - ACTION_DIM + 1)  # 9 padded dims + dim 6, every step
    expected = np.zeros((len(constant), len(live)))
    expected[np.arange(len(constant)), constant] = np.sqrt(1 + 1e-6)
    np.testing.assert_array_equal(chol[constant], expected)
    np.testing.assert_array_equal(chol[:, constant][~np.isin(np.arange(len(live)), constant)], 0.0)
    # Metadata ties the stats to the exact manifest.
    manifest_bytes = storage.resolve(storage.join(local_shards, MANIFEST_NAME))[0].cat_file(
        storage.join(local_shards, MANIFEST_NAME))
    assert s.manifest_sha256 == hashlib.sha256(manifest_bytes).hexdigest()
    assert s.seed == 42 and s.sample_fraction == 1.0


def _close(a: NormStats, b: NormStats) -> None:
    for name in ("state_mean", "state_std", "action_mean", "action_std", "per_timestep_mean", "per_timestep_std",
                 "action_correlation_cholesky"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-9, err_msg=name)
    for name in ("state_q01", "state_q99", "state_min", "state_max", "action_q01", "action_q99"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.num_frames, a.num_chunks, a.num_full_chunks) == (b.num_frames, b.num_chunks, b.num_full_chunks)


def test_invariant_to_shard_order_with_capped_reservoirs(tmp_path, episodes):
    """Bottom-k reservoirs make even the sampled quantiles independent of the order shards are read in."""
    n = _write_shards(str(tmp_path / "a"), episodes)
    order = list(np.random.default_rng(3).permutation(n))
    _write_shards(str(tmp_path / "b"), episodes, shard_order=order)
    a = NormStats.load(compute_norm_stats(str(tmp_path / "a"), max_quantile_samples=50))
    b = NormStats.load(compute_norm_stats(str(tmp_path / "b"), max_quantile_samples=50))
    _close(a, b)
    assert a.manifest_sha256 != b.manifest_sha256
    # 50 of ~5000 rows still land near the true percentiles of these smooth walks.
    ref = _reference(episodes)
    spread = ref["rows"].max(0) - ref["rows"].min(0)
    assert np.all(np.abs(a.action_q01 - np.quantile(ref["rows"], 0.01, axis=0)) <= 0.25 * spread + 1e-9)


def test_sample_fraction_is_deterministic_and_half(local_shards, episodes, tmp_path, full_stats):
    def run(seed: int) -> NormStats:
        return NormStats.load(compute_norm_stats(local_shards, out=str(tmp_path / f"s{seed}.json"),
                                                 sample_fraction=0.5, seed=seed))

    a, a2, b = run(7), run(7), run(8)
    assert a == a2
    assert 0.35 < a.num_chunks / a.num_full_chunks < 0.65 and a.num_full_chunks == full_stats.num_full_chunks
    assert a.num_chunks != b.num_chunks or not np.array_equal(a.per_timestep_mean, b.per_timestep_mean)
    # Exactly the chunks the hash selects, and all frames still feed the state stats.
    ref = _reference(episodes, fraction=0.5, seed=7)
    assert a.num_chunks == len(ref["chunks"]) and a.num_frames == full_stats.num_frames
    np.testing.assert_allclose(a.per_timestep_mean[:, :ACTION_DIM], ref["chunks"].mean(0)[:, :ACTION_DIM],
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(a.state_mean, full_stats.state_mean)


def test_s3_equals_local_also_with_worker_processes(s3_bucket, episodes, full_stats):
    url = f"{s3_bucket}/shards/v1"
    _write_shards(url, episodes)
    out = compute_norm_stats(url)
    assert out == f"{url}/norm_stats.json"
    assert NormStats.load(out) == full_stats
    # Spawned workers reach the same endpoint through the environment; merged results match to rounding.
    parallel = NormStats.load(compute_norm_stats(url, out=f"{url}/parallel.json", workers=2))
    _close(parallel, full_stats)
    assert parallel.manifest_sha256 == full_stats.manifest_sha256


def test_errors_name_the_problem(tmp_path, episodes):
    short = {ep: v for ep, v in episodes.items() if len(v[0]) < ACTION_HORIZON}
    _write_shards(str(tmp_path / "short"), short)
    with pytest.raises(ValueError, match=r"need episodes of at least 30 frames"):
        compute_norm_stats(str(tmp_path / "short"))
    _write_shards(str(tmp_path / "empty"), {})
    with pytest.raises(ValueError, match=r"empty.*lists no samples"):
        compute_norm_stats(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        compute_norm_stats(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="sample_fraction"):
        compute_norm_stats(str(tmp_path / "short"), sample_fraction=0.0)


def test_worker_errors_reach_the_caller(tmp_path, episodes):
    from data_loaders.manifest import ShardError

    url = str(tmp_path / "corrupt")
    _write_shards(url, episodes)
    shard = tmp_path / "corrupt" / "shard-000003.tar"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")  # same size, wrong sha256
    for workers in (1, 2):
        with pytest.raises(ShardError, match="shard-000003.tar fails its sha256"):
            compute_norm_stats(url, workers=workers)


def test_cli_writes_loadable_stats(local_shards, tmp_path, full_stats):
    from trainer.cli import main

    out = str(tmp_path / "cli.json")
    assert main(["data", "stats", local_shards, "--out", out]) == 0
    assert NormStats.load(out) == full_stats
    assert set(json.loads(open(out).read())["norm_stats"]["actions"]) >= {
        "per_timestamp_mean", "per_timestamp_std", "action_correlation_cholesky"}


def _grasp_episodes(lengths: tuple[int, ...] = (100, 90, 110)) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Task 40 (5 time-based stages). Right gripper: open in stage 0; commanded closed from stage 1 on, where it
    closes on an object (the state settles at -0.6 > -0.98); reopened in stage 3; in stage 4 it presses a button
    fully closed (state -1: closed on nothing, as the demos do there). The left stays open throughout."""
    rng = np.random.default_rng(5)
    out = {}
    for i, n in enumerate(lengths):
        stage = stage_label(np.arange(n), n, 40)
        action = rng.normal(0, 0.3, (n, ACTION_DIM))
        action[:, 14] = 1.0
        action[:, 22] = np.where((stage == 1) | (stage == 2) | (stage == 4), -1.0, 1.0)
        state = action + rng.normal(0, 0.02, (n, ACTION_DIM))
        state[:, 14] = 1.0 - rng.uniform(0, 0.01, n)
        right, target = np.empty(n), np.where(stage == 4, -1.0, np.where(action[:, 22] < 0, -0.6, 1.0))
        right[0] = 1.0
        for t in range(1, n):  # the fingers lag the command and stop on the object
            right[t] = right[t - 1] + 0.5 * (target[t] - right[t - 1])
        state[:, 22] = right
        out[episode_index(40, i)] = (state.astype(np.float32), action.astype(np.float32))
    return out


def test_gripper_table_counts_fully_closed_states_and_the_rule_opens_only_empty_grasps(tmp_path):
    """The stats pass over shards -> norm_stats.json -> the serving rule: in the grasping stages the demos command
    closing in most frames (the old commanded-action table called closing "expected" there, so the rule could not
    fire) but the gripper is never fully closed, so an empty grasp there is opened; the demos' own frames,
    holding objects or pressing fully closed in stage 4, never trigger it."""
    from serving.control.gripper import GripperCorrection

    episodes = _grasp_episodes()
    url = str(tmp_path / "shards")
    _write_shards(url, episodes, with_stages=True)
    table = NormStats.load(compute_norm_stats(url)).gripper_closure
    frames = table.frames[40, :5]
    assert frames.sum() == sum(len(s) for s, _ in episodes.values()) and (frames > 0).all()
    assert table.closed[40, :4, 1].tolist() == [0, 0, 0, 0] and table.closed[40, 4, 1] > 0.5 * frames[4]
    assert table.closed[40, :, 0].sum() == 0 and table.frames[:40].sum() == 0

    corr = GripperCorrection(table)
    for ep, (state, action) in episodes.items():
        stage = stage_label(np.arange(len(state)), len(state), 40)
        assert (action[stage == 1, 22] < 0).all()  # stage 1 commands closing
        for t in range(len(state)):
            assert corr.sides_to_open(40, int(stage[t]), state[t]) == [], (ep, t)  # never on a demo frame
    empty = episodes[episode_index(40, 0)][0][30].copy()  # a stage-1 frame...
    empty[22] = -0.995  # ...whose grasp missed: fully closed
    chunk = np.random.default_rng(0).normal(size=(30, ACTION_DIM)).astype(np.float32)
    fixed, sides = corr.apply(40, 1, empty, chunk)
    want = np.tile(empty, (30, 1))
    want[:, 22] = 1.0
    assert sides == ["right"]
    np.testing.assert_array_equal(fixed, want)
    assert corr.apply(40, 4, empty, chunk)[1] == []  # stage 4 presses fully closed: expected there
    empty[14] = -1.0
    assert corr.sides_to_open(40, 4, empty) == ["left"]  # the left is never fully closed in the demos
