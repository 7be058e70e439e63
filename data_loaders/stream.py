"""Streaming loader over webdataset shards with exact, world-size-independent resume.

`StreamLoader` yields model-ready batches from a manifest on file:// or s3://. Shards are dealt to slots
(rank x DataLoader worker) in shuffled groups (see stream_plan.py); each worker decodes and transforms only its
own samples. The workers run under torchdata's StatefulDataLoader: each worker's dataset is `Stateful` (its
state is its slot's cursor), the StatefulDataLoader interleaves the workers in order (round-robin, skipping
exhausted ones) and its state_dict()/load_state_dict() carries every worker's cursor and the round-robin turn
across a restart. The training process collates in a background thread (prefetch.py). A resumed loader
continues at exactly the next sample (same world size: bitwise the same stream); a different world size --
which a StatefulDataLoader state cannot express, see `_dataloader_state_for` -- continues the same epoch with
every remaining sample exactly once through stream_plan.reshard.

Usage (one rank):

    loader = StreamLoader("s3://bucket/shards", StreamConfig(batch_size=32), rank=r, world_size=w,
                          norm_stats=NormStats.load(...))
    for batch in loader: ...
    local = loader.state_dict()            # per rank; gather all ranks' dicts for a checkpoint
    glob = merge_rank_states(all_local, num_workers_per_rank=[...])  # load_state_dict() takes it on any world size
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

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


class _SlotStream(IterableDataset):
    """The samples of one slot: in DataLoader worker k of rank r, slot r * workers_per_rank + k.

    Stateful in torchdata's sense (state_dict/load_state_dict): the state is the slot's cursor after the last
    sample yielded. The StatefulDataLoader asks each worker's copy for it with every sample it sends, and
    restores it into a fresh worker on resume, so no sample needs to carry its slot or cursor.
    """

    def __init__(self, manifest: mf.Manifest, planner: EpochPlanner, state: StreamState, *, rank: int,
                 workers_per_rank: int, transform: Callable[[dict, Any], dict], cfg: StreamConfig):
        self.manifest, self.planner, self.state = manifest, planner, state
        self.rank, self.workers_per_rank, self.transform, self.cfg = rank, workers_per_rank, transform, cfg
        self.first_sample = np.cumsum([0] + [s.num_samples for s in manifest.shards])  # manifest-order index
        self._cursor: Cursor | None = None  # set by load_state_dict (a resumed worker) and by iteration

    def _slot(self) -> int:
        info = get_worker_info()
        return self.rank * self.workers_per_rank + (info.id if info is not None else 0)

    def state_dict(self) -> dict[str, int]:
        c = self._cursor if self._cursor is not None else self.state.cursors[self._slot()]
        return {"epoch": c.epoch, "item_pos": c.item_pos, "offset": c.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._cursor = Cursor(int(state["epoch"]), int(state["item_pos"]), int(state["offset"]))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if get_worker_info() is not None:
            torch.set_num_threads(1)
        cur = self._cursor if self._cursor is not None else self.state.cursors[self._slot()]
        epoch = cur.epoch
        while self.cfg.num_epochs is None or epoch < self.cfg.num_epochs:
            items = self.state.slot_items(self.planner, epoch, self._slot())
            first_pos = cur.item_pos if epoch == cur.epoch else 0
            for item_pos in range(first_pos, len(items)):
                offset = cur.offset if (epoch == cur.epoch and item_pos == cur.item_pos) else 0
                yield from self._item_samples(epoch, item_pos, items[item_pos], offset)
            epoch += 1

    def _item_samples(self, epoch: int, item_pos: int, item: Any, offset: int) -> Iterator[dict[str, Any]]:
        order = self.planner.group_samples(epoch, item.group)
        start = item.skip + offset
        todo = order[start:]
        members: dict[int, list[dict[str, bytes]] | Exception] = {}
        for sid in sorted({int(s) for s in todo[:, 0]}):  # only shards that still hold unread samples are fetched
            members[sid] = self._load_shard(sid)
        reported: set[int] = set()
        for k, (sid, idx) in enumerate(todo):
            sid, idx = int(sid), int(idx)
            # The cursor moves before the yield: the state the StatefulDataLoader takes right after this sample
            # must say it is consumed.
            self._cursor = Cursor(epoch, item_pos, offset + k + 1)
            got = members[sid]
            if isinstance(got, Exception):
                if sid not in reported:
                    reported.add(sid)
                    n = int((todo[:, 0] == sid).sum())
                    yield {"_skipped": {"kind": "shard", "shard": self.manifest.shards[sid].name, "samples": n,
                                        "error": str(got)}}
                continue
            where = f"{self.manifest.shard_url(self.manifest.shards[sid].name)}#{idx}"
            try:
                raw = decode_sample(got[idx], image_format=self.manifest.image_format, where=where,
                                    decode_images=False)
                out = self.transform(raw, _sample_rng(self.cfg.seed, epoch, item.group, start + k))
            except (SampleError, OSError, ValueError) as e:
                if self.cfg.on_bad_shard == "error":
                    raise SampleError(f"{where}: {e}") from e
                yield {"_skipped": {"kind": "sample", "shard": self.manifest.shards[sid].name, "samples": 1,
                                    "error": str(e)}}
                continue
            # Identity of the sample (its index in manifest order) and its epoch: for audits and debugging.
            out["sample_index"], out["epoch"] = np.int64(self.first_sample[sid] + idx), np.int64(epoch)
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


def worker_cursors(dataloader_state: dict[str, Any], num_workers: int) -> list[Cursor]:
    """Each worker's cursor inside a StatefulDataLoader state_dict() (torchdata 0.11, pinned exactly).

    The per-worker dataset states are what a resharding needs, and torchdata offers no accessor for them, so
    this reads its documented-by-code layout: `_snapshot._worker_snapshots.worker_<k>.dataset_state` with
    workers, `dataset_state` without. tests/integration/test_stream.py pins it.
    """
    if num_workers == 0:
        states = [dataloader_state["dataset_state"]]
    else:
        snaps = dataloader_state["_snapshot"]["_worker_snapshots"]
        states = [snaps[f"worker_{k}"]["dataset_state"] for k in range(num_workers)]
    return [Cursor(int(s["epoch"]), int(s["item_pos"]), int(s["offset"])) for s in states]


@dataclasses.dataclass(frozen=True)
class _Position:
    """One rank's place in the stream after some batch: its StatefulDataLoader state (None = not started from
    one: the dataset starts each slot at its cursor in `cursors`), its slots' cursors and counters."""

    dataloader: dict[str, Any] | None
    cursors: tuple[Cursor, ...]
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
                                        shards_per_group=cfg.shards_per_group, num_slots=self.num_slots)
        # The StatefulDataLoader state the next iteration resumes from (None: start each slot at its cursor).
        self._dataloader_state: dict[str, Any] | None = None
        # What the consumer has received; the producer (possibly a thread, batches ahead) counts in _produced.
        self.metrics = {"samples": 0, "batches": 0, "skipped_samples": 0, "skipped_shards": 0}
        self._produced = dict(self.metrics)
        # While iterating: this rank's position as of the last batch handed out (the producer's is further on).
        self._consumed: _Position | None = None

    # --- state ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's position. JSON-serialisable; merge all ranks' dicts with merge_rank_states()."""
        g = self._state.to_dict()
        pos = self._position()
        local = {k: g[k] for k in ("version", "fingerprint", "seed", "shards_per_group", "num_slots", "overrides")}
        local["local_cursors"] = [[c.epoch, c.item_pos, c.offset] for c in pos.cursors]
        # A deep copy through JSON: the checkpoint writes it as JSON, and later batches must not change it.
        local["dataloader"] = json.loads(json.dumps(pos.dataloader)) if pos.dataloader is not None else None
        local["num_workers"] = self.cfg.num_workers
        local["metrics"] = dict(pos.metrics)
        return local

    def _position(self) -> _Position:
        if self._consumed is not None:
            return self._consumed
        lo = self.rank * self.workers_per_rank
        return _Position(self._dataloader_state, tuple(self._state.cursors[lo:lo + self.workers_per_rank]),
                         dict(self.metrics))

    def _set_position(self, pos: _Position) -> None:
        lo = self.rank * self.workers_per_rank
        self._state.cursors[lo:lo + self.workers_per_rank] = list(pos.cursors)
        self._dataloader_state = pos.dataloader
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
        self._dataloader_state = self._dataloader_state_for(state)
        if st.num_slots != self.num_slots:
            log.info("resharding loader state from %d to %d slots", st.num_slots, self.num_slots)
            st = reshard(st, self.planner, num_slots=self.num_slots)
        elif self._dataloader_state is None:
            log.info("resuming every slot at its cursor; the round-robin over workers restarts at worker 0")
        self._state = st

    def _dataloader_state_for(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """This rank's StatefulDataLoader state, if the saved run had the same world size and workers.

        What StatefulDataLoader cannot express (tests/integration/test_stream.py::
        test_stateful_dataloader_state_does_not_fit_another_worker_count): its state is per process and per worker
        count -- load_state_dict() into a loader with another num_workers fails, and it knows nothing of other
        ranks. Dealing a rank's remaining samples to a different set of (rank, worker) slots is therefore
        stream_plan.reshard's job: it re-deals every slot's remainder, and each new worker starts from the cursor
        the dataset is built with (the round-robin then starts at worker 0).
        """
        loaders, workers = state.get("dataloaders"), state.get("num_workers")
        if not loaders or len(loaders) != self.world_size or int(state["num_slots"]) != self.num_slots:
            return None
        if workers[self.rank] != self.cfg.num_workers or loaders[self.rank] is None:
            return None  # e.g. 0 <-> 1 workers: same slots, but the two StatefulDataLoader layouts differ
        return loaders[self.rank]

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
        source: Any = self._produce(start)
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

    def _produce(self, start: _Position) -> Iterator[tuple[dict[str, torch.Tensor], _Position]]:
        ds = _SlotStream(self.manifest, self.planner, self._state, rank=self.rank,
                         workers_per_rank=self.workers_per_rank, transform=self.transform, cfg=self.cfg)
        workers = dict(prefetch_factor=self.cfg.prefetch_factor, multiprocessing_context=self.cfg.start_method,
                       worker_init_fn=_die_with_parent) if self.cfg.num_workers else {}
        # in_order: the workers' samples interleave as a pure function of their streams (exhausted workers are
        # skipped); every sample carries its worker's state (snapshot_every_n_steps=1), so no resume fast-forwards.
        with warnings.catch_warnings():
            # torchdata 0.11 calls torch.set_vital, which torch 2.13 deprecates; nothing for us to change.
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            loader = StatefulDataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=_as_is,
                                        in_order=True, snapshot_every_n_steps=1, persistent_workers=False, **workers)
        if start.dataloader is not None:
            loader.load_state_dict(start.dataloader)
        it = iter(loader)
        buf: list[dict[str, Any]] = []
        try:
            for item in it:
                if "_skipped" in item:
                    self._record_skip(item["_skipped"])
                    continue
                buf.append(item)
                if len(buf) == self.cfg.batch_size:
                    yield self._emit(buf, loader)
                    buf = []
            if buf and not self.cfg.drop_last:
                yield self._emit(buf, loader)
        finally:
            # Shut the workers down here, on the thread that forked them. An exception from a worker keeps the
            # iterator alive in its traceback, and when this (prefetch) thread then exits, PR_SET_PDEATHSIG
            # SIGKILLs the still-registered workers and torch's SIGCHLD handler raises "DataLoader worker is
            # killed by signal" in the main thread instead of the real error (seen in CI). torchdata is pinned.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del it, loader

    def _emit(self, buf: list[dict[str, Any]], loader: StatefulDataLoader) -> tuple[dict[str, torch.Tensor],
                                                                                      _Position]:
        self._produced["samples"] += len(buf)
        self._produced["batches"] += 1
        # The StatefulDataLoader's state right after the batch's last sample: every worker's cursor + whose turn.
        state = loader.state_dict()
        cursors = tuple(worker_cursors(state, self.cfg.num_workers))
        return _collate(buf), _Position(state, cursors, dict(self._produced))

    def _record_skip(self, info: dict[str, Any]) -> None:
        self._produced["skipped_samples"] += int(info["samples"])
        self._produced["skipped_shards"] += int(info["kind"] == "shard")
        log.warning("skipped %d sample(s) of %s: %s", info["samples"], info["shard"], info["error"])
