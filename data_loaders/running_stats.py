"""Order-independent streaming building blocks for dataset statistics, with memory independent of the data size.

- `hash64` / `unit_interval`: a deterministic per-row hash (splitmix64), used to sample rows reproducibly
  whatever order they arrive in;
- `Moments`: running mean and centred second moments (diagonal or full scatter matrix), mergeable;
- `BottomKReservoir`: the k rows with the smallest hash keys, i.e. a uniform sample of at most k rows that depends
  only on which rows exist, mergeable.
"""

from __future__ import annotations

import numpy as np


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective, well-mixed uint64 -> uint64 map (wrap-around arithmetic intended)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hash64(seed: int, salt: int, *columns: np.ndarray) -> np.ndarray:
    """Deterministic uint64 hash per row of the integer `columns` (all the same length)."""
    h = _mix64(np.full(len(columns[0]), (seed * 0x9E3779B97F4A7C15 + salt) % 2**64, dtype=np.uint64))
    for col in columns:
        with np.errstate(over="ignore"):
            h = _mix64(h ^ (np.asarray(col).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)))
    return h


def unit_interval(h: np.ndarray) -> np.ndarray:
    """uint64 hash -> float64 in [0, 1) using its top 53 bits."""
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


class Moments:
    """Running count, mean and centred second moments (full scatter matrix or its diagonal), float64.

    Batches are merged with Chan et al.'s pairwise update, which avoids the cancellation of the
    sum / sum-of-squares formula when |mean| >> std. Memory is O(dim^2) (full) or O(dim), never O(samples).
    """

    def __init__(self, dim: int, *, full: bool) -> None:
        self.count = 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros((dim, dim) if full else dim)
        self.full = full

    def update(self, x: np.ndarray) -> None:
        """Fold in a batch of rows (n, dim)."""
        if x.shape[0] == 0:
            return
        mean_b = x.mean(axis=0)
        xc = x - mean_b
        self._merge(x.shape[0], mean_b, xc.T @ xc if self.full else np.einsum("ij,ij->j", xc, xc))

    def merge(self, other: Moments) -> None:
        """Fold in the moments of disjoint data (e.g. another worker's)."""
        if other.count:
            self._merge(other.count, other.mean, other.m2)

    def _merge(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n = self.count + n_b
        delta = mean_b - self.mean
        w = self.count * n_b / n
        self.m2 += m2_b + (np.outer(delta, delta) if self.full else delta * delta) * w
        self.mean += delta * (n_b / n)
        self.count = n

    def variance(self) -> np.ndarray:
        """Population variance (ddof=0, like np.std) per coordinate."""
        diag = np.diag(self.m2) if self.full else self.m2
        return np.maximum(diag, 0.0) / self.count


class BottomKReservoir:
    """The at most `capacity` rows with the smallest uint64 keys offered so far (a uniform sample when the keys
    are hashes); the result is independent of the order in which rows are offered.

    Rows are kept as float32 (the dataset's own precision; ~92 MB per million 23-d rows) and at most
    2 * capacity of them are held between compactions.
    """

    def __init__(self, capacity: int, dim: int) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1, got {capacity}")
        self.capacity, self.dim = capacity, dim
        self._keys = np.empty(0, dtype=np.uint64)
        self._rows = np.empty((0, dim), dtype=np.float32)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._num_pending = 0

    @property
    def num_stored(self) -> int:
        """Rows currently held (the memory bound is 2 * capacity plus one offered batch)."""
        return len(self._keys) + self._num_pending

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Offer rows (n, dim) with their uint64 keys (n,)."""
        self._pending.append((keys, rows.astype(np.float32)))
        self._num_pending += len(keys)
        if self.num_stored > 2 * self.capacity:
            self._compact()

    def _compact(self) -> None:
        keys = np.concatenate([self._keys] + [k for k, _ in self._pending])
        rows = np.concatenate([self._rows] + [r for _, r in self._pending])
        self._pending, self._num_pending = [], 0
        if len(keys) > self.capacity:
            keep = np.argpartition(keys, self.capacity - 1)[: self.capacity]
            keys, rows = keys[keep], rows[keep]
        self._keys, self._rows = keys, rows

    def merge(self, other: BottomKReservoir) -> None:
        """Offer every row `other` holds (the bottom-k of a union is the bottom-k of the parts' bottom-ks)."""
        other._compact()
        self.add(other._keys, other._rows)

    def rows(self) -> np.ndarray:
        """The sampled rows as float64, sorted by key (a canonical order)."""
        self._compact()
        return self._rows[np.argsort(self._keys, kind="stable")].astype(np.float64)
