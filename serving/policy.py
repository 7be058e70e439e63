"""One served model: a trainer export rebuilt into the model, the training transforms and the serving config.

The artifact is self-contained (checkpoints/export.py): weights, architecture, norm_stats.json (normalisation,
noise correlation and the gripper-closure table) and serving.json. `infer` runs a batch of requests from any
number of connections; each request's noise comes from its own key, and the inpainting guard is decided per
request, so a client's actions do not depend on what else is in the batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import torch

from data_loaders import storage
from data_loaders.behavior_facts import ACTION_DIM, ACTION_HORIZON
from data_loaders.transforms import Normalizer
from serving.config import SERVING_FILE, ServingConfig
from serving.control.gripper import GripperCorrection
from serving.control.session import InferenceRequest, InferenceResult, PolicyInfo

log = logging.getLogger(__name__)


def noise_seed(key: tuple[int, ...]) -> int:
    """A 63-bit generator seed that is a pure function of the key (stable across processes and Python runs)."""
    digest = hashlib.blake2b(json.dumps(list(key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def read_serving_config(url: str, overrides: list[str] | None = None) -> ServingConfig:
    """serving.json of an export (defaults when the export predates it), with `key=value` overrides."""
    from checkpoints.json_fields import load_json_object
    from trainer.overrides import apply_overrides

    fs, path = storage.resolve(url)
    target, where = storage.join(path, SERVING_FILE), storage.join(url, SERVING_FILE)
    cfg = ServingConfig.from_dict(load_json_object(fs.cat_file(target), where=where), where=where) \
        if fs.exists(target) else ServingConfig()
    return apply_overrides(cfg, list(overrides or []))


class ServingPolicy:
    def __init__(self, model: torch.nn.Module, normalizer: Normalizer, cfg: ServingConfig, *, name: str,
                 correction: GripperCorrection | None, global_step: int | None = None) -> None:
        self.model, self.normalizer, self.cfg, self.name = model, normalizer, cfg, name
        self.correction = correction
        self.global_step = global_step
        self.device = next(model.parameters()).device
        self.nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])

    @classmethod
    def load(cls, url: str, *, name: str | None = None, overrides: list[str] | None = None,
             device: str = "cpu") -> ServingPolicy:
        """Load an export directory, s3:// prefix or models:/ URI (FileNotFoundError/ValueError name the fix)."""
        from checkpoints.export_reader import load_pi_behavior, read_config
        from checkpoints.model_uri import resolve_model_url

        local = resolve_model_url(url)
        cfg = read_serving_config(local, overrides)
        doc = read_config(local)
        if doc["model_type"] == "xvla" or doc.get("type") == "xvla":  # ours, X-VLA published; LeRobot
            from serving.policy_xvla import XVLAServingPolicy

            return XVLAServingPolicy.load(local, cfg, name=name or url, device=device)
        model, norm, _, config = load_pi_behavior(local, device=device)
        correction = None
        if norm.gripper_closure is None:
            if cfg.gripper_rule == "data":
                log.warning("%s: norm_stats.json has no gripper-closure table (stats computed before it existed); "
                            "the data-derived gripper rule is off. Recompute with `b1k-train data stats` and "
                            "re-export, or serve with --set gripper_rule=seed.", url)
        else:
            correction = GripperCorrection(norm.gripper_closure, cfg.closed_threshold, cfg.min_close_fraction)
        return cls(model, Normalizer.from_norm_stats(norm), cfg, name=name or url, correction=correction,
                   global_step=config.get("global_step"))

    @property
    def num_tasks(self) -> int:
        return self.model.cfg.num_tasks

    def info(self, task: int) -> PolicyInfo:
        return PolicyInfo(key=self.name, cfg=self.cfg, num_stages=int(self.model.cfg.task_num_stages[task]),
                          correction=self.correction if self.cfg.gripper_correction else None)

    def _normalized_kept(self, kept: np.ndarray, state: np.ndarray) -> np.ndarray:
        # Kept absolute rows go through the training transform with the *current* state (§4.1 step 1): deltas
        # w.r.t. today's state, then rows 0..k-1 of the per-timestep normalisation.
        k = kept.shape[0]
        rows = np.zeros((ACTION_HORIZON, ACTION_DIM), np.float32)
        rows[:k] = kept
        return self.normalizer.actions(rows, state)[:k]

    def _run(self, reqs: list[InferenceRequest]) -> tuple[np.ndarray, np.ndarray]:
        dev = self.device
        states = np.stack([r.state for r in reqs]).astype(np.float32)
        batch = {
            "images": torch.from_numpy(np.stack([r.images for r in reqs])).to(dev),
            "state": torch.from_numpy(self.normalizer.state(states)).to(dev),
            "task": torch.tensor([r.task for r in reqs], dtype=torch.long, device=dev),
            "stage": torch.tensor([r.stage for r in reqs], dtype=torch.long, device=dev),
        }
        noise = []
        for r in reqs:
            gen = torch.Generator(device=self.model.noise.chol_reg.device).manual_seed(noise_seed(r.noise_key))
            noise.append(self.model.noise.sample((1,), generator=gen))
        initial = None
        if reqs[0].kept is not None:
            # (B, k, 32): the normalizer already pads to the model's action dim.
            initial = torch.from_numpy(np.stack([self._normalized_kept(r.kept, r.state) for r in reqs])).to(dev)
        # bf16 autocast only on CUDA: the CPU path stays fp32 (and bit-reproducible).
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            x, logits = self.model.sample_actions(batch, num_steps=self.cfg.num_inference_steps,
                                                  initial_actions=initial, noise=torch.cat(noise),
                                                  per_sample_guard=True)
        actions = self.normalizer.unnormalize_actions(x.float().cpu().numpy(), states)
        return actions, logits.float().cpu().numpy()

    def infer(self, reqs: list[InferenceRequest]) -> list[InferenceResult]:
        """One chunk per request, in order. Requests with and without kept rows run as two sub-batches."""
        t0 = time.perf_counter()
        out: list[InferenceResult | None] = [None] * len(reqs)
        for with_kept in (False, True):
            idx = [i for i, r in enumerate(reqs) if (r.kept is not None) == with_kept]
            if not idx:
                continue
            actions, logits = self._run([reqs[i] for i in idx])
            for j, i in enumerate(idx):
                out[i] = InferenceResult(actions=actions[j], stage_logits=logits[j])
        ms = (time.perf_counter() - t0) * 1e3
        return [InferenceResult(r.actions, r.stage_logits, ms) for r in out if r is not None]
