"""RayJob bodies rendered from the Helm chart (helm/b1k-train) with the real Helm engine, so that `b1k-train k8s`
and `helm install` build the same object from the same templates and values schema."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

CHART_ENV = "B1K_CHART_DIR"  # the image sets it; a source checkout finds helm/b1k-train next to trainer/
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 44  # KubeRay appends "-<5 chars>" for the cluster and "-head-<5 chars>" for pods; labels stop at 63


def chart_dir() -> Path:
    """The b1k-train chart: $B1K_CHART_DIR, else helm/b1k-train of this source tree."""
    path = Path(os.environ.get(CHART_ENV) or Path(__file__).resolve().parents[2] / "helm" / "b1k-train")
    if not (path / "Chart.yaml").is_file():
        raise FileNotFoundError(f"the b1k-train Helm chart is not at {path}: set {CHART_ENV} to the helm/b1k-train "
                                f"directory of the b1k-train source")
    return path


def job_name(*parts: str) -> str:
    """A valid RayJob name from `parts` ("pipe", "ft-ckpt1" -> "pipe-ft-ckpt1"), or ValueError naming the fix."""
    name = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
    if not NAME_RE.match(name) or len(name) > MAX_NAME:
        raise ValueError(f"{'-'.join(parts)!r} cannot name a RayJob ({name!r}): use at most {MAX_NAME} lowercase "
                         f"letters, digits and '-', starting with a letter")
    return name


def load_values(*files: str | None) -> dict[str, Any]:
    """The chart values of the given YAML files merged in order (later files win), like `helm -f a -f b`."""
    merged: dict[str, Any] = {}
    for f in files:
        if not f:
            continue
        try:
            with open(f) as fh:
                data = yaml.safe_load(fh) or {}
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--values {f}: no such file") from e
        if not isinstance(data, dict):
            raise ValueError(f"--values {f}: expected a YAML mapping of chart values, got {type(data).__name__}")
        merged = deep_merge(merged, data)
    return merged


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def render_rayjob(values: dict[str, Any], *, name: str, command: str, recipe: str, run_name: str,
                  overrides: list[str] = (), train_workers: str = "", extra_args: list[str] = (),
                  release: str = "b1k-train",
                  namespace: str = "default", labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The RayJob the chart renders for `values` with this job's command, recipe, run name and overrides.

    The release name must be the installed chart's (the MLflow Service URI is derived from it). The chart's values
    schema and cross-field checks apply; their errors come back as ValueError naming the key.
    """
    import helm_python

    job = {"enabled": True, "mode": "rayjob", "command": command, "recipe": recipe, "runName": run_name,
           "jobName": job_name(name), "overrides": list(overrides), "extraArgs": list(extra_args)}
    if train_workers:
        job["trainWorkers"] = train_workers
    # Only the RayJob is wanted: switching the server off also skips its replica/PDB checks.
    vals = deep_merge(values, {"training": job, "serving": {"enabled": False}})
    chart = helm_python.Chart.load(str(chart_dir()))
    try:
        chart.validate_schema(chart.merge_values(vals))
        rendered = chart.render(vals, name=release, namespace=namespace)
    except (helm_python.HelmValuesError, helm_python.HelmRenderError) as e:
        raise ValueError(f"the chart values are invalid for this job: {e}") from e
    docs = [d for path, text in rendered.items() if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    (body,) = [d for d in docs if d.get("kind") == "RayJob"]
    body["metadata"]["labels"].update(labels or {})
    return body
