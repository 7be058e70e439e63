"""In-memory view of one source episode, independent of the dataset layout it came from."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Protocol

import numpy as np


class DatasetError(ValueError):
    """A dataset file is missing, malformed or inconsistent. The message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class SkillSegment:
    """One `skill_annotation` item: frames [start, end) perform skill `skill_id` on `object_ids`."""

    start: int
    end: int
    skill_id: int
    description: str
    object_ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class EpisodeRef:
    episode_index: int
    task_index: int
    length: int


@dataclasses.dataclass
class Episode:
    """Low-dimensional data of one episode (all T frames); images are streamed by the source separately.

    Arrays are indexed by frame 0..T-1. `state` is the 23-d policy state extracted from `proprio`.
    """

    episode_index: int
    task_index: int
    proprio: np.ndarray  # (T, 256) float32
    state: np.ndarray  # (T, 23) float32
    actions: np.ndarray  # (T, 23) float32
    timestamps: np.ndarray  # (T,) float64
    skills: tuple[SkillSegment, ...] = ()  # empty when the layout has no annotations
    has_annotations: bool = False

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])

    def skill_at(self, frame: int) -> SkillSegment | None:
        """The annotated skill active at `frame`, or None outside every annotated segment."""
        for seg in self.skills:
            if seg.start <= frame < seg.end:
                return seg
        return None


class EpisodeSource(Protocol):
    """What the sharder needs from a dataset reader."""

    url: str
    layout: str

    def episodes(self) -> list[EpisodeRef]: ...

    def task_instructions(self) -> dict[int, str]: ...

    def read_episode(self, episode_index: int) -> Episode: ...

    def iter_rgb_frames(self, episode_index: int, *, size: int | None) -> Iterator[dict[str, np.ndarray]]:
        """Yield, for frames 0..T-1 in order, {camera: uint8 (H, W, 3)} for the three RGB cameras.

        With `size`, frames are resized to size x size the way the evaluator's low-res wrapper sees them.
        """
        ...
