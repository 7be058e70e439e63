"""An X-VLA export served by the same server: the seed's checkpoint layout plus norm_stats.json (gripper-closure
table), serving.json and instructions.json (the task sentences the model was trained with).

The server knows the task, not the current skill: the instruction is the task sentence, and the skill prompt comes
from the model's own classifier (generate_actions without skill_id), as the variant is meant to be used.

X-VLA has no stage head and no inpainting, and pi-behavior's inference tricks are not part of it: its serving
settings (serving/config.py XVLA_SETTINGS, written by its exports, applied to a directory without serving.json) turn
off inpainting, stage voting, the 26->20 speed-up and both correction rules; chunking stays. The model is served
as having no stage source (PolicyInfo.stage_source False): the radio rule never runs, and a gripper rule asked for
with --set gripper_rule=data|seed is stage-free (it fires only where fully closed is rare in every stage of the
task), so no rule ever reads the placeholder stage.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import torch

from data_loaders.behavior_facts import MAX_NUM_STAGES, TASK_NUM_STAGES
from data_loaders.instructions import task_sentence
from serving.config import ServingConfig, xvla_settings
from serving.control.gripper import GripperCorrection
from serving.control.session import InferenceRequest, InferenceResult, PolicyInfo

log = logging.getLogger(__name__)
INSTRUCTIONS_FILE = "instructions.json"


class XVLAServingPolicy:
    def __init__(self, model, tokenizer, cfg: ServingConfig, *, name: str, instructions: dict[int, str],
                 correction: GripperCorrection | None, global_step: int | None = None) -> None:
        if cfg.inpainting or cfg.stage_voting:
            raise ValueError(f"{name}: X-VLA has no inpainting and no stage head; serve it with "
                             f"--set inpainting=false --set stage_voting=false (its serving.json says so)")
        self.model, self.tokenizer, self.cfg, self.name = model, tokenizer, cfg, name
        self.instructions, self.correction, self.global_step = instructions, correction, global_step
        self.device = next(model.parameters()).device
        self.nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])

    @classmethod
    def load(cls, local_dir: str, cfg: ServingConfig, *, name: str, device: str = "cpu") -> XVLAServingPolicy:
        import dataclasses

        from data_loaders.norm_stats import NormStats
        from models.xvla.checkpoint import load_checkpoint, localize
        from models.xvla.tokenizer import load_tokenizer
        from serving.config import SERVING_FILE

        local_dir = localize(local_dir)  # s3:// -> a local copy of the files
        model, state = load_checkpoint(local_dir, device=device)
        if not os.path.exists(os.path.join(local_dir, SERVING_FILE)):
            # An X-VLA directory that is no export of ours (LeRobot's, X-VLA's published): the defaults are
            # pi-behavior's; X-VLA's replace every one a --set did not move.
            xvla = xvla_settings(cfg)
            moved = {f.name: getattr(xvla, f.name) for f in dataclasses.fields(cfg)
                     if getattr(xvla, f.name) != getattr(cfg, f.name)}
            if moved:
                log.info("%s: no %s; X-VLA's serving settings %s", local_dir, SERVING_FILE, moved)
            cfg = xvla
        if cfg.gripper_correction or cfg.radio_rule:
            log.info("%s: X-VLA has no stage source: the radio rule is off and the gripper rule (%s) stage-free",
                     local_dir, cfg.gripper_rule)
        instructions: dict[int, str] = {}
        path = os.path.join(local_dir, INSTRUCTIONS_FILE)
        if os.path.exists(path):
            with open(path) as f:
                instructions = {int(k): v for k, v in json.load(f).items()}
        correction = None
        norm_path = os.path.join(local_dir, "norm_stats.json")
        if os.path.exists(norm_path):
            norm = NormStats.load(norm_path)
            if norm.gripper_closure is not None:
                correction = GripperCorrection(norm.gripper_closure, cfg.closed_threshold, cfg.min_close_fraction)
        if correction is None:
            log.warning("%s: no gripper-closure table in the export; the gripper correction is off", local_dir)
        return cls(model, load_tokenizer(local_dir), cfg, name=name, instructions=instructions,
                   correction=correction, global_step=state.get("global_step"))

    @property
    def num_tasks(self) -> int:
        return self.model.cfg.num_tasks

    def info(self, task: int) -> PolicyInfo:
        return PolicyInfo(key=self.name, cfg=self.cfg, num_stages=int(TASK_NUM_STAGES[task]),
                          correction=self.correction if self.cfg.gripper_correction else None, stage_source=False)

    def infer(self, reqs: list[InferenceRequest]) -> list[InferenceResult]:
        """One absolute (30, 23) chunk per request; each request's noise is a function of its key."""
        from models.xvla.tokenizer import encode
        from serving.policy import noise_seed

        t0 = time.perf_counter()
        cfg, dev = self.model.cfg, self.device
        ids = encode(self.tokenizer, [task_sentence(r.task, self.instructions) for r in reqs], cfg.max_text_len)
        noise = torch.cat([torch.randn((1, cfg.num_actions, cfg.max_action_dim),
                                       generator=torch.Generator().manual_seed(noise_seed(r.noise_key)))
                           for r in reqs])
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            actions = self.model.generate_actions(
                images=torch.from_numpy(np.stack([r.images for r in reqs])).to(dev),
                input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
                task_id=torch.tensor([r.task for r in reqs], device=dev),
                proprio=torch.from_numpy(np.stack([r.state for r in reqs]).astype(np.float32)).to(dev),
                steps=cfg.num_sampling_steps, noise=noise)
        ms = (time.perf_counter() - t0) * 1e3
        out = actions.float().cpu().numpy()
        # No stage head: placeholder logits, never read by a rule (stage_source=False) nor voted on.
        return [InferenceResult(actions=out[i], stage_logits=np.zeros(MAX_NUM_STAGES, np.float32), infer_ms=ms)
                for i in range(len(reqs))]
