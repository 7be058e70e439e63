"""`b1k-train data stats`: normalization statistics of a shard set in one streaming pass.

Follows the 1st-place recipe (pi_behavior §2.2-2.4) with bounded memory, whatever the dataset size:
- state: mean/std/min/max over every frame, q01/q99 from a bounded sample of frames;
- delta actions: every sample whose 30-step chunk lies inside its episode (the reference's sliding windows
  i = 0..len-30) is a candidate chunk; a deterministic hash of (seed, episode, frame) keeps it with probability
  `sample_fraction`, so the result does not depend on shard order. Its delta chunk (a[t+k] - s[t] on
  DELTA_ACTION_MASK dims), zero-padded to (30, 32) and flattened to 960, feeds one running mean and scatter
  matrix from which the per-timestep mean/std, the single-step action mean/std and the correlation all follow;
- quantiles: bottom-k reservoirs (running_stats.py) keep a hash-chosen uniform sample of at most
  k = `max_quantile_samples` rows that depends only on which rows exist, not on their order (exact percentiles
  while the data has at most k rows).
Every accumulator merges exactly, so `workers` processes can each scan a subset of the shards.

Differences from the reference, all deliberate: the correlation uses every selected chunk (the reference caps it
at 2M), state q01/q99 are true percentiles (the reference stores min/max there; both are kept), and constant
coordinates store std 1 like padded dims (see norm_stats.py). Images are never decoded.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import itertools
import logging
import multiprocessing
import pickle
import queue as queue_module
import re
import sys
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from data_loaders import storage
from data_loaders.behavior_facts import (
    ACTION_DIM,
    ACTION_HORIZON,
    DELTA_ACTION_MASK,
    MODEL_DIM,
    NUM_SKILLS,
    STATE_DIM,
)
from data_loaders.gripper_stats import GripperClosureCounter
from data_loaders.manifest import (
    Manifest,
    ShardInfo,
    iter_tar_samples,
    load_manifest,
    manifest_to_bytes,
    read_shard_bytes,
)
from data_loaders.norm_stats import CONSTANT_STD, FLAT_DIM, NORM_STATS_NAME, NormStats, std_or_one
from data_loaders.running_stats import BottomKReservoir, Moments, hash64, unit_interval
from data_loaders.sample_format import decode_sample

logger = logging.getLogger(__name__)

# Independent hash streams, so chunk selection and the two reservoirs are uncorrelated.
_SALT_SELECT, _SALT_STATE_RES, _SALT_ACTION_RES = 0x5E1EC7, 0x57A7E, 0xAC7104
_KEY_RE = re.compile(r"^e(\d+)_f(\d+)$")  # sample_format.sample_key
_MAX_JITTER = 1.0


def _quantiles(res: BottomKReservoir) -> tuple[np.ndarray, np.ndarray]:
    q = np.quantile(res.rows(), [0.01, 0.99], axis=0)  # linear interpolation, as np.percentile in the reference
    return q[0], q[1]


class StatsAccumulator:
    """Accumulates every statistic of NormStats from samples offered one at a time in any order.

    Memory is bounded by the batch buffers, two reservoirs of <= 2 * max_quantile_samples float32 rows (~184 MB
    each at the default 1M) and one 960x960 float64 scatter matrix (7.4 MB); none of it grows with the data.
    """

    def __init__(self, *, sample_fraction: float, seed: int, max_quantile_samples: int,
                 batch_size: int = 2048) -> None:
        if not 0.0 < sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
        self.sample_fraction, self.seed, self.batch_size = sample_fraction, seed, batch_size
        self.state = Moments(STATE_DIM, full=False)
        self.state_min = np.full(STATE_DIM, np.inf)
        self.state_max = np.full(STATE_DIM, -np.inf)
        self.chunks = Moments(FLAT_DIM, full=True)
        self.state_reservoir = BottomKReservoir(max_quantile_samples, STATE_DIM)
        self.action_reservoir = BottomKReservoir(max_quantile_samples, ACTION_DIM)
        self.num_full_chunks = 0
        self.grippers = GripperClosureCounter()
        self.skill_counts = np.zeros(NUM_SKILLS, np.int64)  # frames per annotated skill class (X-VLA's CE weights)
        self._frames: list[tuple[int, int, np.ndarray]] = []  # (episode, frame, state)
        self._chunks: list[tuple[int, int, np.ndarray, np.ndarray]] = []  # (episode, frame, state, actions)

    def add(self, *, episode: int, frame: int, state: np.ndarray, actions: np.ndarray,
            action_mask: np.ndarray, task: int | None = None, stage: int | None = None,
            skill: int = -1) -> None:
        """Offer one sample: state (23,), actions (30, 23) absolute, action_mask (30,) bool; with its task and
        stage label, the sample also counts towards the gripper-closure table (its gripper *state*: fully closed or
        not)."""
        self._frames.append((episode, frame, state))
        if task is not None and stage is not None:
            self.grippers.add(task, stage, state)
        if 0 <= skill < NUM_SKILLS:
            self.skill_counts[skill] += 1
        if bool(np.all(action_mask)):
            self.num_full_chunks += 1
            self._chunks.append((episode, frame, state, actions))
        if len(self._frames) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Fold the buffered samples into the running statistics."""
        if self._frames:
            eps, frames = (np.array(c, dtype=np.int64) for c in zip(*[(e, f) for e, f, _ in self._frames]))
            states = np.stack([s for _, _, s in self._frames]).astype(np.float64)
            self._frames = []
            self.state.update(states)
            np.minimum(self.state_min, states.min(axis=0), out=self.state_min)
            np.maximum(self.state_max, states.max(axis=0), out=self.state_max)
            self.state_reservoir.add(hash64(self.seed, _SALT_STATE_RES, eps, frames), states)
        if self._chunks:
            eps, frames = (np.array(c, dtype=np.int64) for c in zip(*[(e, f) for e, f, _, _ in self._chunks]))
            keep = unit_interval(hash64(self.seed, _SALT_SELECT, eps, frames)) < self.sample_fraction
            chosen = [c for c, k in zip(self._chunks, keep) if k]
            self._chunks = []
            if chosen:
                self._add_chunks(eps[keep], frames[keep], np.stack([c[2] for c in chosen]),
                                 np.stack([c[3] for c in chosen]))

    def merge(self, other: StatsAccumulator) -> None:
        """Fold in an accumulator of disjoint samples built with the same settings."""
        if (other.sample_fraction, other.seed) != (self.sample_fraction, self.seed):
            raise ValueError("cannot merge stats accumulators with different sample_fraction/seed")
        self.flush()
        other.flush()
        self.state.merge(other.state)
        np.minimum(self.state_min, other.state_min, out=self.state_min)
        np.maximum(self.state_max, other.state_max, out=self.state_max)
        self.chunks.merge(other.chunks)
        self.state_reservoir.merge(other.state_reservoir)
        self.action_reservoir.merge(other.action_reservoir)
        self.num_full_chunks += other.num_full_chunks
        self.grippers.merge(other.grippers)
        self.skill_counts += other.skill_counts

    def _add_chunks(self, eps: np.ndarray, frames: np.ndarray, states: np.ndarray, actions: np.ndarray) -> None:
        # Deltas in float64: the same state s[t] is subtracted from all 30 future actions (pi_behavior §2.2).
        delta = actions.astype(np.float64)
        delta[:, :, DELTA_ACTION_MASK] -= states.astype(np.float64)[:, None, DELTA_ACTION_MASK]
        padded = np.zeros((len(delta), ACTION_HORIZON, MODEL_DIM))
        padded[:, :, :ACTION_DIM] = delta
        self.chunks.update(padded.reshape(len(delta), FLAT_DIM))
        steps = np.tile(np.arange(ACTION_HORIZON), len(delta))
        keys = hash64(self.seed, _SALT_ACTION_RES, np.repeat(eps, ACTION_HORIZON), np.repeat(frames, ACTION_HORIZON),
                      steps)
        self.action_reservoir.add(keys, delta.reshape(-1, ACTION_DIM))

    def finalize(self, *, manifest_sha256: str) -> NormStats:
        """Compute NormStats; ValueError if there are no frames or no (selected) full chunks."""
        self.flush()
        if self.state.count == 0:
            raise ValueError("no samples were read; the shard set is empty")
        if self.num_full_chunks == 0:
            raise ValueError(f"none of the {self.state.count} samples has a full {ACTION_HORIZON}-step action chunk: "
                             f"need episodes of at least {ACTION_HORIZON} frames")
        if self.chunks.count == 0:
            raise ValueError(f"sample_fraction={self.sample_fraction} selected none of the {self.num_full_chunks} "
                             f"full action chunks; use a larger --sample-fraction")
        state_q01, state_q99 = _quantiles(self.state_reservoir)
        action_q01, action_q99 = _quantiles(self.action_reservoir)

        flat_mean = self.chunks.mean.copy()
        flat_std = np.sqrt(self.chunks.variance())
        pt_mean = flat_mean.reshape(ACTION_HORIZON, MODEL_DIM)
        pt_var = self.chunks.variance().reshape(ACTION_HORIZON, MODEL_DIM)
        # Single-step rows pool the 30 steps (equal counts): law of total variance over t.
        step_mean = pt_mean[:, :ACTION_DIM].mean(axis=0)
        step_var = (pt_var[:, :ACTION_DIM] + (pt_mean[:, :ACTION_DIM] - step_mean) ** 2).mean(axis=0)
        pt_std = std_or_one(np.sqrt(pt_var))
        pt_mean[:, ACTION_DIM:], pt_std[:, ACTION_DIM:] = 0.0, 1.0  # openpi padding convention

        chol, jitter = correlation_cholesky(self.chunks.m2 / self.chunks.count, flat_std)
        return NormStats(
            state_mean=self.state.mean, state_std=std_or_one(np.sqrt(self.state.variance())),
            state_q01=state_q01, state_q99=state_q99, state_min=self.state_min, state_max=self.state_max,
            action_mean=step_mean, action_std=std_or_one(np.sqrt(step_var)),
            action_q01=action_q01, action_q99=action_q99,
            per_timestep_mean=pt_mean, per_timestep_std=pt_std, action_correlation_cholesky=chol,
            num_frames=self.state.count, num_chunks=self.chunks.count, num_full_chunks=self.num_full_chunks,
            sample_fraction=self.sample_fraction, seed=self.seed, manifest_sha256=manifest_sha256,
            correlation_jitter=jitter,
            gripper_closure=self.grippers.result() if self.grippers.frames.any() else None,
            skill_counts=self.skill_counts.copy() if self.grippers.frames.any() else None,
        )


