"""Which sample each loader slot reads, in which order, and how a cursor survives a change of world size.

Vocabulary
- slot: one producer of samples, i.e. one DataLoader worker of one rank; `num_slots = world_size * num_workers`,
  slot id = rank * num_workers + worker.
- group: `shards_per_group` shards read together; its samples are shuffled by a permutation seeded by
  (seed, epoch, group). This is the shuffle window: a group is fetched with one GET per shard and only the
  samples still to be produced are decoded.
- item: (group, skip) = the group's permuted samples after the first `skip`. An epoch's plan is a list of items;
  by default every group once with skip 0, in a seeded random order.
- slot s reads items plan[s::num_slots] of each epoch, in order. Its cursor is (epoch, item_pos, offset):
  `offset` samples of item `item_pos` are consumed.

The global state is every slot's cursor plus `overrides` (epoch -> explicit item list), and, per rank, the state
of torchdata's StatefulDataLoader that carried those cursors (data_loaders/stream.py): resuming with the same
world size and workers hands each rank its own dataloader state back, which restores every worker's cursor and
the round-robin turn (bitwise-identical stream). Resuming with a different number of slots converts what is left
of each epoch in flight into an override plan -- the unread tail of every partly read item plus every unread
item -- and deals it out to the new slots, so every remaining sample of the epoch is produced exactly once and
nothing consumed is produced again.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Sequence

import numpy as np

# 2: the per-rank round-robin turn moved into the StatefulDataLoader states ("dataloaders"). A version-1 state
# (no dataloader states) still loads; it resumes every slot exactly but restarts the round-robin at worker 0.
STATE_VERSION = 2
_READABLE_VERSIONS = (1, 2)


@dataclasses.dataclass(frozen=True)
class Item:
    group: int
    skip: int


@dataclasses.dataclass(frozen=True)
class Cursor:
    epoch: int
    item_pos: int
    offset: int


def _rng(*keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in keys])))


def manifest_fingerprint(shard_names: Sequence[str], shard_sizes: Sequence[int]) -> str:
    """Identifies the shard set a cursor refers to; resuming against different shards is refused."""
    h = hashlib.sha256()
    for name, n in zip(shard_names, shard_sizes):
        h.update(f"{name}:{n};".encode())
    return h.hexdigest()[:16]


class EpochPlanner:
    """Deterministic grouping and per-group permutations for a fixed shard list and seed."""

    def __init__(self, shard_sizes: Sequence[int], *, seed: int, shards_per_group: int):
        if shards_per_group < 1:
            raise ValueError(f"shards_per_group must be >= 1, got {shards_per_group}")
        if not shard_sizes:
            raise ValueError("the manifest lists no shards; nothing to stream")
        self.shard_sizes = [int(n) for n in shard_sizes]
        self.seed = int(seed)
        self.shards_per_group = int(shards_per_group)
        self._groups_cache: dict[int, list[tuple[int, ...]]] = {}

    def groups(self, epoch: int) -> list[tuple[int, ...]]:
        """Shard ids of each group of `epoch` (shards shuffled per epoch, then cut into groups)."""
        if epoch not in self._groups_cache:
            order = _rng(self.seed, epoch, 0).permutation(len(self.shard_sizes))
            k = self.shards_per_group
            # Keep only the current epoch: a long run touches many epochs, one at a time.
            self._groups_cache = {epoch: [tuple(int(s) for s in order[i:i + k]) for i in range(0, len(order), k)]}
        return self._groups_cache[epoch]

    def group_samples(self, epoch: int, group: int) -> np.ndarray:
        """(n, 2) array of (shard id, index in shard) in the group's permuted order."""
        shard_ids = self.groups(epoch)[group]
        pairs = np.concatenate([
            np.stack([np.full(self.shard_sizes[s], s), np.arange(self.shard_sizes[s])], axis=1) for s in shard_ids
        ])
        perm = _rng(self.seed, epoch, 1, group).permutation(len(pairs))
        return pairs[perm]

    def group_size(self, epoch: int, group: int) -> int:
        return sum(self.shard_sizes[s] for s in self.groups(epoch)[group])

    def base_plan(self, epoch: int) -> list[Item]:
        return [Item(g, 0) for g in range(len(self.groups(epoch)))]


