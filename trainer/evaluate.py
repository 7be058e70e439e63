"""Offline evaluation on held-out episodes, per task, against a mean-action baseline.

Metrics are in the model's normalised action units (per-timestep z-scores over the 23 real dims), where the
training mean is 0, so the mean-action baseline predicts 0 everywhere. For each task:

    action_mse                 over valid chunk steps and real dims
    action_mse_per_step [30]   per horizon step (how error grows along the chunk)
    action_mse_per_group       base (3), torso (4), arms (2 x 7), grippers (2 x 1)
    stage_acc                  the stage head's argmax against the time-based stage label

and the same under "baseline" (stage: the task's most frequent held-out label, an optimistic constant guess).
Actions come from the policy's own sampler (what the server runs). Each sample's noise comes from a generator seeded
by (seed, task, episode, frame), so the numbers do not depend on the batch size, the order of the samples or which
other samples share a batch (the policy server keys its noise by request the same way).

Models trained on different data normalise differently. To compare two of them, `units_of` expresses one model's
errors in the other's normalised units (exact: normalisation is affine per horizon step and dim), while each
model still sees inputs normalised its own way.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Callable

import numpy as np
import torch

from data_loaders.behavior_facts import ACTION_DIM, ACTION_GROUPS

log = logging.getLogger(__name__)

GROUPS: dict[str, list[int]] = {
    "base": list(range(*ACTION_GROUPS["base"].indices(ACTION_DIM))),
    "torso": list(range(*ACTION_GROUPS["torso"].indices(ACTION_DIM))),
    "arms": [*range(*ACTION_GROUPS["left_arm"].indices(ACTION_DIM)),
             *range(*ACTION_GROUPS["right_arm"].indices(ACTION_DIM))],
    "grippers": [*range(*ACTION_GROUPS["left_gripper"].indices(ACTION_DIM)),
                 *range(*ACTION_GROUPS["right_gripper"].indices(ACTION_DIM))],
}


def sample_seed(seed: int, task: int, episode: int, frame: int) -> int:
    """A 63-bit generator seed that is a pure function of the evaluation seed and the sample's identity."""
    digest = hashlib.blake2b(f"{seed}/{task}/{episode}/{frame}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def keyed_noise(draw: Callable[[torch.Generator], torch.Tensor], batch: dict[str, torch.Tensor], *, seed: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, ...) sampler noise whose row i is `draw(generator)` (one sample, leading dim 1) from a generator seeded by
    sample i's (task, episode, frame): a sample gets the same noise in any batch, at any position.

    pi-behavior: draw = lambda g: model.noise.sample((1,), generator=g) (device: model.noise.chol_reg.device);
    X-VLA: draw = lambda g: torch.randn((1, cfg.num_actions, cfg.max_action_dim), generator=g, device=device).
    """
    keys = zip(batch["task"].tolist(), batch["episode"].tolist(), batch["frame"].tolist())
    return torch.cat([draw(torch.Generator(device=device).manual_seed(sample_seed(seed, *k))) for k in keys])


@torch.no_grad()
def action_mse_vs_mean_baseline(model, batches: list[dict[str, torch.Tensor]], *, seed: int = 0
                                ) -> dict[str, float]:
    """MSE of the model's expected action chunk and of the mean-action baseline over `batches` (all tasks)."""
    was_training = model.training
    model.eval()
    sq_model = sq_base = count = 0.0
    for i, batch in enumerate(batches):
        pred = model.expected_actions(batch, generator=torch.Generator().manual_seed(seed + i))
        target = batch["actions"][..., :ACTION_DIM].float()
        mask = batch["action_mask"][..., None].float()
        sq_model += float((((pred[..., :ACTION_DIM] - target) ** 2) * mask).sum())
        sq_base += float(((target**2) * mask).sum())
        count += float(mask.sum()) * ACTION_DIM
    model.train(was_training)
    return {"action_mse": sq_model / count, "baseline_mse": sq_base / count}


class _TaskAccumulator:
    """Sums of squared errors per (horizon step, dim) for the model and the baseline, plus stage counts."""

    def __init__(self, horizon: int, num_stages: int):
        self.sq_model = np.zeros((horizon, ACTION_DIM))
        self.sq_base = np.zeros((horizon, ACTION_DIM))
        self.count = np.zeros(horizon)  # valid (sample, step) pairs
        self.stage_correct = 0
        self.stage_labels = np.zeros(num_stages, dtype=np.int64)
        self.samples = 0

    def add(self, pred: np.ndarray, target: np.ndarray, mask: np.ndarray, stage_pred: np.ndarray,
            stage: np.ndarray) -> None:
        m = mask[..., None].astype(np.float64)
        self.sq_model += (((pred - target) ** 2) * m).sum(0)
        self.sq_base += ((target**2) * m).sum(0)
        self.count += mask.sum(0)
        self.stage_correct += int((stage_pred == stage).sum())
        np.add.at(self.stage_labels, stage, 1)
        self.samples += len(stage)

    def _scores(self, sq: np.ndarray, stage_acc: float) -> dict[str, Any]:
        steps = np.maximum(self.count, 1)[:, None]
        total = max(float(self.count.sum()), 1.0)
        return {
            "action_mse": float(sq.sum() / (total * ACTION_DIM)),
            "action_mse_per_step": [float(v) for v in (sq / steps).mean(1)],
            "action_mse_per_group": {g: float(sq[:, dims].sum() / (total * len(dims))) for g, dims in GROUPS.items()},
            "stage_acc": stage_acc,
        }

    def result(self) -> dict[str, Any]:
        n = max(self.samples, 1)
        out = {"num_samples": self.samples, **self._scores(self.sq_model, self.stage_correct / n)}
        out["baseline"] = self._scores(self.sq_base, float(self.stage_labels.max()) / n)
        return out


def _mean_over_tasks(per_task: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over tasks (each task counts the same, as in the challenge's q-score)."""
    def mean(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "action_mse": float(np.mean([r["action_mse"] for r in rows])),
            "action_mse_per_step": [float(v) for v in np.mean([r["action_mse_per_step"] for r in rows], axis=0)],
            "action_mse_per_group": {g: float(np.mean([r["action_mse_per_group"][g] for r in rows])) for g in GROUPS},
            "stage_acc": float(np.mean([r["stage_acc"] for r in rows])),
        }
    rows = list(per_task.values())
    return {"num_samples": int(sum(r["num_samples"] for r in rows)), **mean(rows),
            "baseline": mean([r["baseline"] for r in rows])}


def unit_conversion(model_norm, report_norm) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift), each (horizon, 23): an action normalised by `model_norm` is `x * scale + shift` in the units
    of `report_norm` (same raw delta action, other mean/std)."""
    from data_loaders.transforms import NORM_EPS, Normalizer

    a, b = Normalizer.from_norm_stats(model_norm), Normalizer.from_norm_stats(report_norm)
    sa, sb = a.action_std[:, :ACTION_DIM] + NORM_EPS, b.action_std[:, :ACTION_DIM] + NORM_EPS
    return (sa / sb).astype(np.float64), ((a.action_mean[:, :ACTION_DIM] - b.action_mean[:, :ACTION_DIM]) / sb
                                          ).astype(np.float64)


@torch.no_grad()
def evaluate_model(model, loader, *, tasks: set[int] | None = None, seed: int = 0,
                   num_inference_steps: int | None = None, device: torch.device | str = "cpu",
                   units: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Per-task and overall metrics of `model` over one pass of `loader` (a finite, non-augmented StreamLoader).

    Samples of tasks outside `tasks` are ignored. `units` = unit_conversion(...) reports errors in other units.
    Deterministic for a seed, whatever the loader's batch size and order (noise is keyed by sample: keyed_noise).
    """
    model.eval()
    horizon = model.cfg.action_horizon
    acc: dict[int, _TaskAccumulator] = {}
    t0, n = time.perf_counter(), 0
    for batch in loader:
        task = batch["task"]
        keep = torch.ones_like(task, dtype=torch.bool) if tasks is None else \
            torch.tensor([int(t) in tasks for t in task.tolist()])
        if not keep.any():
            continue
        batch = {k: (v[keep].to(device) if torch.is_tensor(v) and v.shape[:1] == keep.shape else v)
                 for k, v in batch.items()}
        noise_device = model.noise.chol_reg.device
        noise = keyed_noise(lambda g: model.noise.sample((1,), generator=g), batch, seed=seed, device=noise_device)
        pred, logits = model.sample_actions(batch, num_steps=num_inference_steps or None, noise=noise)
        pred = pred[..., :ACTION_DIM].float().cpu().numpy()
        target = batch["actions"][..., :ACTION_DIM].float().cpu().numpy()
        if units is not None:
            pred, target = pred * units[0] + units[1], target * units[0] + units[1]
        mask = batch["action_mask"].cpu().numpy().astype(bool)
        stage = batch["stage"].cpu().numpy()
        stage_pred = logits.argmax(-1).cpu().numpy()
        for t in np.unique(batch["task"].cpu().numpy()):
            rows = batch["task"].cpu().numpy() == t
            acc.setdefault(int(t), _TaskAccumulator(horizon, logits.shape[-1])).add(
                pred[rows], target[rows], mask[rows], stage_pred[rows], stage[rows])
        n += int(keep.sum())
    if not acc:
        raise ValueError(f"the evaluation data holds no samples of tasks {sorted(tasks or [])}")
    per_task = {str(t): a.result() for t, a in sorted(acc.items())}
    log.info("evaluated %d samples of %d tasks in %.1f s", n, len(per_task), time.perf_counter() - t0)
    return {"tasks": per_task, "overall": _mean_over_tasks(per_task)}


def norm_fingerprint(norm) -> str:
    """Identifies normalisation statistics: equal fingerprints, equal units."""
    import hashlib

    return hashlib.sha256(norm.to_json().encode()).hexdigest()[:16]


def evaluate_export(model_url: str, view_url: str, *, tasks: list[int] | None = None, batch_size: int = 32,
                    seed: int = 0, num_inference_steps: int = 0, units_of: str | None = None) -> dict[str, Any]:
    """Load a serving artifact (path, s3:// or models:/NAME@alias) and evaluate it on the manifest (view) at
    `view_url`, restricted to `tasks`; the artifact's own norm stats normalise the data, as in serving. With
    `units_of` (another export) errors are reported in that export's normalised units."""
    from checkpoints.export import load_exported
    from data_loaders.manifest import load_manifest
    from data_loaders.splits import view_fingerprint
    from data_loaders.stream import StreamConfig, StreamLoader

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, norm, _, config = load_exported(model_url, device=str(device))
    units = None
    if units_of is not None:
        from checkpoints.export import NORM_FILE
        from checkpoints.model_uri import resolve_model_url
        from data_loaders import storage
        from data_loaders.norm_stats import NormStats

        units = unit_conversion(norm, NormStats.load(storage.join(resolve_model_url(units_of), NORM_FILE)))
    loader = StreamLoader(view_url, StreamConfig(batch_size=batch_size, seed=seed, num_workers=1,
                                                 shards_per_group=1, num_epochs=1, train=False,
                                                 prefetch_batches=1), norm_stats=norm)
    result = evaluate_model(model, loader, tasks=set(tasks) if tasks else None, seed=seed,
                            num_inference_steps=num_inference_steps, device=device, units=units)
    manifest = load_manifest(view_url)
    result.update(model=model_url, view=view_url, split=view_fingerprint(list(manifest.raw["shards"])),
                  global_step=config.get("global_step"), units_of=units_of or model_url,
                  norm_stats=norm_fingerprint(norm))
    return result
