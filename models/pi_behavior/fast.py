"""FAST action tokenizer (DCT + BPE) for the pi-behavior auxiliary head (pi_behavior.md §1.8, §2.6).

Pipeline of one raw delta-action chunk (30, 23) (the output of data_loaders.transforms.to_delta, NOT the
per-timestep z-scored model actions; the z-score would break the temporal smoothness the DCT relies on):

    drop dim 6 (a constant trunk joint) -> clip each dim to [q01, q99] and map it linearly to [-1, 1]
    -> DCT-II (orthonormal) along time -> round(coef * scale) -> flatten frequency-major (all 22 dims of
    frequency 0, then frequency 1, ...) -> shift to symbols >= 0 -> one unicode char per symbol -> BPE ids.

Differences from the reference (physical-intelligence/fast), all deliberate:
- The symbol range is the *reachable* range [-B, B], B = round(scale * max_k sum_n |DCT[k, n]|) (55 for 30
  steps at scale 10), not the range seen while fitting: since inputs are clipped to [-1, 1] no coefficient can
  leave it, so every chunk encodes without clamping. The minimum seen in a fit reaches -B as soon as one chunk
  holds a dim at its q01 for 30 steps (e.g. a closed gripper), so on real data both choices coincide.
- No byte-level pre-tokenizer: each chunk string is one BPE "word"; decoding maps ids to symbols directly.
- Decoding never fails: unknown ids are skipped, missing coefficients are 0, extra ones are ignored.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import sys
from typing import Iterable, Iterator, Sequence

import numpy as np
from scipy.fft import dct, idct
from tokenizers import Tokenizer, models, trainers
from tqdm import tqdm

from data_loaders import storage
from data_loaders.behavior_facts import ACTION_DIM, ACTION_HORIZON
from data_loaders.manifest import Manifest, ShardInfo, iter_tar_samples, load_manifest, read_shard_bytes
from data_loaders.norm_stats import NORM_STATS_NAME, NormStats
from data_loaders.running_stats import BottomKReservoir, hash64
from data_loaders.sample_format import decode_sample
from data_loaders.transforms import to_delta

logger = logging.getLogger(__name__)

FORMAT_NAME = "b1k-train-fast-tokenizer"
FORMAT_VERSION = 1
FAST_DIR_NAME = "fast_tokenizer"  # <shards>/fast_tokenizer/, copied into checkpoints like norm_stats.json
CONFIG_NAME = "fast_config.json"
TOKENIZER_NAME = "tokenizer.json"
DROPPED_DIM = 6  # trunk joint 4: zero variance in the data (pi_behavior §2.6)
KEPT_DIMS: tuple[int, ...] = tuple(d for d in range(ACTION_DIM) if d != DROPPED_DIM)
_KEPT = np.array(KEPT_DIMS)
PAD_ID = 0  # the reference's quirk: pad = BOS = 0, also a real token id (§1.8)
_SALT_CHUNKS = 0xFA57C4  # hash stream of the chunk sample, independent of the norm-stats streams


def coefficient_bound(horizon: int, scale: float) -> int:
    """Largest |round(scale * DCT coefficient)| of any signal in [-1, 1]^horizon (the L1 norm of a DCT row)."""
    basis = dct(np.eye(horizon), axis=0, norm="ortho")  # basis[k, n]: weight of sample n in coefficient k
    return int(np.rint(scale * np.abs(basis).sum(axis=1).max()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FastConfig:
    """Everything besides the BPE merges that encoding and decoding need; stored as fast_config.json."""

    q01: tuple[float, ...]  # per-dim (23,) 1% quantile of raw delta actions (NormStats.action_q01)
    q99: tuple[float, ...]  # per-dim (23,) 99% quantile; a dim with q01 == q99 encodes as 0, decodes as q01
    scale: float = 10.0  # coefficients are quantized in steps of 1 / scale (normalized units)
    vocab_size: int = 1024  # upper bound on BPE ids (fewer if the data offers too few pairs to merge)
    horizon: int = ACTION_HORIZON
    num_chunks: int = 0  # chunks the BPE was fitted on (provenance only)
    tokenizer_sha256: str = ""  # of tokenizer.json, so a config is never paired with another fit's merges

    def __post_init__(self) -> None:
        q01, q99 = np.asarray(self.q01, np.float64), np.asarray(self.q99, np.float64)
        if q01.shape != (ACTION_DIM,) or q99.shape != (ACTION_DIM,):
            raise ValueError(f"q01/q99 must have shape ({ACTION_DIM},), got {q01.shape} and {q99.shape}")
        if not (np.all(np.isfinite(q01)) and np.all(np.isfinite(q99))) or np.any(q99 < q01):
            raise ValueError("q01/q99 must be finite with q01 <= q99 in every dim; check the norm stats")
        if not self.scale > 0 or self.horizon < 1:
            raise ValueError(f"scale must be > 0 and horizon >= 1, got scale={self.scale} horizon={self.horizon}")
        if self.num_symbols > self.vocab_size:
            raise ValueError(f"vocab_size {self.vocab_size} cannot hold the {self.num_symbols} single-coefficient "
                             f"symbols of horizon {self.horizon} at scale {self.scale}; raise it or lower the scale")
        object.__setattr__(self, "q01", tuple(float(v) for v in q01))
        object.__setattr__(self, "q99", tuple(float(v) for v in q99))

    @functools.cached_property
    def max_token(self) -> int:
        """B: every quantized coefficient lies in [-B, B]; its symbol (char code) is coefficient + B."""
        return coefficient_bound(self.horizon, self.scale)

    @property
    def num_symbols(self) -> int:
        return 2 * self.max_token + 1

    @property
    def num_coefficients(self) -> int:
        return self.horizon * len(KEPT_DIMS)


def quantize(delta_chunks: np.ndarray, config: FastConfig) -> np.ndarray:
    """Raw delta chunks (..., horizon, 23) -> quantized DCT coefficients (..., horizon * 22) in [-B, B], int64."""
    x = np.asarray(delta_chunks, np.float64)
    if x.shape[-2:] != (config.horizon, ACTION_DIM):
        raise ValueError(f"delta chunks must end in ({config.horizon}, {ACTION_DIM}), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("delta chunks contain NaN or inf")
    q01, q99 = np.asarray(config.q01), np.asarray(config.q99)
    half = (q99 - q01) / 2
    y = (np.clip(x, q01, q99) - (q01 + q99) / 2) / np.where(half > 0, half, 1.0)  # constant dims -> 0
    coef = dct(y[..., _KEPT], axis=-2, norm="ortho")  # (..., frequency, dim): row-major = frequency-major
    q = np.rint(coef * config.scale).astype(np.int64).reshape(*x.shape[:-2], config.num_coefficients)
    # The bound makes this a no-op up to FFT round-off at an exact .5; it guarantees a valid symbol.
    return np.clip(q, -config.max_token, config.max_token)


def dequantize(coefficients: np.ndarray, config: FastConfig) -> np.ndarray:
    """Quantized coefficients (horizon * 22,) -> raw delta chunk (horizon, 23) float32.

    The dropped dim 6 is (q01 + q99) / 2, i.e. its constant value. Normalized values are clipped to [-1, 1]
    (the encoder's range, so this only removes error), which keeps every output inside [q01, q99].
    """
    coef = np.asarray(coefficients, np.float64).reshape(config.horizon, len(KEPT_DIMS))
    y = np.clip(idct(coef / config.scale, axis=0, norm="ortho"), -1.0, 1.0)
    q01, q99 = np.asarray(config.q01), np.asarray(config.q99)
    out = np.repeat(((q01 + q99) / 2)[None], config.horizon, axis=0)
    out[:, _KEPT] += y * ((q99 - q01) / 2)[_KEPT]
    return out.astype(np.float32)


class FastTokenizer:
    """A fitted FAST tokenizer: raw delta chunks (horizon, 23) <-> BPE ids in [0, config.vocab_size).

    Encoding ignores dim 6; decoding fills it with (q01 + q99) / 2, its constant value in the data.
    """

    def __init__(self, bpe: Tokenizer, config: FastConfig) -> None:
        """Wrap a trained BPE; raises ValueError if it cannot encode every symbol of the config's range."""
        if bpe.get_vocab_size() > config.vocab_size:
            raise ValueError(f"BPE has {bpe.get_vocab_size()} ids, more than vocab_size {config.vocab_size}")
        if any(bpe.token_to_id(chr(s)) is None for s in range(config.num_symbols)):
            raise ValueError(f"BPE vocabulary lacks some of the {config.num_symbols} single symbols; re-fit it")
        self.config, self._bpe = config, bpe
        # id -> the coefficients it stands for, so decoding is a table lookup.
        self._pieces = [_codes(bpe.id_to_token(i)) - config.max_token for i in range(bpe.get_vocab_size())]

    @property
    def num_ids(self) -> int:
        """Ids actually in use (<= config.vocab_size)."""
        return len(self._pieces)

    @classmethod
    def fit(cls, delta_chunks: np.ndarray, *, q01: np.ndarray, q99: np.ndarray, scale: float = 10.0,
            vocab_size: int = 1024) -> FastTokenizer:
        """Fit the BPE on raw delta chunks (N, horizon, 23). Deterministic: equal inputs give equal files."""
        chunks = np.asarray(delta_chunks)
        if chunks.ndim != 3 or chunks.shape[0] < 1 or chunks.shape[2] != ACTION_DIM:
            raise ValueError(f"fit needs delta chunks (N >= 1, horizon, {ACTION_DIM}), got shape {chunks.shape}")
        config = FastConfig(q01=tuple(q01), q99=tuple(q99), scale=scale, vocab_size=vocab_size,
                            horizon=chunks.shape[1], num_chunks=chunks.shape[0])
        bpe = Tokenizer(models.BPE())  # no normalizer or pre-tokenizer: a whole chunk is one BPE word
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, special_tokens=[], show_progress=False,
            # Every symbol of the reachable range, so values absent from the fit data still encode.
            initial_alphabet=[chr(s) for s in range(config.num_symbols)])
        # Quantized in slices: the float64 intermediates of 100k chunks at once would take ~1.5 GB.
        texts = (t for i in range(0, len(chunks), 4096) for t in _texts(quantize(chunks[i:i + 4096], config), config))
        bpe.train_from_iterator(texts, trainer=trainer)
        sha = hashlib.sha256(bpe.to_str().encode()).hexdigest()
        return cls(bpe, dataclasses.replace(config, tokenizer_sha256=sha))

    def encode(self, delta_chunk: np.ndarray) -> list[int]:
        """One raw delta chunk (horizon, 23) -> BPE ids."""
        x = np.asarray(delta_chunk)
        if x.ndim != 2:
            raise ValueError(f"encode takes one chunk ({self.config.horizon}, {ACTION_DIM}), got shape {x.shape}; "
                             f"use encode_batch for several")
        return self.encode_batch(x[None])[0]

    def encode_batch(self, delta_chunks: np.ndarray) -> list[list[int]]:
        """Raw delta chunks (N, horizon, 23) -> N lists of BPE ids."""
        x = np.asarray(delta_chunks)
        if x.ndim != 3:
            raise ValueError(f"encode_batch takes chunks (N, {self.config.horizon}, {ACTION_DIM}), got {x.shape}")
        # Tokenizer.encode, not encode_batch: the batch call uses a thread pool, which the tokenizers library
        # disables (with a warning) in forked DataLoader workers once the parent process has used it.
        return [self._bpe.encode(text).ids for text in _texts(quantize(x, self.config), self.config)]

    def decode(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """BPE ids -> raw delta chunk (horizon, 23) float32, best effort for any integer sequence.

        Ids outside [0, num_ids) are skipped, coefficients past horizon * 22 are ignored and missing ones are 0,
        so a truncated sequence loses only its highest frequencies. Never raises for 0-d or 1-d integer input.
        """
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim > 1:
            raise ValueError(f"decode takes one id sequence, got shape {ids.shape}; use decode_batch")
        ids = ids.reshape(-1)
        parts = [self._pieces[i] for i in ids[(ids >= 0) & (ids < self.num_ids)].tolist()]
        coef = np.zeros(self.config.num_coefficients, np.int64)
        got = np.concatenate(parts)[: len(coef)] if parts else coef[:0]
        coef[: len(got)] = got
        return dequantize(coef, self.config)

    def decode_batch(self, token_lists: Iterable[Sequence[int]] | np.ndarray,
                     mask: np.ndarray | None = None) -> np.ndarray:
        """Several id sequences -> (B, horizon, 23) float32; `mask` (B, L) keeps only the True ids of each row
        (use it for padded model tokens: the pad id 0 is also a real id)."""
        rows = list(token_lists)
        if mask is not None:
            rows = [np.asarray(r)[np.asarray(m, bool)] for r, m in zip(rows, mask, strict=True)]
        if not rows:
            return np.zeros((0, self.config.horizon, ACTION_DIM), np.float32)
        return np.stack([self.decode(r) for r in rows])

    def to_files(self) -> dict[str, bytes]:
        """{file name: bytes} of the saved form; equal tokenizers give equal bytes."""
        cfg = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **dataclasses.asdict(self.config),
               "kept_dims": list(KEPT_DIMS), "dropped_dim": DROPPED_DIM, "max_token": self.config.max_token,
               "min_token": -self.config.max_token}  # informative; symbol = coefficient - min_token
        return {TOKENIZER_NAME: self._bpe.to_str().encode(),
                CONFIG_NAME: (json.dumps(cfg, indent=1, sort_keys=True) + "\n").encode()}

    def save(self, url: str) -> str:
        """Write tokenizer.json and fast_config.json into the directory `url` (local, file:// or s3://)."""
        fs, path = storage.resolve(url)
        for name, data in self.to_files().items():  # config last; its sha256 catches a crash in between
            storage.write_bytes_atomic(fs, storage.join(path, name), data)
        return url

    @classmethod
    def load(cls, url: str) -> FastTokenizer:
        """Read a saved tokenizer directory; FileNotFoundError/ValueError name the directory and the fix."""
        fs, path = storage.resolve(url)
        files = {}
        for name in (TOKENIZER_NAME, CONFIG_NAME):
            where = storage.join(path, name)
            try:
                files[name] = storage.with_retries(lambda w=where: storage.read_bytes(fs, w), what=f"reading {where}")
            except FileNotFoundError as e:
                raise FileNotFoundError(f"no {name} in {url}; run `b1k-train data fast SHARDS`") from e
        current = CONFIG_NAME  # the file the error is about
        try:
            raw = json.loads(files[CONFIG_NAME])
            if raw.get("format") != FORMAT_NAME or raw.get("version") != FORMAT_VERSION:
                raise ValueError(f"unsupported format {raw.get('format')!r} version {raw.get('version')!r}")
            config = FastConfig(**{f.name: raw[f.name] for f in dataclasses.fields(FastConfig)})
            if raw.get("max_token") != config.max_token or list(raw.get("kept_dims", [])) != list(KEPT_DIMS):
                raise ValueError("symbol range or kept dims differ from this b1k-train's")
            current = TOKENIZER_NAME
            if hashlib.sha256(files[TOKENIZER_NAME]).hexdigest() != config.tokenizer_sha256:
                raise ValueError(f"does not match the sha256 in {CONFIG_NAME} (mixed fits?)")
            bpe = Tokenizer.from_str(files[TOKENIZER_NAME].decode())
            return cls(bpe, config)
        except Exception as e:  # bad JSON, missing keys, wrong types, or the bare Exception tokenizers raises
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{storage.join(url, current)}: bad FAST tokenizer file ({first}); re-run "
                             f"`b1k-train data fast SHARDS`") from e


