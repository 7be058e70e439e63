"""`b1k-train pipeline --on-k8s`: each training stage is a RayJob created through the (fake, 127.0.0.1) Kubernetes
API and run for real by the fake KubeRay controller (the RayJob's own entrypoint as a subprocess, with a local
Ray cluster, the moto S3 server and the MLflow server), while the pipeline process evaluates and registers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.fake_kube.apiserver import FakeKube
from tests.fake_kube.kuberay import FakeKubeRay

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PREFIX = "itest-k8s"


def _cmd(store: str, kubeconfig: str, values: str) -> list[str]:
    return [sys.executable, "-m", "trainer", "pipeline", "pi_behavior_debug_2stage", "--run-name", "kp",
            "--storage", store, "--set", "train.num_steps=4", "--set", "train.save_every=2",
            "--set", "finetune.num_steps=2", "--set", "finetune.save_every=2", "--set", f"model_prefix={PREFIX}",
            "--set", "eval.include_pretrain=false", "--on-k8s", "--kubeconfig", kubeconfig, "--values", values,
            "--poll", "1"]


def test_pipeline_stages_run_as_rayjobs_with_concurrent_finetunes_and_a_retry(s3_bucket, s3_endpoint, s3fs_client,
                                                                            mlflow_server, tmp_path):
    from mlflow import MlflowClient

    kube = FakeKube().start()
    ray = FakeKubeRay(kube, executor="local")
    ray.fail_first.add("kp-ft-ckpt4")  # its first attempt dies (a preempted node): KubeRay's backoffLimit retries
    try:
        kubeconfig = kube.write_kubeconfig(str(tmp_path / "kubeconfig"))
        values = tmp_path / "values.yaml"
        values.write_text(yaml.safe_dump({
            "storage": {"s3": {"endpointUrl": s3_endpoint}},
            "mlflow": {"enabled": False, "externalUri": mlflow_server},
            "training": {"rayJob": {"backoffLimit": 1}, "workers": {"gpusPerWorker": 0}}}))
        store = f"{s3_bucket}/pipes"
        env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
        first = subprocess.run(_cmd(store, kubeconfig, str(values)), capture_output=True, text=True, timeout=900,
                               env=env)
        out = first.stdout + first.stderr
        assert first.returncode == 0, out[-5000:]

        jobs = {j["metadata"]["name"]: j for j in kube.list("rayjobs", "ml")}
        assert sorted(jobs) == ["kp-ft-ckpt1", "kp-ft-ckpt4", "kp-pretrain"]
        for name, job in jobs.items():
            assert job["status"]["jobDeploymentStatus"] == "Complete", (name, job["status"])
            assert job["metadata"]["labels"]["b1k-train/pipeline"] == "kp"
            argv = job["spec"]["entrypoint"]
            assert argv.startswith(f"b1k-train fit pi_behavior_debug --run-name {name[3:]} --storage '{store}/kp'")
            assert f"'--tracking-run-name=kp/{name[3:]}'" in argv
        ft1 = jobs["kp-ft-ckpt1"]["spec"]["entrypoint"]
        assert f"'init_from=export:{store}/kp/pretrain/export'" in ft1 and "'num_steps=2'" in ft1
        assert jobs["kp-ft-ckpt4"]["status"]["failed"] == 1  # retried once, then complete
        assert "   [ckpt4] kp-ft-ckpt4: Complete, job SUCCEEDED, workers 1/1, failed attempts 1" in out, out[-3000:]
        assert "== fine-tunes ['ckpt1', 'ckpt4']: 2 at a time, each as its own RayJob" in out

        # The fine-tunes overlapped: each started before the other finished.
        spans = {}
        for name, t in ray.started:
            spans.setdefault(name, [t, None])
        for name, t in ray.finished:
            spans[name][1] = t
        (s1, e1), (s4, e4) = spans["kp-ft-ckpt1"], spans["kp-ft-ckpt4"]
        assert s1 < e4 and s4 < e1, spans
        assert spans["kp-pretrain"][1] <= min(s1, s4)  # and both after the pretrain

        # Evaluated and registered by the pipeline process; the mapping covers every task once.
        client = MlflowClient(mlflow_server)
        for stage in ("ckpt1", "ckpt4"):
            (mv,) = client.search_model_versions(f"name='{PREFIX}-{stage}'")
            assert mv.tags["b1k.stage"] == stage and float(mv.tags["b1k.eval.action_mse"]) > 0
            assert mv.source == f"runs:/{mv.run_id}/export"
            assert client.get_run(mv.run_id).info.run_name == f"kp/ft-{stage}"
        mapping = json.loads(s3fs_client.cat(f"{store}/kp/task_checkpoint_mapping.json"))
        assert sorted(t for e in mapping["checkpoints"].values() for t in e["tasks"]) == [0, 1, 40]
        # (Re-running skips finished stages before any runner is asked: test_pipeline proves that path.)
    finally:
        for name, _ in list(ray.started):
            kube.delete("rayjobs", "ml", name)  # stops any executor still running
        kube.stop()