def correlation_cholesky(cov: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, float]:
    """Cholesky factor of the correlation matrix of `cov` and the jitter eps added to its diagonal.

    Coordinates with std < CONSTANT_STD are constant: their rows/cols are zero with a unit diagonal, so correlated
    noise is i.i.d. N(0, 1) there (pi_behavior §1.9). eps starts at 1e-6 and grows x10 until C + eps*I is
    positive definite (a correlation of fewer chunks than coordinates is only semi-definite).
    """
    live = std >= CONSTANT_STD
    corr = np.zeros_like(cov)
    corr[np.ix_(live, live)] = cov[np.ix_(live, live)] / np.outer(std[live], std[live])
    corr = np.clip((corr + corr.T) / 2.0, -1.0, 1.0)
    np.fill_diagonal(corr, 1.0)
    jitter = 1e-6
    while True:
        try:
            return np.linalg.cholesky(corr + jitter * np.eye(len(corr))), jitter
        except np.linalg.LinAlgError:
            if jitter >= _MAX_JITTER:  # cannot happen for a valid correlation matrix; guard against NaN input
                raise ValueError("action correlation matrix is not positive definite even with jitter 1.0") from None
            jitter *= 10.0


def _iter_shards(manifest: Manifest, shards: list[ShardInfo], *, prefetch: int = 2) -> Iterator[tuple[str, bytes]]:
    """(url, bytes) of `shards` in order, each verified against its sha256, fetched up to `prefetch` ahead so
    that object-store latency overlaps decoding; at most prefetch + 1 shards are in memory."""
    todo = iter(shards)
    with concurrent.futures.ThreadPoolExecutor(max_workers=prefetch) as pool:
        pending: collections.deque = collections.deque()
        for shard in itertools.islice(todo, prefetch):
            pending.append((shard, pool.submit(read_shard_bytes, manifest, shard)))
        while pending:
            shard, fut = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(read_shard_bytes, manifest, nxt)))
            yield manifest.shard_url(shard.name), fut.result()


