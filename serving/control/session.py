"""Per-connection control state: the action queue, kept rows, tracked stage and noise index of one evaluator.

The server drives it once per env step:

    session.begin(obs.task, policy_info)      # a new task resets everything (the evaluator switched tasks)
    if session.needs_inference():
        result = infer(session.request(obs))  # possibly batched with other connections
        session.accept(obs.state, result)     # corrections -> chunk plan -> stage vote
    action = session.next_action()

Order inside `accept` follows the reference wrapper: the correction rules see the chunk first (and the rows
kept for inpainting are taken after it; a stage correction clears the vote history), then the chunk is planned,
then the stage prediction is voted on. A model without a stage source (`PolicyInfo.stage_source` False: X-VLA)
never has its placeholder stage used by a rule: the rules get stage None (serving/control/rules.py).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from serving.config import ServingConfig
from serving.control.chunking import plan_chunk
from serving.control.gripper import GripperCorrection, select_correction
from serving.control.rules import apply_rules
from serving.control.voting import StageVoter

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class InferenceRequest:
    images: np.ndarray  # (3, 224, 224, 3) uint8
    state: np.ndarray  # (23,) raw state
    task: int
    stage: int  # the stage fed to the model
    kept: np.ndarray | None  # (k, 23) absolute actions to inpaint, or None
    noise_key: tuple[int, int, int]  # (seed, task, inference index since reset): the noise is a function of it


@dataclasses.dataclass(frozen=True)
class InferenceResult:
    actions: np.ndarray  # (30, 23) absolute actions
    stage_logits: np.ndarray  # (max stages,)
    infer_ms: float = 0.0


@dataclasses.dataclass(frozen=True)
class PolicyInfo:
    """What a session needs from the model serving its task."""

    key: str  # identifies the loaded model (name and version)
    cfg: ServingConfig
    num_stages: int  # stages of the current task
    correction: GripperCorrection | None  # from the export's table; None: the rule is off or there is no table
    stage_source: bool = True  # False: the model predicts no stage (its stage logits are placeholders)


class ControlSession:
    def __init__(self) -> None:
        self.task: int | None = None
        self.info: PolicyInfo | None = None
        self.voter: StageVoter | None = None
        self.correction: GripperCorrection | None = None
        self.reset()

    def reset(self) -> None:
        """Forget everything episode-specific (a `{"reset": true}` message, or a new task)."""
        self.queue: np.ndarray | None = None
        self.index = 0
        self.kept: np.ndarray | None = None
        self.inferences = 0
        self.last_prediction = 0
        self.events: list[str] = []
        if self.voter is not None:
            self.voter.reset()

    def begin(self, task: int, info: PolicyInfo) -> None:
        """Called with every observation: a different task or model restarts the episode state."""
        if task != self.task or self.info is None or info.key != self.info.key:
            if self.task is not None:
                log.info("task %s -> %s (model %s)", self.task, task, info.key)
            self.task, self.info = task, info
            self.voter = StageVoter(info.num_stages, history=info.cfg.vote_history,
                                    votes_to_advance=info.cfg.votes_to_advance)
            self.correction = select_correction(info.cfg, info.correction)
            self.reset()

    @property
    def stage(self) -> int:
        """The stage fed to the model: the voted stage, or the last prediction when voting is off."""
        assert self.info is not None and self.voter is not None, "begin() first"
        return self.voter.stage if self.info.cfg.stage_voting else self.last_prediction

    def needs_inference(self) -> bool:
        return self.queue is None or self.index >= len(self.queue)

    def request(self, images: np.ndarray, state: np.ndarray) -> InferenceRequest:
        assert self.info is not None and self.task is not None, "begin() first"
        return InferenceRequest(images=images, state=state, task=self.task, stage=self.stage, kept=self.kept,
                                noise_key=(self.info.cfg.seed, self.task, self.inferences))

    def accept(self, state: np.ndarray, result: InferenceResult) -> None:
        """Turn one predicted chunk into the queue of actions for the next env steps."""
        assert self.info is not None and self.voter is not None and self.task is not None, "begin() first"
        cfg = self.info.cfg
        actions = np.asarray(result.actions, dtype=np.float32)
        self.events = []
        stage = self.stage if self.info.stage_source else None
        fixed = apply_rules(self.task, stage, state, actions, cfg, self.correction)
        if fixed.events:
            self.events.extend(fixed.events)
            log.info("task %d stage %s: correction %s", self.task, stage, ", ".join(fixed.events))
        actions = fixed.actions
        if fixed.stage is not None and fixed.stage != stage:
            self.voter.set_stage(fixed.stage)  # clears the vote history, as the reference
        plan = plan_chunk(actions, cfg)
        self.queue, self.index, self.kept = plan.execute, 0, plan.kept
        if plan.resampled:
            self.events.append("resampled")
        predicted = int(np.argmax(result.stage_logits))
        self.last_prediction = min(predicted, self.info.num_stages - 1)
        if cfg.stage_voting:
            event = self.voter.observe(predicted)
            if event:
                self.events.append(f"stage_{event}")
                log.info("task %d: stage %s to %d", self.task, event, self.voter.stage)
        self.inferences += 1

    def next_action(self) -> np.ndarray:
        """The (23,) float32 action for this env step."""
        if self.needs_inference():
            raise RuntimeError("no planned actions: run an inference first")
        assert self.queue is not None
        action = self.queue[self.index]
        self.index += 1
        return action
