"""No credential leaks from a debug training run: secrets planted in the environment (AWS secret key, MLflow token,
API keys, a password) and in the tracking URI the run is configured with appear in none of its output, our
processes' log files, the objects it wrote to S3, or its MLflow params, tags and artifacts. (The pipeline run's
scan is in test_ray_job.py.) Also: loading a malicious pickle never runs its code."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from tests.secret_scan import find, log_blobs, mlflow_blobs, planted, storage_blobs, with_password

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_debug_run_leaks_no_planted_secret(s3_bucket, s3fs_client, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    secrets = planted()
    tracking = with_password(mlflow_server, secrets["LAB_DB_PASSWORD"])
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    env = {**os.environ, **secrets, "MLFLOW_TRACKING_URI": tracking, "RAY_TMPDIR": str(ray_tmp)}
    store = f"{s3_bucket}/secrets"
    run = subprocess.run([sys.executable, "-m", "trainer", "-v", "fit", "pi_behavior_debug", "--run-name", "dbg",
                          "--storage", store, "--set", "num_steps=4", "--set", "save_every=2", "--set", "log_every=1",
                          "--experiment", "itest-secrets"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("itest-secrets").experiment_id])
    assert runs and runs[0].data.params["num_steps"] == "4"  # tracked through the credentialed URI
    blobs = {"stdout": run.stdout.encode(), "stderr": run.stderr.encode()}
    blobs.update(storage_blobs(s3fs_client, store))
    blobs.update(log_blobs(ray_tmp))
    shutil.rmtree(ray_tmp, ignore_errors=True)
    blobs.update(mlflow_blobs(client, [r.info.run_id for r in runs]))
    assert any(k.startswith("log ") and "worker-" in k for k in blobs), sorted(blobs)[:20]  # workers' logs read
    assert any(k.endswith("export/config.json") for k in blobs) and len(blobs) > 30
    assert find(list(secrets.values()), blobs) == []


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['B1K_PWNED_MARKER']}",))


def test_optimizer_state_loading_refuses_a_malicious_pickle(tmp_path, monkeypatch):
    from checkpoints.safe_load import load_torch_state

    marker = tmp_path / "pwned"
    monkeypatch.setenv("B1K_PWNED_MARKER", str(marker))
    evil = tmp_path / "optimizer.pt"
    evil.write_bytes(pickle.dumps({"state": _Exploit()}))
    with pytest.raises(ValueError, match="refusing to unpickle .*optimizer.pt"):
        load_torch_state(str(evil))
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save({"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-3}]}, good)
    assert torch.equal(load_torch_state(str(good))["state"][0]["exp_avg"], torch.ones(3))
