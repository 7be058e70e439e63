"""NormStats (JSON layout, validation, regularised Cholesky) and the streaming accumulators of data_loaders.stats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_loaders.behavior_facts import ACTION_DIM, ACTION_HORIZON, MODEL_DIM, STATE_DIM
from data_loaders.norm_stats import CONSTANT_STD, FLAT_DIM, NormStats
from data_loaders.running_stats import BottomKReservoir, Moments, hash64, unit_interval
from data_loaders.stats import StatsAccumulator, correlation_cholesky


def _random_stats(seed: int = 0) -> NormStats:
    rng = np.random.default_rng(seed)
    # Cholesky factor of an AR(1) correlation rho^|i-j|: bidiagonal, so the JSON stays quick to write in tests.
    rho = rng.uniform(0.3, 0.9)
    chol = np.diag(np.r_[1.0, np.full(FLAT_DIM - 1, np.sqrt(1 - rho**2))]) + np.diag(np.full(FLAT_DIM - 1, rho), -1)
    vec = lambda n: rng.normal(size=n)  # noqa: E731
    return NormStats(
        state_mean=vec(STATE_DIM), state_std=rng.uniform(0.1, 2, STATE_DIM), state_q01=vec(STATE_DIM),
        state_q99=vec(STATE_DIM), state_min=vec(STATE_DIM), state_max=vec(STATE_DIM), action_mean=vec(ACTION_DIM),
        action_std=rng.uniform(0.1, 2, ACTION_DIM), action_q01=vec(ACTION_DIM), action_q99=vec(ACTION_DIM),
        per_timestep_mean=rng.normal(size=(ACTION_HORIZON, MODEL_DIM)),
        per_timestep_std=rng.uniform(0.1, 2, (ACTION_HORIZON, MODEL_DIM)),
        action_correlation_cholesky=chol, num_frames=1000, num_chunks=400,
        num_full_chunks=800, sample_fraction=0.5, seed=42, manifest_sha256="ab" * 32, correlation_jitter=1e-6)


@pytest.fixture(scope="module")
def stats() -> NormStats:
    return _random_stats()


def test_json_round_trip_is_exact(stats, tmp_path):
    assert NormStats.from_json(stats.to_json()) == stats
    url = str(tmp_path / "sub" / "norm_stats.json")
    assert stats.save(url) == url
    loaded = NormStats.load(url)
    assert loaded == stats and loaded != _random_stats(1)
    doc = json.loads(open(url).read())
    assert doc["meta"]["format"] == "b1k-train-norm-stats" and doc["meta"]["num_chunks"] == 400
    assert np.array(doc["norm_stats"]["actions"]["per_timestamp_std"]).shape == (30, 32)
    assert not loaded.state_mean.flags.writeable  # frozen all the way down


def _corrupt(stats: NormStats, tmp_path, edit) -> str:
    doc = json.loads(stats.to_json())
    edit(doc)
    path = tmp_path / "bad_norm_stats.json"
    path.write_text(json.dumps(doc))  # json writes NaN literally, which json.loads reads back
    return str(path)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["norm_stats"]["actions"]["per_timestamp_mean"].pop(), r"per_timestep_mean has shape \(29, 32\)"),
    (lambda d: d["norm_stats"]["state"]["std"].__setitem__(3, float("nan")), "state_std has non-finite"),
    (lambda d: d["norm_stats"]["actions"].__setitem__("std", [-1.0] * 23), "action_std must be >= 0"),
    (lambda d: d["norm_stats"]["state"].pop("q99"), "missing field 'q99'"),
    (lambda d: d["meta"].__setitem__("version", 99), "unsupported norm stats format"),
    (lambda d: d["norm_stats"]["actions"]["action_correlation_cholesky"][0].__setitem__(5, 1.0),
     "not lower triangular"),
])
def test_load_rejects_bad_files_naming_them(stats, tmp_path, edit, message):
    url = _corrupt(stats, tmp_path, edit)
    with pytest.raises(ValueError, match=message) as info:
        NormStats.load(url)
    assert str(info.value).startswith(url)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="b1k-train data stats"):
        NormStats.load(str(tmp_path / "nope.json"))


def test_regularized_correlation_cholesky(stats):
    chol = stats.action_correlation_cholesky
    reg = stats.regularized_correlation_cholesky(0.5)
    np.testing.assert_allclose(reg @ reg.T, 0.5 * chol @ chol.T + 0.5 * np.eye(FLAT_DIM), atol=1e-10)
    assert np.all(np.triu(reg, 1) == 0)
    np.testing.assert_allclose(stats.regularized_correlation_cholesky(0.0), np.eye(FLAT_DIM), atol=1e-12)
    with pytest.raises(ValueError, match="beta"):
        stats.regularized_correlation_cholesky(1.5)


def test_moments_merge_is_accurate_with_large_offsets():
    rng = np.random.default_rng(0)
    x = 1e6 + rng.normal(size=(1000, 5)) * 1e-3  # sum-of-squares would lose every digit here
    m_full, m_diag = Moments(5, full=True), Moments(5, full=False)
    for part in np.array_split(x, [1, 2, 100, 101, 600]):
        m_full.update(part)
        m_diag.update(part)
    assert m_full.count == m_diag.count == 1000
    np.testing.assert_allclose(m_full.mean, x.mean(0), rtol=1e-15)
    np.testing.assert_allclose(m_diag.variance(), x.var(0), rtol=1e-8)
    # Entries ~1e-6 from data at 1e6: only ~1e-7 relative precision survives the float64 inputs themselves.
    np.testing.assert_allclose(m_full.m2 / 1000, np.cov(x, rowvar=False, ddof=0), rtol=1e-6, atol=1e-12)


def test_bottom_k_reservoir_is_capped_and_order_independent():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, 5000, dtype=np.uint64)
    rows = rng.normal(size=(5000, 3))
    results = []
    for perm in (np.arange(5000), rng.permutation(5000)):
        res = BottomKReservoir(100, 3)
        for idx in np.array_split(perm, 97):
            res.add(keys[idx], rows[idx])
            assert res.num_stored <= 200
        results.append(res.rows())
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], rows[np.argsort(keys)[:100]].astype(np.float32))
    # Merging two reservoirs of disjoint rows equals offering all rows to one.
    a, b = BottomKReservoir(100, 3), BottomKReservoir(100, 3)
    a.add(keys[:1234], rows[:1234])
    b.add(keys[1234:], rows[1234:])
    a.merge(b)
    np.testing.assert_array_equal(a.rows(), results[0])


def test_hash_selection_is_deterministic_and_uniform():
    eps, frames = np.repeat(np.arange(50), 200), np.tile(np.arange(200), 50)
    u = unit_interval(hash64(42, 1, eps, frames))
    np.testing.assert_array_equal(u, unit_interval(hash64(42, 1, eps, frames)))
    assert abs((u < 0.5).mean() - 0.5) < 0.02 and 0 <= u.min() and u.max() < 1
    assert (unit_interval(hash64(43, 1, eps, frames)) != u).mean() > 0.99


def test_accumulator_memory_does_not_grow_with_samples():
    rng = np.random.default_rng(0)
    acc = StatsAccumulator(sample_fraction=1.0, seed=0, max_quantile_samples=64, batch_size=128)
    mask = np.ones(ACTION_HORIZON, dtype=bool)
    for i in range(3000):
        acc.add(episode=i // 300, frame=i % 300, state=rng.normal(size=STATE_DIM).astype(np.float32),
                actions=rng.normal(size=(ACTION_HORIZON, ACTION_DIM)).astype(np.float32), action_mask=mask)
        assert acc.state_reservoir.num_stored <= 128 and acc.action_reservoir.num_stored <= 128
        assert len(acc._frames) < 128 and len(acc._chunks) < 128
    assert acc.chunks.m2.shape == (FLAT_DIM, FLAT_DIM) and acc.state.m2.shape == (STATE_DIM,)
    stats = acc.finalize(manifest_sha256="0" * 64)
    assert (stats.num_frames, stats.num_chunks) == (3000, 3000)
    assert acc.state_reservoir.rows().shape == (64, STATE_DIM) and acc.action_reservoir.rows().shape == (64, 23)


def _feed(acc: StatsAccumulator, samples: list) -> StatsAccumulator:
    for ep, f, state, actions, mask in samples:
        acc.add(episode=ep, frame=f, state=state, actions=actions, action_mask=mask)
    return acc


def test_accumulators_of_disjoint_parts_merge_to_the_whole():
    rng = np.random.default_rng(1)
    samples = [(i // 100, i % 100, rng.normal(size=STATE_DIM).astype(np.float32),
                rng.normal(size=(ACTION_HORIZON, ACTION_DIM)).astype(np.float32) + 10.0,
                np.arange(ACTION_HORIZON) < (100 - i % 100)) for i in range(700)]
    settings = {"sample_fraction": 0.6, "seed": 3, "max_quantile_samples": 500}
    whole = _feed(StatsAccumulator(**settings), samples).finalize(manifest_sha256="x")
    a = _feed(StatsAccumulator(**settings, batch_size=64), samples[::2])
    a.merge(_feed(StatsAccumulator(**settings), samples[1::2]))
    merged = a.finalize(manifest_sha256="x")
    for name in ("state_q01", "state_q99", "state_min", "state_max", "action_q01", "action_q99"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name), err_msg=name)
    for name in ("state_mean", "state_std", "per_timestep_mean", "per_timestep_std", "action_correlation_cholesky"):
        # atol: fewer chunks than coordinates make the factor's trailing entries rounding-sensitive
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), rtol=1e-10, atol=1e-9)
    assert (merged.num_chunks, merged.num_full_chunks) == (whole.num_chunks, whole.num_full_chunks) != (0, 0)
    with pytest.raises(ValueError, match="different sample_fraction"):
        a.merge(StatsAccumulator(sample_fraction=1.0, seed=3, max_quantile_samples=5))


def test_accumulator_counts_only_full_chunks():
    acc = StatsAccumulator(sample_fraction=1.0, seed=0, max_quantile_samples=10)
    partial = np.arange(ACTION_HORIZON) < 10
    for f in range(5):
        acc.add(episode=0, frame=f, state=np.zeros(STATE_DIM, np.float32),
                actions=np.zeros((ACTION_HORIZON, ACTION_DIM), np.float32), action_mask=partial)
    with pytest.raises(ValueError, match="need episodes of at least 30 frames"):
        acc.finalize(manifest_sha256="")
    with pytest.raises(ValueError, match="sample_fraction"):
        StatsAccumulator(sample_fraction=1.5, seed=0, max_quantile_samples=10)


def test_correlation_cholesky_constant_coordinates_are_identity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    x[:, 2] = 3.0  # constant coordinate
    cov, std = np.cov(x, rowvar=False, ddof=0), x.std(0)
    chol, jitter = correlation_cholesky(cov, std)
    assert jitter == 1e-6
    live = [0, 1, 3, 4, 5]
    expected = np.eye(6)
    expected[np.ix_(live, live)] = np.corrcoef(x[:, live], rowvar=False)
    np.testing.assert_allclose(chol @ chol.T, expected + 1e-6 * np.eye(6), atol=1e-12)
    np.testing.assert_array_equal(chol[2], np.sqrt(1 + 1e-6) * np.eye(6)[2])
    assert CONSTANT_STD == 1e-6


def test_correlation_cholesky_raises_jitter_for_a_singular_matrix():
    x = np.random.default_rng(0).normal(size=(500, 1))
    x = np.hstack([x, -x])  # perfectly anti-correlated: C is singular, and rounding can make it indefinite
    chol, jitter = correlation_cholesky(np.cov(x, rowvar=False, ddof=0), x.std(0))
    assert jitter >= 1e-6 and np.all(np.isfinite(chol))


def test_constant_action_dims_denormalise_to_exactly_the_mean():
    """The stats pass stores a constant coordinate's ~0 std; the Normalizer (training and serving) maps it to 0
    and back to exactly the mean, whatever the model outputs there (the reference: (std + 1e-6) * x + mean)."""
    from data_loaders.behavior_facts import DELTA_ACTION_MASK
    from data_loaders.transforms import Normalizer

    trunk6, gripper, delta_dim = 6, 14, 8  # absolute constant dims, and a delta dim that is a constant offset
    assert not DELTA_ACTION_MASK[trunk6] and not DELTA_ACTION_MASK[gripper] and DELTA_ACTION_MASK[delta_dim]
    rng = np.random.default_rng(0)
    acc = StatsAccumulator(sample_fraction=1.0, seed=0, max_quantile_samples=100)
    for f in range(80):
        state = rng.normal(size=STATE_DIM).astype(np.float32)
        actions = rng.normal(size=(ACTION_HORIZON, ACTION_DIM)).astype(np.float32)
        actions[:, trunk6], actions[:, gripper] = 0.37, -1.0
        actions[:, delta_dim] = state[delta_dim] + np.float32(0.125)
        acc.add(episode=0, frame=f, state=state, actions=actions, action_mask=np.ones(ACTION_HORIZON, bool))
    stats = acc.finalize(manifest_sha256="x")
    stats = NormStats.from_json(stats.to_json())  # what a checkpoint carries
    for d in (trunk6, gripper, delta_dim):
        assert np.all(stats.per_timestep_std[:, d] < CONSTANT_STD), d
    assert np.all(stats.per_timestep_std[:, :ACTION_DIM][:, [5, 7, 20]] > 0.5)  # live dims untouched

    norm = Normalizer.from_norm_stats(stats)
    state = rng.normal(size=(4, STATE_DIM)).astype(np.float32)
    model_out = rng.normal(size=(4, ACTION_HORIZON, MODEL_DIM)).astype(np.float32) * 3.0  # any residual
    raw = norm.unnormalize_actions(model_out, state)
    mean = norm.action_mean  # float32 (30, 32)
    assert np.array_equal(raw[..., trunk6], np.broadcast_to(mean[:, trunk6], (4, ACTION_HORIZON)))
    assert np.array_equal(raw[..., gripper], np.broadcast_to(mean[:, gripper], (4, ACTION_HORIZON)))
    assert np.all(raw[..., trunk6] == np.float32(0.37)) and np.all(raw[..., gripper] == -1.0)
    assert np.array_equal(raw[..., delta_dim], state[:, None, delta_dim] + mean[None, :, delta_dim])
    # Live dims keep the usual affine map; normalising a constant coordinate gives exactly 0, even off the mean.
    assert not DELTA_ACTION_MASK[0]
    np.testing.assert_allclose(raw[..., 0], model_out[..., 0] * (norm.action_std[:, 0] + 1e-6) + mean[:, 0],
                               rtol=1e-6)
    seen = raw.copy()
    seen[..., trunk6] += 0.01  # a value the stats never contained
    z = norm.actions(seen, state)
    assert np.all(z[..., [trunk6, gripper, delta_dim]] == 0.0)