def _scan(manifest: Manifest, shards: list[ShardInfo], acc: StatsAccumulator,
          on_shard: Callable[[int], None]) -> None:
    """Feed every sample of `shards` to `acc` (images stay encoded); `on_shard(num_samples)` after each shard."""
    for where, data in _iter_shards(manifest, shards):
        n = 0
        for key, files in iter_tar_samples(data, where=where):
            m = _KEY_RE.match(key)
            if m is None:
                raise ValueError(f"{where}: sample key {key!r} is not e<episode>_f<frame>; "
                                 f"re-run `b1k-train data shard`")
            s = decode_sample(files, image_format=manifest.image_format, where=f"{where}:{key}", decode_images=False)
            meta = s.get("meta") or {}
            # Shards without task/stage labels (hand-made test shards, old converters) skip the control tables.
            task, stage = meta.get("task"), meta.get("stage")
            acc.add(episode=int(m.group(1)), frame=int(m.group(2)), state=s["state"], actions=s["actions"],
                    action_mask=s["action_mask"], task=None if task is None else int(task),
                    stage=None if stage is None else int(stage),
                    skill=int(meta.get("skill_index", -1)) if meta.get("skill_valid") else -1)
            n += 1
        on_shard(n)


def _worker_main(manifest: Manifest, shards: list[ShardInfo], settings: dict, index: int, queue) -> None:
    """Worker process: scan `shards`, report progress, then send back the accumulator (or the error)."""
    try:
        acc = StatsAccumulator(**settings)
        _scan(manifest, shards, acc, lambda n: queue.put(("progress", index, n)))
        acc.flush()
        queue.put(("done", index, acc))
    except BaseException as e:  # noqa: BLE001 - relayed to the parent, which re-raises it
        try:
            pickle.dumps(e)
        except Exception:  # noqa: BLE001 - an unpicklable error would be lost silently by the queue's feeder
            e = RuntimeError(f"{type(e).__name__}: {e}")
        queue.put(("error", index, e))