@dataclasses.dataclass
class StreamState:
    """Global loader position: what every slot has consumed. JSON-serialisable via to_dict/from_dict."""

    fingerprint: str
    seed: int
    shards_per_group: int
    num_slots: int
    cursors: list[Cursor]
    overrides: dict[int, list[Item]] = dataclasses.field(default_factory=dict)

    @classmethod
    def fresh(cls, *, fingerprint: str, seed: int, shards_per_group: int, num_slots: int,
              start_epoch: int = 0) -> "StreamState":
        return cls(fingerprint, seed, shards_per_group, num_slots, [Cursor(start_epoch, 0, 0)] * num_slots, {})

    def plan(self, planner: EpochPlanner, epoch: int) -> list[Item]:
        # An override may be empty (that epoch is finished), which must not fall back to the base plan.
        return self.overrides[epoch] if epoch in self.overrides else planner.base_plan(epoch)

    def slot_items(self, planner: EpochPlanner, epoch: int, slot: int) -> list[Item]:
        return self.plan(planner, epoch)[slot::self.num_slots]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "fingerprint": self.fingerprint, "seed": self.seed,
            "shards_per_group": self.shards_per_group, "num_slots": self.num_slots,
            "cursors": [[c.epoch, c.item_pos, c.offset] for c in self.cursors],
            "overrides": {str(e): [[i.group, i.skip] for i in items] for e, items in self.overrides.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StreamState":
        if d.get("version") not in _READABLE_VERSIONS:
            raise ValueError(f"loader state version {d.get('version')!r} is not supported (this b1k-train reads "
                             f"{_READABLE_VERSIONS})")
        return cls(
            fingerprint=d["fingerprint"], seed=int(d["seed"]), shards_per_group=int(d["shards_per_group"]),
            num_slots=int(d["num_slots"]), cursors=[Cursor(*map(int, c)) for c in d["cursors"]],
            overrides={int(e): [Item(int(g), int(s)) for g, s in items] for e, items in d["overrides"].items()},
        )


def remaining_items(state: StreamState, planner: EpochPlanner, epoch: int) -> list[Item]:
    """What is left of `epoch` across all slots, in plan order (partly read items first keep their place)."""
    plan = state.plan(planner, epoch)
    left: list[tuple[int, Item]] = []
    for slot, cur in enumerate(state.cursors):
        positions = range(slot, len(plan), state.num_slots)
        if cur.epoch > epoch:
            continue
        for k, pos in enumerate(positions):
            item = plan[pos]
            if cur.epoch < epoch or k > cur.item_pos:
                left.append((pos, item))
            elif k == cur.item_pos:
                skip = item.skip + cur.offset
                if skip < planner.group_size(epoch, item.group):
                    left.append((pos, Item(item.group, skip)))
    return [item for _, item in sorted(left, key=lambda x: x[0])]


def reshard(state: StreamState, planner: EpochPlanner, *, num_slots: int) -> StreamState:
    """Re-deal the unconsumed part of every epoch in flight to `num_slots` slots (exactly-once semantics)."""
    if num_slots == state.num_slots:
        return state
    first = min(c.epoch for c in state.cursors)
    last = max(c.epoch for c in state.cursors)
    overrides = {e: remaining_items(state, planner, e) for e in range(first, last + 1)}
    # Later epochs start fresh from the base plan; earlier overrides are finished.
    return StreamState(state.fingerprint, state.seed, state.shards_per_group, num_slots,
                       [Cursor(first, 0, 0)] * num_slots, overrides)


def merge_rank_states(states: Sequence[dict[str, Any]], *, num_workers_per_rank: Sequence[int]) -> dict[str, Any]:
    """Combine the rank-local states (each lists only its own slots' cursors) into one global state dict.

    `num_workers_per_rank` counts slots (max(1, num_workers)). Each rank's StatefulDataLoader state is kept as is
    under "dataloaders" (index = rank), with the DataLoader's worker count under "num_workers".
    """
    if not states:
        raise ValueError("no loader states to merge")
    base = dict(states[0])
    cursors: list[list[int]] = []
    for st, w in zip(states, num_workers_per_rank):
        for key in ("fingerprint", "seed", "shards_per_group", "num_slots", "overrides"):
            if st[key] != base[key]:
                raise ValueError(f"rank loader states disagree on {key!r}; they come from different runs")
        if len(st["local_cursors"]) != w:
            raise ValueError("a rank's loader state has the wrong number of worker cursors")
        cursors.extend(st["local_cursors"])
    if len(cursors) != base["num_slots"]:
        raise ValueError(f"merged {len(cursors)} cursors but the run had {base['num_slots']} slots")
    out = {k: base[k] for k in ("fingerprint", "seed", "shards_per_group", "num_slots", "overrides")}
    out.update(version=STATE_VERSION, cursors=cursors, dataloaders=[st.get("dataloader") for st in states],
               num_workers=[st.get("num_workers") for st in states])
    return out
