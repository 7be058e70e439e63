"""Stage voting (pi_behavior §4.3): a tracked task stage fed back to the model, moved only by a majority of
recent stage predictions, so a single noisy prediction cannot make the policy skip or repeat a sub-task."""

from __future__ import annotations

import collections


class StageVoter:
    """Tracks the stage of one episode of one task.

    After every inference `observe(predicted)` appends the (clamped) prediction; with a full history and a next
    stage to go to: >= votes_to_advance votes for stage+1 advance one stage; all votes for stage+2 also advance
    one (never two); all votes for stage-1 go back one. Any change clears the history. As in the reference, no
    rule fires at the last stage, so the last stage is never left.
    """

    def __init__(self, num_stages: int, *, history: int = 3, votes_to_advance: int = 2) -> None:
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        self.num_stages, self.history_len, self.votes_to_advance = num_stages, history, votes_to_advance
        self.stage = 0
        self.history: collections.deque[int] = collections.deque(maxlen=history)

    def reset(self) -> None:
        self.stage = 0
        self.history.clear()

    def set_stage(self, stage: int) -> None:
        """Force the stage (a correction rule); clears the history."""
        self.stage = min(max(int(stage), 0), self.num_stages - 1)
        self.history.clear()

    def observe(self, predicted: int) -> str | None:
        """Record one prediction; returns "advance", "skip", "back" when the stage changed, else None."""
        last = self.num_stages - 1
        self.history.append(min(max(int(predicted), 0), last))
        if len(self.history) < self.history_len or self.stage + 1 > last:
            return None
        votes = collections.Counter(self.history)
        event = None
        if votes[self.stage + 1] >= self.votes_to_advance:
            self.stage, event = self.stage + 1, "advance"
        elif votes[self.stage + 2] == self.history_len:
            self.stage, event = self.stage + 1, "skip"
        elif self.stage > 0 and votes[self.stage - 1] == self.history_len:
            self.stage, event = self.stage - 1, "back"
        if event:
            self.history.clear()
        return event
