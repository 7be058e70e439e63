"""FAST tokenizer (models/pi_behavior/fast.py): round-trip error against the quantization bound, compression, id
range, robustness of decoding, determinism, save/load and the model-side padding helper.

Error bound used throughout: coefficients are rounded to steps of 1/scale = 0.1 (normalized units), so each one
is off by at most 0.05. The DCT is orthonormal and applied per dim along time, so by Parseval the time-domain
RMS error of every (chunk, dim) is at most 0.05 normalized units, i.e. 0.05 * (q99 - q01) / 2 raw units, for
inputs inside [q01, q99]; the decoder's clip to [-1, 1] can only shrink it. Uniform rounding errors would give
0.1 / sqrt(12) = 0.029 on average; smooth chunks have many near-zero coefficients and come out lower.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_loaders.behavior_facts import ACTION_DIM, ACTION_HORIZON
from models.pi_behavior.fast import (
    CONFIG_NAME,
    DROPPED_DIM,
    KEPT_DIMS,
    PAD_ID,
    TOKENIZER_NAME,
    FastTokenizer,
    coefficient_bound,
    to_model_tokens,
)

KEPT = list(KEPT_DIMS)
QUANT_BOUND = 0.05  # max rounding error of one coefficient, normalized units (scale 10)
UNIFORM_RMS = 0.1 / np.sqrt(12)  # RMS of a uniform rounding error with step 0.1


def _quantiles(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-dim ranges from 0.02 to 4 raw units with offsets; dim 6 constant like the real trunk joint."""
    rng = np.random.default_rng(seed)
    q01 = rng.uniform(-2.0, 0.5, ACTION_DIM)
    q99 = q01 + np.geomspace(0.02, 4.0, ACTION_DIM)[rng.permutation(ACTION_DIM)]
    q01[DROPPED_DIM] = q99[DROPPED_DIM] = 0.25
    return q01, q99


def _smooth_chunks(num: int, q01: np.ndarray, q99: np.ndarray, seed: int) -> np.ndarray:
    """Raw delta chunks inside [q01, q99]: three low-frequency sinusoids per dim plus 1% noise, float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(ACTION_HORIZON)[None, :, None] / ACTION_HORIZON
    y = np.zeros((num, ACTION_HORIZON, ACTION_DIM))
    for k in range(3):
        amp = rng.uniform(-0.3, 0.3, (num, 1, ACTION_DIM)) / (k + 1)
        freq = np.pi * (k + rng.uniform(0, 1, (num, 1, ACTION_DIM)))
        y += amp * np.cos(freq * t + rng.uniform(0, 2 * np.pi, (num, 1, ACTION_DIM)))
    y = np.clip(y + 0.01 * rng.normal(size=y.shape), -1, 1)
    return ((q01 + q99) / 2 + y * (q99 - q01) / 2).astype(np.float32)


@pytest.fixture(scope="module")
def setup() -> tuple[FastTokenizer, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tokenizer fitted on 1500 chunks, 1500 training chunks, 300 held-out chunks, q01, q99)."""
    q01, q99 = _quantiles()
    train = _smooth_chunks(1500, q01, q99, seed=1)
    return FastTokenizer.fit(train, q01=q01, q99=q99), train, _smooth_chunks(300, q01, q99, seed=2), q01, q99


def test_round_trip_error_is_within_the_quantization_bound(setup):
    tok, _, test, q01, q99 = setup
    rec = tok.decode_batch(tok.encode_batch(test))
    assert rec.shape == test.shape and rec.dtype == np.float32
    half = ((q99 - q01) / 2)[KEPT]
    err = (rec.astype(np.float64) - test)[..., KEPT]
    rms_per_chunk_dim = np.sqrt(np.mean((err / half) ** 2, axis=1))  # (chunks, 22), normalized units
    assert rms_per_chunk_dim.max() <= QUANT_BOUND + 1e-5  # Parseval: a guarantee, not a statistic (+ float32)
    rms_norm = np.sqrt(np.mean((err / half) ** 2))
    assert rms_norm < UNIFORM_RMS
    raw_rms, raw_max = np.sqrt(np.mean(err**2, axis=(0, 1))), np.abs(err).max(axis=(0, 1))
    assert np.all(raw_rms <= QUANT_BOUND * half + 1e-6)
    print(f"\nnormalized RMS {rms_norm:.4f} (max per chunk/dim {rms_per_chunk_dim.max():.4f}, abs max "
          f"{np.abs(err / half).max():.4f}); raw RMS over dims {np.sqrt(np.mean(err**2)):.5f}, raw max abs "
          f"{raw_max.max():.5f} (dim ranges {2 * half.min():.3f}..{2 * half.max():.3f})")


