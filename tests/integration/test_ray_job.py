"""`ray job submit` of the pipeline to a running Ray cluster (a head started with `ray start`, as on a VM or in
KubeRay), with storage on the S3 server and the registry on the MLflow server passed in the job's runtime env."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from tests.integration.conftest import free_port
from tests.secret_scan import find, log_blobs, mlflow_blobs, planted, storage_blobs, with_password

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _ray_bin() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ray")


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1 started by `ray start`; yields (dashboard (job API) address, temp dir). Its processes
    are found by their private temp dir and killed at the end, leaving other clusters on the machine alone."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    before = {p.pid for p in psutil.process_iter()}
    dash = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    cmd = [_ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", "--include-dashboard=true",
           # Every fixed default port gets a free one: another cluster on the machine (the session's) already
           # holds the defaults, e.g. the dashboard agent's 52365, and the job API then has no agent to talk to.
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--ray-client-server-port={free_port()}"]
    started = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dash}", temp_dir
    finally:
        # The head's processes name the temp dir; its workers rename themselves ("ray::IDLE") and the job driver
        # does not, so they are found as Ray processes new since the fixture started. Left alive, orphaned workers
        # spin reconnecting to the dead GCS and slow every later test down.
        procs = []
        for p in psutil.process_iter(["cmdline", "name"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                ray_like = (p.info["name"] or "").startswith(("ray::", "raylet", "gcs_server")) or "ray::" in cmd \
                    or "-m trainer pipeline" in cmd
                if temp_dir in cmd or (p.pid not in before and ray_like):
                    procs.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=20)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_pipeline_and_registers(ray_head, s3_bucket, s3_endpoint, s3fs_client,
                                                        mlflow_server, tmp_path):
    from mlflow import MlflowClient

    ray_head, ray_temp = ray_head
    store = f"{s3_bucket}/jobs"
    # Secrets planted in the job's environment and in its tracking URI: none may leak (scanned at the end).
    secrets = planted()
    tracking = with_password(mlflow_server, secrets["LAB_DB_PASSWORD"])
    runtime_env = {"env_vars": {
        **secrets, "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_TRACKING_URI": tracking,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}}
    (tmp_path / "runtime_env.json").write_text(json.dumps(runtime_env))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    submission_id = f"b1k-pipeline-{int(time.time())}"
    submit = [_ray_bin(), "job", "submit", "--address", ray_head, "--submission-id", submission_id,
              "--runtime-env-json", json.dumps(runtime_env), "--entrypoint-num-cpus", "0", "--no-wait", "--",
              sys.executable, "-m", "trainer", "pipeline", "pi_behavior_debug_2stage", "--run-name", "job",
              "--storage", store, "--set", "train.num_steps=4", "--set", "finetune.num_steps=2",
              "--set", "subsets=all:0,1,40", "--set", "eval.include_pretrain=false", "--set", "model_prefix=itest-job"]
    # (Not --tracking-uri with the password: a command line is public, Ray echoes it into the job log and `ps`
    # shows it; credentials belong in the environment, which is what this test plants.)
    # A fresh head's dashboard agent can take a while after `ray start` returns; the job API answers 500 "No
    # available agent" until then. A user retries, so does the test; any other error fails at once.
    deadline = time.monotonic() + 180
    while True:
        out = subprocess.run(submit, capture_output=True, text=True, timeout=120, env=env)
        if out.returncode == 0 or "No available agent" not in out.stderr or time.monotonic() > deadline:
            break
        time.sleep(3.0)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(ray_head)
    deadline = time.monotonic() + 600
    status = jobs.get_job_status(submission_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.monotonic() < deadline:
        time.sleep(2.0)
        status = jobs.get_job_status(submission_id)
    logs = jobs.get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    # The job attached to the running cluster (it did not start its own) and went through every stage.
    assert "Connecting to existing Ray cluster" in logs or "connected to Ray cluster" in logs.lower(), logs[:3000]
    assert "== register: itest-job-all version 1 (new, @challenger)" in logs

    client = MlflowClient(mlflow_server)
    mv = client.get_model_version_by_alias("itest-job-all", "challenger")
    assert json.loads(mv.tags["b1k.tasks"]) == [0, 1, 40] and mv.tags["b1k.pipeline"] == "job"
    mapping = json.loads(s3fs_client.cat(f"{store}/job/task_checkpoint_mapping.json"))
    assert mapping["checkpoints"]["all"]["tasks"] == [0, 1, 40]
    assert mapping["checkpoints"]["all"]["model_uri"] == "models:/itest-job-all/1"

    # No planted secret anywhere: driver and worker output, every object in storage, MLflow params, tags,
    # artifacts and model versions. Only the masked form of the tracking URI may appear.
    run_ids = [r.info.run_id for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "attributes.run_name LIKE 'job%'")]
    assert len(run_ids) >= 2, run_ids  # the pipeline's own run and the stage's training run
    blobs = {"job logs": logs.encode()}
    blobs.update(log_blobs(ray_temp))
    blobs.update(storage_blobs(s3fs_client, store))
    blobs.update(mlflow_blobs(client, run_ids, ["itest-job-all"]))
    assert any("worker-" in k for k in blobs) and any(k.endswith("export/model.safetensors") for k in blobs)
    assert find(list(secrets.values()), blobs) == []
    assert "b1k:***@127.0.0.1" in logs  # the pipeline prints its tracking URI: masked