def _texts(coefficients: np.ndarray, config: FastConfig) -> list[str]:
    """One string per row of coefficients, one char per symbol (UTF-32 decoding is much faster than chr())."""
    codes = (coefficients + config.max_token).astype("<u4")
    return [row.tobytes().decode("utf-32-le") for row in codes.reshape(-1, config.num_coefficients)]


def _codes(text: str) -> np.ndarray:
    """Inverse of _texts for one string: its char codes, int64."""
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)


def to_model_tokens(token_lists: Iterable[Sequence[int]], max_len: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Pad/truncate id lists to the model's `fast_tokens` int64 (B, max_len) and `fast_mask` bool (B, max_len).

    Padding is PAD_ID = 0 with mask False; sequences longer than max_len keep their first max_len ids (the
    lowest frequencies), as in the reference.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    rows = [np.asarray(t, np.int64).reshape(-1)[:max_len] for t in token_lists]
    tokens = np.full((len(rows), max_len), PAD_ID, np.int64)
    mask = np.zeros((len(rows), max_len), bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, True
    return tokens, mask


def _shard_bytes(manifest: Manifest, shards: list[ShardInfo], prefetch: int = 2) -> Iterator[tuple[str, bytes]]:
    """(url, verified bytes) per shard, fetching `prefetch` ahead so object-store latency overlaps decoding."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=prefetch) as pool:
        pending = collections.deque(pool.submit(read_shard_bytes, manifest, s) for s in shards[:prefetch])
        for i, shard in enumerate(shards):
            if i + prefetch < len(shards):
                pending.append(pool.submit(read_shard_bytes, manifest, shards[i + prefetch]))
            yield manifest.shard_url(shard.name), pending.popleft().result()


def fit_from_shards(manifest_url: str, norm_stats: NormStats, *, max_chunks: int = 20_000,
                    max_shards: int | None = 1000, seed: int = 42, scale: float = 10.0,
                    vocab_size: int = 1024) -> FastTokenizer:
    """Fit on at most `max_chunks` full chunks (action_mask all True) of the shard set at `manifest_url`.

    Only `max_shards` shards (None: all), chosen by a hash of (seed, shard name), are read: the full 2025 data is
    ~250k shards of 512 samples, and decoding runs at ~3k samples/s, so 1000 shards take minutes, all of them
    hours. Among their full chunks, a hash of (seed, episode, frame) picks a uniform sample of `max_chunks`, so
    the result depends only on the data and the arguments, not on shard order or storage. The BPE trainer needs
    ~85 KB of memory per chunk (1.7 GB at 20k; 20k and 100k chunks compress alike in our measurements).
    q01/q99 come from `norm_stats`.
    """
    if max_chunks < 1 or (max_shards is not None and max_shards < 1):
        raise ValueError(f"max_chunks and max_shards must be >= 1, got {max_chunks} and {max_shards}")
    manifest = load_manifest(manifest_url)
    shards = sorted(manifest.shards, key=lambda s: hashlib.sha256(f"{seed}:{s.name}".encode()).digest())
    shards = shards[:max_shards] if max_shards is not None else shards
    width = ACTION_HORIZON * ACTION_DIM
    reservoir = BottomKReservoir(max_chunks, width)
    bar = tqdm(_shard_bytes(manifest, shards), total=len(shards), unit="shard", desc="FAST chunks", file=sys.stderr,
               mininterval=2.0)
    for where, data in bar:
        eps, frames, rows = [], [], []
        for key, files in iter_tar_samples(data, where=where):
            s = decode_sample(files, image_format=manifest.image_format, where=f"{where}:{key}", decode_images=False)
            if s["action_mask"].all():
                eps.append(s["meta"]["episode"])
                frames.append(s["meta"]["frame"])
                rows.append(to_delta(s["actions"], s["state"]).reshape(width))
        if rows:
            reservoir.add(hash64(seed, _SALT_CHUNKS, np.array(eps), np.array(frames)), np.stack(rows))
    chunks = reservoir.rows().reshape(-1, ACTION_HORIZON, ACTION_DIM)
    if len(chunks) == 0:
        raise ValueError(f"{manifest_url}: no full {ACTION_HORIZON}-step action chunks in the shards read "
                         f"(episodes shorter than {ACTION_HORIZON} frames?)")
    tok = FastTokenizer.fit(chunks, q01=norm_stats.action_q01, q99=norm_stats.action_q99, scale=scale,
                            vocab_size=vocab_size)
    # Rows come in hash order, so the first ones are a uniform sample; their lengths show the compression and how
    # often the model's max_fast_tokens (200) truncates.
    lengths = np.array([len(t) for t in tok.encode_batch(chunks[:1000])])
    logger.info("FAST tokenizer: %d chunks from %d shards, %d ids; %.1f ids/chunk (max %d, %.1f%% over 200) vs "
                "%d coefficients", len(chunks), len(shards), tok.num_ids, lengths.mean(), lengths.max(),
                100 * np.mean(lengths > 200), tok.config.num_coefficients)
    return tok


def fit_fast_tokenizer(shards_url: str, *, out: str | None = None, norm_stats_url: str | None = None,
                       max_chunks: int = 20_000, max_shards: int | None = 1000, seed: int = 42,
                       scale: float = 10.0, vocab_size: int = 1024) -> str:
    """`b1k-train data fast`: fit on the shards at `shards_url` and save; returns the directory written.

    Reads `<shards_url>/norm_stats.json` unless `norm_stats_url` is given (run `b1k-train data stats` first) and
    writes `<shards_url>/fast_tokenizer/` unless `out` is given.
    """
    stats = NormStats.load(norm_stats_url or storage.join(shards_url, NORM_STATS_NAME))
    tok = fit_from_shards(shards_url, stats, max_chunks=max_chunks, max_shards=max_shards, seed=seed, scale=scale,
                          vocab_size=vocab_size)
    return tok.save(out or storage.join(shards_url, FAST_DIR_NAME))