def test_ids_are_in_range_and_compress(setup):
    tok, _, test, _, _ = setup
    ids = tok.encode_batch(test)
    flat = np.concatenate([np.asarray(i) for i in ids])
    assert flat.min() >= 0 and flat.max() < 1024 and tok.num_ids <= 1024
    lengths = np.array([len(i) for i in ids])
    num_coefficients = ACTION_HORIZON * len(KEPT_DIMS)
    assert num_coefficients == 660 and lengths.max() < num_coefficients / 5
    print(f"\n{lengths.mean():.1f} ids/chunk (max {lengths.max()}): {num_coefficients / lengths.mean():.1f}x fewer "
          f"than {num_coefficients} coefficients")


def test_coefficient_bound_is_tight_and_reached():
    # DC coefficient of a dim pinned at +-1 for 30 steps: sqrt(30) * 10 = 54.8 -> 55.
    assert coefficient_bound(ACTION_HORIZON, 10.0) == 55
    q01, q99 = -np.ones(ACTION_DIM), np.ones(ACTION_DIM)
    pinned = np.stack([np.full((ACTION_HORIZON, ACTION_DIM), -5.0), np.full((ACTION_HORIZON, ACTION_DIM), 5.0)])
    tok = FastTokenizer.fit(pinned, q01=q01, q99=q99)  # values far outside [q01, q99]: clipped, then encodable
    rec = tok.decode_batch(tok.encode_batch(pinned))
    np.testing.assert_allclose(rec[..., KEPT], np.clip(pinned, -1, 1)[..., KEPT], atol=0.02)


def test_save_load_gives_identical_encode_and_decode(setup, tmp_path):
    tok, _, test, _, _ = setup
    url = tok.save(str(tmp_path / "fast_tokenizer"))
    loaded = FastTokenizer.load(url)
    assert loaded.to_files() == tok.to_files() and loaded.config == tok.config
    ids = tok.encode_batch(test[:50])
    assert loaded.encode_batch(test[:50]) == ids
    np.testing.assert_array_equal(loaded.decode_batch(ids), tok.decode_batch(ids))
    cfg = json.loads((tmp_path / "fast_tokenizer" / CONFIG_NAME).read_text())
    assert cfg["scale"] == 10.0 and cfg["min_token"] == -55 and cfg["horizon"] == 30 and cfg["num_chunks"] == 1500
    assert cfg["kept_dims"] == KEPT and cfg["vocab_size"] == 1024 and len(cfg["q01"]) == ACTION_DIM


def test_load_rejects_missing_and_mismatched_files(setup, tmp_path):
    tok, *_ = setup
    with pytest.raises(FileNotFoundError, match="b1k-train data fast"):
        FastTokenizer.load(str(tmp_path / "nowhere"))
    url = tok.save(str(tmp_path / "tok"))
    other = FastTokenizer.fit(setup[1][:100], q01=setup[3], q99=setup[4])  # another fit's merges
    (tmp_path / "tok" / TOKENIZER_NAME).write_bytes(other.to_files()[TOKENIZER_NAME])
    with pytest.raises(ValueError, match="does not match the sha256"):
        FastTokenizer.load(url)
    (tmp_path / "tok" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="bad FAST tokenizer"):
        FastTokenizer.load(url)


@pytest.mark.parametrize("tokens", [
    [], [5], np.int64(7), [-1, -100, 10**9], list(range(2000)), np.random.default_rng(0).integers(-50, 5000, 700),
    [1023] * 10, np.array([3, 4, 5], dtype=np.int32),
], ids=["empty", "single", "scalar", "out-of-range", "too-long", "random", "max-id", "int32"])
def test_decode_of_arbitrary_ids_is_a_finite_chunk_inside_the_quantiles(setup, tokens):
    tok, _, _, q01, q99 = setup
    out = tok.decode(tokens)
    assert out.shape == (ACTION_HORIZON, ACTION_DIM) and out.dtype == np.float32 and np.all(np.isfinite(out))
    assert np.all(out >= q01.astype(np.float32) - 1e-6) and np.all(out <= q99.astype(np.float32) + 1e-6)


def test_truncated_ids_keep_the_low_frequencies(setup):
    tok, _, test, _, _ = setup
    ids = tok.encode_batch(test[:100])
    err = {frac: np.sqrt(np.mean((tok.decode_batch([i[: int(len(i) * frac)] for i in ids]) - test[:100]) ** 2))
           for frac in (0.0, 0.25, 0.5, 1.0)}
    assert err[0.0] > err[0.25] > err[0.5] > err[1.0]


