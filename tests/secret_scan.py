"""Planted secrets and the places a run could leak them: its output, our processes' log files, every object it
wrote to storage, and every MLflow param, tag and artifact of its runs and registered versions."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path


def planted() -> dict[str, str]:
    """Unique secret values, by the environment variable that carries each (all look secret by name)."""
    tag = uuid.uuid4().hex[:10]
    return {"AWS_SECRET_ACCESS_KEY": f"plantedAwsSecret{tag}", "MLFLOW_TRACKING_TOKEN": f"plantedMlflowToken{tag}",
            "B1K_API_KEYS": f"plantedApiKey{tag}xxxx", "LAB_DB_PASSWORD": f"plantedDbPassword{tag}"}


def with_password(url: str, password: str) -> str:
    """`url` with basic-auth userinfo (how a tracking URI carries a password)."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://b1k:{password}@{rest}"


def find(secrets: list[str], blobs: dict[str, bytes]) -> list[str]:
    """'where: …context…' for every planted secret found in any blob (the context shows what printed it)."""
    found = []
    for where, data in blobs.items():
        for s in secrets:
            i = data.find(s.encode())
            if i >= 0:
                found.append(f"{where}: ...{data[max(0, i - 200):i + 60].decode(errors='replace')}...")
    return found


def storage_blobs(fs, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix` (checkpoints, exports, config.json, pipeline JSON, views, data)."""
    return {f"storage {path}": fs.cat_file(path) for path in fs.find(prefix)}


def log_blobs(root: str, patterns: tuple[str, ...] = ("worker-*.out", "worker-*.err", "job-driver-*.log")
              ) -> dict[str, bytes]:
    """Our processes' log files under a Ray temp dir: training workers' and the job driver's output."""
    out = {}
    for pattern in patterns:
        for p in Path(root).rglob(pattern):
            out[f"log {p}"] = p.read_bytes()
    return out


def mlflow_blobs(client, run_ids: list[str], model_names: list[str] = ()) -> dict[str, bytes]:
    """Params, tags and downloaded artifacts of `run_ids`; tags and descriptions of the models' versions."""
    out: dict[str, bytes] = {}
    for run_id in run_ids:
        run = client.get_run(run_id)
        for k, v in {**run.data.params, **run.data.tags}.items():
            out[f"mlflow run {run_id} {k}"] = f"{k}={v}".encode()
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, "", tmp)
            for dirpath, _, files in os.walk(local):
                for name in files:
                    path = os.path.join(dirpath, name)
                    out[f"mlflow artifact {run_id}/{os.path.relpath(path, local)}"] = Path(path).read_bytes()
    for name in model_names:
        for mv in client.search_model_versions(f"name='{name}'"):
            text = repr(mv.tags) + (mv.description or "") + (mv.source or "")
            out[f"mlflow model {name}/{mv.version}"] = text.encode()
    return out
