"""Streaming loader over webdataset shards with exact, world-size-independent resume.

`StreamLoader` yields model-ready batches from a manifest on file:// or s3://. Shards are dealt to slots
(rank x DataLoader worker) in shuffled groups (see stream_plan.py); each worker decodes and transforms only its
own samples; the main process interleaves workers strictly round-robin and collates. Its `state_dict()` holds
every slot's cursor, so a resumed loader continues at exactly the next sample (same world size: bitwise the
same stream), and a different world size continues the same epoch with every remaining sample exactly once.

Usage (one rank):

    loader = StreamLoader("s3://bucket/shards", StreamConfig(batch_size=32), rank=r, world_size=w,
                          norm_stats=NormStats.load(...))
    for batch in loader: ...
    local = loader.state_dict()            # per rank; gather all ranks' dicts for a checkpoint
    glob = merge_rank_states(all_local)    # what load_state_dict() takes on any world size
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_loaders import manifest as mf
from data_loaders.augment import AugmentConfig
from data_loaders.prefetch import BackgroundIterator
from data_loaders.sample_format import SampleError, decode_sample
from data_loaders.stream_plan import (
    Cursor,
    EpochPlanner,
    StreamState,
    manifest_fingerprint,
    merge_rank_states,
    reshard,
)
from data_loaders.transforms import Normalizer, SampleTransform

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamConfig:
    batch_size: int  # per rank
    seed: int = 0  # fixes shard order, per-group shuffles and augmentation
    num_workers: int = 2  # DataLoader worker processes per rank (0 = in the main process)
    shards_per_group: int = 4  # shuffle window in shards; memory ~ shards_per_group x shard size per worker
    num_epochs: int | None = None  # None = endless (training); an int stops after that many epochs
    train: bool = True  # apply image augmentation
    drop_last: bool = False  # at the end of a finite stream, drop a final partial batch
    on_bad_shard: str = "error"  # "error": raise naming the shard; "skip": skip it and count it in metrics
    verify_checksums: bool = True  # sha256 of every shard against the manifest
    prefetch_factor: int = 4  # samples queued per DataLoader worker
    # How worker processes start: "fork" is fastest; "forkserver"/"spawn" inherit nothing from the trainer but
    # pay an import per worker and see the environment of when their server started.
    start_method: str = "fork"
    # Collated batches a background thread of the training process keeps ready (0 = collate on demand).
    prefetch_batches: int = 2

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1 or self.prefetch_batches < 0:
            raise ValueError(f"prefetch_factor must be >= 1 and prefetch_batches >= 0, got {self.prefetch_factor}, "
                             f"{self.prefetch_batches}")
        if self.start_method not in ("forkserver", "spawn", "fork"):
            raise ValueError(f"start_method must be forkserver, spawn or fork, got {self.start_method!r}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (endless), got {self.num_epochs}")
        if self.on_bad_shard not in ("error", "skip"):
            raise ValueError(f"on_bad_shard must be 'error' or 'skip', got {self.on_bad_shard!r}")


def _sample_rng(seed: int, epoch: int, group: int, position: int) -> np.random.Generator:
    # Keyed by the sample's place in its group, not by slot, so augmentation survives a reshard unchanged.
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, 2, group, position])))


class _ShardStream(IterableDataset):
    """Produces, for one rank, its slots' samples; each item carries its slot and the cursor after it.

    A finished slot then yields end markers forever, so the DataLoader's round-robin over workers never
    changes shape and the interleaving is a pure function of the state.
    """

    def __init__(self, manifest: mf.Manifest, planner: EpochPlanner, state: StreamState, *, rank: int,
                 num_workers: int, transform: Callable[[dict, Any], dict], cfg: StreamConfig):
        self.manifest, self.planner, self.state = manifest, planner, state
        self.rank, self.num_workers, self.transform, self.cfg = rank, max(1, num_workers), transform, cfg
        self.first_sample = np.cumsum([0] + [s.num_samples for s in manifest.shards])  # manifest-order index

    def local_slot(self, worker_id: int) -> int:
        return (worker_id + self.state.next_local_slot[self.rank]) % self.num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        local = self.local_slot(info.id if info is not None else 0)
        if info is not None:
            torch.set_num_threads(1)
        slot = self.rank * self.num_workers + local
        yield from self._slot_samples(slot, local)
        while True:
            yield {"_slot": local, "_end": True}

    def _slot_samples(self, slot: int, local: int) -> Iterator[dict[str, Any]]:
        cur = self.state.cursors[slot]
        epoch = cur.epoch
        while self.cfg.num_epochs is None or epoch < self.cfg.num_epochs:
            items = self.state.slot_items(self.planner, epoch, slot)
            first_pos = cur.item_pos if epoch == cur.epoch else 0
            for item_pos in range(first_pos, len(items)):
                offset = cur.offset if (epoch == cur.epoch and item_pos == cur.item_pos) else 0
                yield from self._item_samples(epoch, item_pos, items[item_pos], offset, local)
            epoch += 1

    def _item_samples(self, epoch: int, item_pos: int, item: Any, offset: int,
                      local: int) -> Iterator[dict[str, Any]]:
        order = self.planner.group_samples(epoch, item.group)
        start = item.skip + offset
        todo = order[start:]
        shard_ids = sorted({int(s) for s in todo[:, 0]})
        members: dict[int, list[dict[str, bytes]] | Exception] = {}
        for sid in shard_ids:  # only shards that still hold unread samples are fetched
            members[sid] = self._load_shard(sid)
        reported: set[int] = set()
        for k, (sid, idx) in enumerate(todo):
            sid, idx = int(sid), int(idx)
            cursor = (epoch, item_pos, offset + k + 1)
            got = members[sid]
            if isinstance(got, Exception):
                if sid not in reported:
                    reported.add(sid)
                    n = int((todo[:, 0] == sid).sum())
                    yield {"_slot": local, "_cursor": cursor, "_skipped": {
                        "kind": "shard", "shard": self.manifest.shards[sid].name, "samples": n, "error": str(got)}}
                continue
            where = f"{self.manifest.shard_url(self.manifest.shards[sid].name)}#{idx}"
            try:
                raw = decode_sample(got[idx], image_format=self.manifest.image_format, where=where,
                                    decode_images=False)
                out = self.transform(raw, _sample_rng(self.cfg.seed, epoch, item.group, start + k))
            except (SampleError, OSError, ValueError) as e:
                if self.cfg.on_bad_shard == "error":
                    raise SampleError(f"{where}: {e}") from e
                yield {"_slot": local, "_cursor": cursor, "_skipped": {
                    "kind": "sample", "shard": self.manifest.shards[sid].name, "samples": 1, "error": str(e)}}
                continue
            # Identity of the sample (its index in manifest order) and its epoch: for audits and debugging.
            out["sample_index"], out["epoch"] = np.int64(self.first_sample[sid] + idx), np.int64(epoch)
            out["_slot"], out["_cursor"] = local, cursor
            yield out

    def _load_shard(self, sid: int) -> list[dict[str, bytes]] | Exception:
        shard = self.manifest.shards[sid]
        try:
            data = mf.read_shard_bytes(self.manifest, shard, verify=self.cfg.verify_checksums)
            samples = [files for _, files in mf.iter_tar_samples(data, where=self.manifest.shard_url(shard.name))]
            if len(samples) != shard.num_samples:
                raise mf.ShardError(f"shard {self.manifest.shard_url(shard.name)} holds {len(samples)} samples, "
                                    f"manifest says {shard.num_samples}; re-run `b1k-train data shard`")
            return samples
        except mf.ShardError as e:
            if self.cfg.on_bad_shard == "error":
                raise
            log.warning("skipping bad shard: %s", e)
            return e


def _die_with_parent(_: int) -> None:
    """Loader workers die with the process that started them (Linux). Otherwise, when a training worker is
    SIGKILLed (OOM killer, a lost pod), its orphaned loader children keep the inherited raylet socket open and
    Ray takes minutes (measured: 7, until a keepalive timeout) to notice the death instead of failing over."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _as_is(item: Any) -> Any:
    # Keep worker outputs as numpy: one pickled buffer per sample through the pipe is cheaper than moving
    # eleven small tensors into shared memory one by one (measured in bench/README.md).
    return item