def test_fit_is_deterministic_and_order_independent(setup):
    tok, train, _, q01, q99 = setup
    assert FastTokenizer.fit(train, q01=q01, q99=q99).to_files() == tok.to_files()
    shuffled = train[np.random.default_rng(3).permutation(len(train))]
    assert FastTokenizer.fit(shuffled, q01=q01, q99=q99).to_files() == tok.to_files()


def test_dim_6_is_dropped_and_restored_as_its_constant(setup):
    tok, _, test, q01, q99 = setup
    moved = test[:20].copy()
    moved[..., DROPPED_DIM] = np.random.default_rng(4).normal(size=moved.shape[:2])
    assert tok.encode_batch(moved) == tok.encode_batch(test[:20])
    assert np.all(tok.decode_batch(tok.encode_batch(moved))[..., DROPPED_DIM] == np.float32(0.25))


def test_constant_dim_decodes_to_its_value_and_values_outside_the_quantiles_clip(setup):
    _, train, test, q01, q99 = setup
    q01c, q99c = q01.copy(), q99.copy()
    q01c[14] = q99c[14] = -1.0  # e.g. a gripper the stats sample never saw move
    tok = FastTokenizer.fit(train[:300], q01=q01c, q99=q99c)
    wild = test[:10].copy()
    wild[:, :, 14] = 3.0
    wild[:, 5:10, 0] = q99[0] + 100.0  # far above q99: must encode like q99
    clipped = np.clip(wild, q01c, q99c)
    assert tok.encode_batch(wild) == tok.encode_batch(clipped)
    assert np.all(tok.decode_batch(tok.encode_batch(wild))[..., 14] == np.float32(-1.0))


@pytest.mark.parametrize("kwargs, message", [
    ({"delta_chunks": np.zeros((4, 30, 22))}, r"delta chunks \(N >= 1, horizon, 23\)"),
    ({"delta_chunks": np.zeros((0, 30, 23))}, r"N >= 1"),
    ({"q01": np.zeros(22)}, r"q01/q99 must have shape \(23,\)"),
    ({"q99": np.full(23, -2.0)}, "q01 <= q99"),
    ({"q01": np.full(23, np.nan)}, "finite"),
    ({"vocab_size": 100}, "cannot hold the 111 single-coefficient symbols"),
    ({"scale": 0.0}, "scale must be > 0"),
    ({"delta_chunks": np.full((2, 30, 23), np.inf)}, "NaN or inf"),
])
def test_fit_rejects_bad_arguments(kwargs, message):
    args = {"delta_chunks": np.zeros((4, 30, 23)), "q01": -np.ones(23), "q99": np.ones(23), **kwargs}
    with pytest.raises(ValueError, match=message):
        FastTokenizer.fit(args.pop("delta_chunks"), **args)


def test_encode_and_decode_reject_wrong_ranks(setup):
    tok, _, test, _, _ = setup
    with pytest.raises(ValueError, match="use encode_batch"):
        tok.encode(test[:2])
    with pytest.raises(ValueError, match=r"must end in \(30, 23\)"):
        tok.encode(test[0, :20])
    with pytest.raises(ValueError, match="use decode_batch"):
        tok.decode(np.zeros((2, 3), np.int64))


def test_to_model_tokens_pads_with_zero_and_truncates():
    tokens, mask = to_model_tokens([[5, 6, 7], [], list(range(1, 300))], max_len=200)
    assert tokens.shape == mask.shape == (3, 200) and tokens.dtype == np.int64 and mask.dtype == bool
    np.testing.assert_array_equal(tokens[0, :4], [5, 6, 7, PAD_ID])
    assert mask[0].sum() == 3 and mask[1].sum() == 0 and np.all(tokens[1] == PAD_ID)
    np.testing.assert_array_equal(tokens[2], np.arange(1, 201))
    assert mask[2].all()
    with pytest.raises(ValueError, match="max_len"):
        to_model_tokens([[1]], max_len=0)


def test_decode_batch_with_the_model_mask_matches_unpadded_decoding(setup):
    tok, _, test, _, _ = setup
    ids = tok.encode_batch(test[:8])
    tokens, mask = to_model_tokens(ids, max_len=200)
    np.testing.assert_array_equal(tok.decode_batch(tokens, mask), tok.decode_batch(ids))
    assert tok.decode_batch([]).shape == (0, ACTION_HORIZON, ACTION_DIM)
