"""The on-Kubernetes pipeline: each training stage (pretrain, every subset fine-tune) runs as its own RayJob, sized
by its own chart values, while this process orchestrates, evaluates and registers."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from trainer.config import TrainConfig
from trainer.k8s import jobs
from trainer.k8s.api import KubeApi
from trainer.k8s.errors import JobFailed, NotFound
from trainer.k8s.manifests import deep_merge, job_name, render_rayjob
from trainer.overrides import flatten
from trainer.supervisor import RunFailedError


def override_text(value: Any) -> str:
    """`value` as `--set` parses it back (trainer/overrides.py)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return json.dumps(list(value), separators=(",", ":"))
    return str(value)


def stage_overrides(cfg: TrainConfig) -> list[str]:
    """The `--set` arguments that turn recipe `cfg.recipe` into `cfg` (only the fields that differ)."""
    from trainer.recipes import get_recipe

    base, want = flatten(get_recipe(cfg.recipe)), flatten(cfg)
    return [f"{k}={override_text(v)}" for k, v in want.items() if base.get(k) != v]


@dataclasses.dataclass
class K8sStageRunner:
    """Runs pipeline stages as RayJobs rendered from the chart with `values` (pretrain) and `values` merged with
    `finetune_values` (fine-tunes: their own, usually smaller, GPU pool)."""

    api: KubeApi
    values: dict[str, Any]
    finetune_values: dict[str, Any] = dataclasses.field(default_factory=dict)
    release: str = "b1k-train"
    poll_s: float = 5.0
    out: Callable[[str], None] = print

    def fit(self, stage, *, pipeline: str, root: str, experiment: str, tracking_uri: str) -> None:
        """Train `stage` to completion on its RayJob: submit it, or attach to the one already running (a re-run of
        the pipeline after its driver died), or replace a failed one (the new job resumes from the stage's last
        checkpoint). Raises RunFailedError when the job fails after its retries (spec.backoffLimit)."""
        name = job_name(pipeline, stage.run_name)
        try:
            existing = self.api.get_rayjob(name)
        except NotFound:
            existing = None
        if existing is not None:
            state = (existing.get("status") or {}).get("jobDeploymentStatus", "")
            if state in jobs.TERMINAL:
                self.out(f"== {stage.name}: RayJob {name} ended {state} earlier; replacing it (resumes from the last "
                         f"checkpoint)")
                self._delete_and_wait(name)
                existing = None
            else:
                self.out(f"== {stage.name}: RayJob {name} is {state or 'pending'}; following it")
        if existing is None:
            body = self._body(stage, name=name, pipeline=pipeline, root=root, experiment=experiment,
                              tracking_uri=tracking_uri)
            jobs.submit(self.api, body)
            self.out(f"== {stage.name}: submitted RayJob {self.api.namespace}/{name}")
        try:
            jobs.follow(self.api, name, poll_s=self.poll_s, out=lambda line: self.out(f"   [{stage.name}] {line}"))
        except JobFailed as e:
            raise RunFailedError(f"stage {stage.name}: {e}") from e

    def _body(self, stage, *, name: str, pipeline: str, root: str, experiment: str,
              tracking_uri: str) -> dict[str, Any]:
        values = self.values if stage.name == "pretrain" else deep_merge(self.values, self.finetune_values)
        # The stage's storage is the pipeline root, and its runs are tracked where the pipeline's are.
        values = deep_merge(values, {"storage": {"url": root}})
        mlflow = values.get("mlflow") or {}
        if mlflow.get("enabled") is False and not mlflow.get("externalUri"):
            values = deep_merge(values, {"mlflow": {"externalUri": tracking_uri}})
        lo, hi = stage.workers
        return render_rayjob(
            values, name=name, command="fit", recipe=stage.cfg.recipe, run_name=stage.run_name,
            overrides=stage_overrides(stage.cfg), train_workers=f"{lo}:{hi}" if lo != hi else str(hi),
            release=self.release, namespace=self.api.namespace,
            extra_args=[f"--experiment={experiment}", f"--tracking-run-name={pipeline}/{stage.run_name}"],
            labels={"b1k-train/pipeline": pipeline, "b1k-train/stage": stage.name})

    def _delete_and_wait(self, name: str, timeout_s: float = 300.0) -> None:
        self.api.delete_rayjob(name)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.api.get_rayjob(name)
            except NotFound:
                return
            time.sleep(1.0)
        raise RunFailedError(f"RayJob {self.api.namespace}/{name} was not deleted within {timeout_s:.0f} s "
                             f"(a stuck finalizer?); delete it by hand and re-run")