@dataclasses.dataclass(frozen=True)
class _Position:
    """One rank's place in the stream after some batch: its slots' cursors, round-robin turn and counters."""

    cursors: tuple[Cursor, ...]
    next_local_slot: int
    metrics: dict[str, int]


def _collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    out = {}
    for key in samples[0]:
        if key.startswith("_"):
            continue
        vals = [s[key] for s in samples]
        out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else torch.as_tensor(np.stack(vals))
    return out


class StreamLoader:
    """Iterable of batches for one rank, with state_dict()/load_state_dict() for exact resume."""

    def __init__(self, manifest_url: str, cfg: StreamConfig, *, rank: int = 0, world_size: int = 1,
                 norm_stats: Any | None = None, augment: AugmentConfig | None = None,
                 fast_tokenizer: Any | None = None, max_fast_tokens: int = 200,
                 transform: Callable[[dict, Any], dict] | None = None):
        """`transform` (sample, rng) -> fields replaces the pi-behavior SampleTransform (e.g. X-VLA's); it must be
        picklable and deterministic given the rng, which is keyed by the sample's position (exact resume)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.manifest = mf.load_manifest(manifest_url)
        self.planner = EpochPlanner([s.num_samples for s in self.manifest.shards], seed=cfg.seed,
                                    shards_per_group=cfg.shards_per_group)
        self.workers_per_rank = max(1, cfg.num_workers)
        self.num_slots = world_size * self.workers_per_rank
        num_groups = len(self.planner.groups(0))
        if num_groups < self.num_slots:
            # Workers are interleaved strictly round-robin, so a slot with nothing to read would stall the rank.
            raise ValueError(
                f"{manifest_url} has {len(self.manifest.shards)} shards = {num_groups} groups of "
                f"{cfg.shards_per_group}, fewer than the {self.num_slots} loader slots (world_size {world_size} x "
                f"{self.workers_per_rank} workers); lower num_workers or shards_per_group, or re-shard with a "
                f"smaller --samples-per-shard")
        self.fingerprint = manifest_fingerprint([s.name for s in self.manifest.shards],
                                                [s.num_samples for s in self.manifest.shards])
        normalizer = Normalizer.from_norm_stats(norm_stats) if norm_stats is not None else None
        aug = (augment or AugmentConfig()) if cfg.train else None
        self.transform = transform or SampleTransform(normalizer=normalizer, augment=aug,
                                                      fast_tokenizer=fast_tokenizer, max_fast_tokens=max_fast_tokens)
        self._state = StreamState.fresh(fingerprint=self.fingerprint, seed=cfg.seed,
                                        shards_per_group=cfg.shards_per_group, num_slots=self.num_slots,
                                        num_ranks=world_size)
        # What the consumer has received; the producer (possibly a thread, batches ahead) counts in _produced.
        self.metrics = {"samples": 0, "batches": 0, "skipped_samples": 0, "skipped_shards": 0}
        self._produced = dict(self.metrics)
        # While iterating: this rank's position as of the last batch handed out (the producer's is further on).
        self._consumed: _Position | None = None

    # --- state ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (its slots' cursors). Merge all ranks' dicts with merge_rank_states()."""
        g = self._state.to_dict()
        pos = self._position()
        local = {k: g[k] for k in ("version", "fingerprint", "seed", "shards_per_group", "num_slots", "overrides")}
        local["local_cursors"] = [[c.epoch, c.item_pos, c.offset] for c in pos.cursors]
        local["next_local_slot"] = pos.next_local_slot
        local["metrics"] = dict(self.metrics)
        return local

    def _position(self) -> "_Position":
        if self._consumed is not None:
            return self._consumed
        w = self.workers_per_rank
        lo = self.rank * w
        return _Position(tuple(self._state.cursors[lo:lo + w]), self._state.next_local_slot[self.rank],
                         dict(self.metrics))

    def _set_position(self, pos: "_Position") -> None:
        lo = self.rank * self.workers_per_rank
        self._state.cursors[lo:lo + self.workers_per_rank] = list(pos.cursors)
        self._state.next_local_slot[self.rank] = pos.next_local_slot
        self.metrics = dict(pos.metrics)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a global state (merge_rank_states of every rank) or, on one rank, its own local state."""
        if "local_cursors" in state:
            state = merge_rank_states([state], num_workers_per_rank=[len(state["local_cursors"])])
        st = StreamState.from_dict(state)
        if st.fingerprint != self.fingerprint:
            raise ValueError("the loader state was saved for a different shard set (manifest changed); "
                             "resume against the same shards or start the data stream fresh")
        if (st.seed, st.shards_per_group) != (self.cfg.seed, self.cfg.shards_per_group):
            raise ValueError(f"the loader state was saved with seed={st.seed}, shards_per_group="
                             f"{st.shards_per_group}; configure the loader the same way to resume")
        if st.num_slots != self.num_slots or len(st.next_local_slot) != self.world_size:
            log.info("resharding loader state from %d to %d slots", st.num_slots, self.num_slots)
            st = reshard(st, self.planner, num_slots=self.num_slots, num_ranks=self.world_size)
        self._state = st

    @property
    def epoch(self) -> int:
        """The oldest epoch any slot of this rank is still in."""
        return min(c.epoch for c in self._position().cursors)

    # --- iteration -------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._consumed is not None:
            raise RuntimeError("this StreamLoader is already being iterated; finish or close that iterator first")
        start = self._position()
        self._consumed = start
        self._produced = dict(start.metrics)
        source: Any = self._produce()
        if self.cfg.prefetch_batches:
            source = BackgroundIterator(source, self.cfg.prefetch_batches, name=f"stream-prefetch-rank{self.rank}")
        try:
            for batch, pos in source:
                self._consumed = pos
                self.metrics = dict(pos.metrics)
                yield batch
        finally:
            source.close()
            # The producer may be batches ahead: rewind to what was handed out, so the next iteration (or a
            # checkpoint) continues exactly after the last batch the caller received.
            end, self._consumed = self._consumed, None
            self._set_position(end)

    def _produce(self) -> Iterator[tuple[dict[str, torch.Tensor], "_Position"]]:
        ds = _ShardStream(self.manifest, self.planner, self._state, rank=self.rank,
                          num_workers=self.cfg.num_workers, transform=self.transform, cfg=self.cfg)
        if self.cfg.num_workers == 0:
            source: Any = iter(ds)
        else:
            source = iter(DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                                     prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False,
                                     multiprocessing_context=self.cfg.start_method,
                                     worker_init_fn=_die_with_parent,
                                     collate_fn=_as_is))
        w = self.workers_per_rank
        ended: set[int] = set()
        buf: list[dict[str, Any]] = []
        try:
            for item in source:
                local = int(item["_slot"])
                # Strict round-robin: the next item always comes from the following worker.
                self._state.next_local_slot[self.rank] = (local + 1) % w
                if "_end" in item:
                    ended.add(local)
                    if len(ended) == w:
                        break
                    continue
                self._state.cursors[self.rank * w + local] = Cursor(*map(int, item["_cursor"]))
                if "_skipped" in item:
                    self._record_skip(item["_skipped"])
                    continue
                buf.append(item)
                if len(buf) == self.cfg.batch_size:
                    yield self._emit(buf)
                    buf = []
            if buf and not self.cfg.drop_last:
                yield self._emit(buf)
        finally:
            del source  # shuts the worker processes down

    def _emit(self, buf: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], "_Position"]:
        self._produced["samples"] += len(buf)
        self._produced["batches"] += 1
        w = self.workers_per_rank
        lo = self.rank * w
        pos = _Position(tuple(self._state.cursors[lo:lo + w]), self._state.next_local_slot[self.rank],
                        dict(self._produced))
        return _collate(buf), pos

    def _record_skip(self, info: dict[str, Any]) -> None:
        self._produced["skipped_samples"] += int(info["samples"])
        self._produced["skipped_shards"] += int(info["kind"] == "shard")
        log.warning("skipped %d sample(s) of %s: %s", info["samples"], info["shard"], info["error"])
