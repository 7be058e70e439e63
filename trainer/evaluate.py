"""Offline action metrics against the mean-action baseline (normalised units, real dims only)."""

from __future__ import annotations

import torch

from data_loaders.behavior_facts import ACTION_DIM


@torch.no_grad()
def action_mse_vs_mean_baseline(model, batches: list[dict[str, torch.Tensor]], *, seed: int = 0
                                ) -> dict[str, float]:
    """MSE of the model's expected action chunk and of the mean-action baseline over `batches`.

    The baseline predicts the training mean, which is 0 in per-timestep-normalised units; only valid chunk
    steps (action_mask) and the 23 real dims count.
    """
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