def _scan_parallel(manifest: Manifest, settings: dict, workers: int, bar: tqdm) -> StatsAccumulator:
    """Scan with `workers` spawned processes (shard i goes to worker i % workers, so the result is reproducible
    for a given worker count) and merge their accumulators in worker order."""
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe with the threads s3fs/aiohttp keep
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, daemon=True, name=f"norm-stats-{w}",
                         args=(manifest, list(manifest.shards[w::workers]), settings, w, queue))
             for w in range(workers)]
    for p in procs:
        p.start()
    results: dict[int, StatsAccumulator] = {}
    try:
        while len(results) < workers:
            try:
                kind, w, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [p for w, p in enumerate(procs) if w not in results and p.exitcode not in (None, 0)]
                if dead:  # killed without a word, e.g. by the OOM killer
                    raise RuntimeError(
                        f"norm stats worker {dead[0].name} died (exit code {dead[0].exitcode})") from None
                continue
            if kind == "progress":
                bar.update(payload)
            elif kind == "error":
                raise payload
            else:
                results[w] = payload
    finally:
        for p in procs:  # on error, stop the processes this function started (normally they have exited)
            if p.is_alive():
                p.terminate()
            p.join()
    acc = results[0]
    for w in range(1, workers):
        acc.merge(results[w])
    return acc


def compute_norm_stats(shards_url: str, *, out: str | None = None, sample_fraction: float = 1.0, seed: int = 42,
                       max_quantile_samples: int = 1_000_000, workers: int = 1) -> str:
    """Compute NormStats of the shard set at `shards_url` in one pass and save it; returns the URL written.

    `out` defaults to `<shards_url>/norm_stats.json`. The sampled chunks and quantiles depend only on the samples,
    `sample_fraction`, `seed` and `max_quantile_samples`, not on the shard order, the storage backend or
    `workers`; means and covariances agree across shard orders and worker counts up to float64 rounding.
    `workers` > 1 scans shards in that many processes (decoding is CPU-bound, ~3k samples/s per process).
    """
    if max_quantile_samples < 1:
        raise ValueError(f"max_quantile_samples must be >= 1, got {max_quantile_samples}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    settings = {"sample_fraction": sample_fraction, "seed": seed, "max_quantile_samples": max_quantile_samples}
    acc = StatsAccumulator(**settings)  # validates the settings before any I/O
    manifest = load_manifest(shards_url)
    if manifest.num_samples == 0 or not manifest.shards:
        raise ValueError(f"{shards_url}: the manifest lists no samples; re-run `b1k-train data shard` on a "
                         f"dataset with episodes")
    workers = min(workers, len(manifest.shards))
    with tqdm(total=manifest.num_samples, unit="sample", desc="norm stats", file=sys.stderr, mininterval=2.0,
              smoothing=0.05) as bar:
        if workers == 1:
            _scan(manifest, list(manifest.shards), acc, bar.update)
        else:
            acc = _scan_parallel(manifest, settings, workers, bar)
    try:
        stats = acc.finalize(manifest_sha256=hashlib.sha256(manifest_to_bytes(manifest.raw)).hexdigest())
    except ValueError as e:
        raise ValueError(f"{shards_url}: {e}") from e
    out = out or storage.join(shards_url, NORM_STATS_NAME)
    stats.save(out)
    logger.info("norm stats of %d frames, %d/%d chunks (jitter %g) -> %s", stats.num_frames, stats.num_chunks,
                stats.num_full_chunks, stats.correlation_jitter, out)
    if stats.skill_counts is not None:
        from data_loaders.instructions import unused_skill_rows

        # X-VLA: these rows of the 34-row skill table are masked out of the classifier (family_xvla init).
        unused = unused_skill_rows(stats.skill_counts)
        logger.info("X-VLA skill rows this data never labels (%d of 34, masked out of the skill classifier): %s",
                    len(unused), ", ".join(unused) or "none")
    return out
