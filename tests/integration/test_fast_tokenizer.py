"""FAST tokenizer fitted from real shard files (local and S3) with the norm stats of the same shards.

The shard factory's chunks are noisy (the state carries 10% i.i.d. noise per frame), so they compress far less
than real trajectories; the round-trip guarantee (RMS error <= 0.05 normalized units per chunk and dim, see the
unit tests) holds whatever the signal, measured against the inputs clipped to [q01, q99].
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_loaders import storage
from data_loaders.behavior_facts import ACTION_DIM, ACTION_HORIZON
from data_loaders.manifest import MANIFEST_NAME, iter_tar_samples, load_manifest, manifest_to_bytes, read_shard_bytes
from data_loaders.norm_stats import NormStats
from data_loaders.sample_format import decode_sample
from data_loaders.stats import compute_norm_stats
from data_loaders.transforms import to_delta
from models.pi_behavior.fast import FAST_DIR_NAME, KEPT_DIMS, FastTokenizer, fit_fast_tokenizer, fit_from_shards
from tests.shard_factory import build_shards

pytestmark = pytest.mark.integration

LENGTHS = [70, 55, 48]  # 41 + 26 + 19 = 86 full chunks in 12 shards of <= 16 samples
NUM_FULL = sum(n - ACTION_HORIZON + 1 for n in LENGTHS)


def _shards_with_stats(url: str, lengths: list[int] = LENGTHS) -> NormStats:
    build_shards(url, lengths=lengths, samples_per_shard=16)
    return NormStats.load(compute_norm_stats(url))


def _full_delta_chunks(url: str) -> np.ndarray:
    """Every full chunk of the shard set as raw deltas (N, 30, 23), read straight from the tars."""
    manifest = load_manifest(url)
    out = []
    for shard in manifest.shards:
        for key, files in iter_tar_samples(read_shard_bytes(manifest, shard), where=shard.name):
            s = decode_sample(files, image_format=manifest.image_format, where=key, decode_images=False)
            if s["action_mask"].all():
                out.append(to_delta(s["actions"], s["state"]))
    return np.stack(out)


def test_fit_from_local_shards_round_trips_every_chunk(tmp_path):
    url = str(tmp_path / "shards")
    stats = _shards_with_stats(url)
    out = fit_fast_tokenizer(url)
    assert out == storage.join(url, FAST_DIR_NAME)
    tok = FastTokenizer.load(out)
    assert tok.config.num_chunks == NUM_FULL
    np.testing.assert_array_equal(tok.config.q01, stats.action_q01)
    np.testing.assert_array_equal(tok.config.q99, stats.action_q99)

    chunks = _full_delta_chunks(url)
    assert chunks.shape == (NUM_FULL, ACTION_HORIZON, ACTION_DIM)
    ids = tok.encode_batch(chunks)
    assert 0 <= min(min(i) for i in ids) and max(max(i) for i in ids) < 1024
    rec = tok.decode_batch(ids)
    half = ((stats.action_q99 - stats.action_q01) / 2)[list(KEPT_DIMS)]
    target = np.clip(chunks, stats.action_q01, stats.action_q99)  # the encoder's view of the data
    err = (rec.astype(np.float64) - target)[..., list(KEPT_DIMS)] / half
    assert np.sqrt(np.mean(err**2, axis=1)).max() <= 0.05 + 1e-5
    lengths = np.array([len(i) for i in ids])
    print(f"\nshard chunks: normalized RMS {np.sqrt(np.mean(err**2)):.4f}, {lengths.mean():.0f} ids/chunk "
          f"(max {lengths.max()}) of 660 coefficients")


def test_chunk_sample_is_bounded_deterministic_and_independent_of_shard_order(tmp_path):
    url = str(tmp_path / "shards")
    stats = _shards_with_stats(url)
    first = fit_from_shards(url, stats, max_chunks=30, seed=7)
    assert first.config.num_chunks == 30
    assert fit_from_shards(url, stats, max_chunks=30, seed=7).to_files() == first.to_files()
    assert fit_from_shards(url, stats, max_chunks=30, seed=8).to_files() != first.to_files()

    manifest_path = tmp_path / "shards" / MANIFEST_NAME
    raw = json.loads(manifest_path.read_text())
    raw["shards"] = raw["shards"][::-1]
    manifest_path.write_bytes(manifest_to_bytes(raw))
    assert fit_from_shards(url, stats, max_chunks=30, seed=7).to_files() == first.to_files()

    two = fit_from_shards(url, stats, max_shards=2)
    assert 0 < two.config.num_chunks <= 2 * 16


def test_errors_name_the_fix(tmp_path):
    url = str(tmp_path / "shards")
    stats = _shards_with_stats(url)
    short = str(tmp_path / "short")
    build_shards(short, lengths=[20, 12], samples_per_shard=16)
    with pytest.raises(ValueError, match="no full 30-step action chunks"):
        fit_from_shards(short, stats)
    with pytest.raises(FileNotFoundError, match="b1k-train data stats"):
        fit_fast_tokenizer(short)  # no norm_stats.json there
    with pytest.raises(ValueError, match="max_chunks"):
        fit_from_shards(url, stats, max_chunks=0)


def test_fit_on_s3_matches_the_local_fit(tmp_path, s3_bucket):
    local, remote = str(tmp_path / "shards"), f"{s3_bucket}/shards"
    _shards_with_stats(local)
    _shards_with_stats(remote)  # same factory seed: byte-identical shards
    out = fit_fast_tokenizer(remote, out=f"{s3_bucket}/tok")
    assert out == f"{s3_bucket}/tok"
    assert FastTokenizer.load(out).to_files() == FastTokenizer.load(fit_fast_tokenizer(local)).to_files()
