"""`b1k-train k8s …` with the real `kubernetes` client against a Kubernetes API server on 127.0.0.1 (tests/fake_kube:
Kubernetes' status semantics and error bodies, RayJobs validated against the KubeRay CRD schema) and a fake KubeRay
controller that runs scripted job attempts."""

from __future__ import annotations

import time

import pytest
import yaml

from tests.chart.support import objects, render
from tests.fake_kube.apiserver import FakeKube
from tests.fake_kube.kuberay import Attempt, FakeKubeRay
from trainer.cli import main

pytestmark = pytest.mark.integration

VALUES = {"storage": {"url": "s3://lab/runs"}, "mlflow": {"enabled": False, "externalUri": "http://mlflow.lab:5000"},
          "training": {"rayJob": {"backoffLimit": 2}, "workers": {"gpusPerWorker": 0, "replicas": 2,
                                                                    "minReplicas": 2, "maxReplicas": 2}}}
PROGRESS = "[train] step {0}/40 ({1:.1f}%) loss 1.2000 action 0.9000 | 3.1 steps/s | eta 0m05s"


@pytest.fixture
def kube(tmp_path):
    k = FakeKube().start()
    ray = FakeKubeRay(k)
    k.kubeconfig = k.write_kubeconfig(str(tmp_path / "kubeconfig"))
    k.values = str(tmp_path / "values.yaml")
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(VALUES))
    k.ray = ray
    yield k
    k.stop()


def cli(kube, *args: str) -> int:
    return main(["k8s", *args, "--kubeconfig", kube.kubeconfig])


def submit(kube, name: str, *extra: str) -> int:
    return cli(kube, "submit", "pi_behavior_debug", "--run-name", name, "--values", kube.values,
               "--set", "num_steps=40", *extra)


def wait_for(kube, name: str, state: str, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = kube.get("rayjobs", "ml", name)
        if job and (job.get("status") or {}).get("jobDeploymentStatus") == state:
            return job
        time.sleep(0.05)
    raise AssertionError(f"{name} never reached {state}: {kube.get('rayjobs', 'ml', name)}")


def test_submit_renders_the_chart_and_follow_reports_progress_to_success(kube, capsys):
    kube.ray.scripts["dbg"] = [Attempt([PROGRESS.format(s, 100 * s / 40) for s in (10, 20, 40)] + ["[train] done"],
                                       seconds=4.0)]
    assert submit(kube, "dbg", "--follow", "--poll", "0.5") == 0
    out = capsys.readouterr().out
    job = kube.get("rayjobs", "ml", "dbg")
    # The chart's RayJob, with this job's command; the server validated it against the CRD schema.
    assert job["spec"]["entrypoint"] == ("b1k-train fit pi_behavior_debug --run-name dbg --storage 's3://lab/runs' "
                                         "--workers 2 --set 'num_steps=40'")
    labels = job["metadata"]["labels"]
    assert labels["b1k-train/run-name"] == "dbg" and labels["b1k-train/recipe"] == "pi_behavior_debug"
    assert labels["app.kubernetes.io/managed-by"] == "b1k-train"
    same = {**VALUES, "training": {**VALUES["training"], "runName": "dbg"}}
    helm_job = next(o for o in objects(render(same)) if o["kind"] == "RayJob")
    assert job["spec"]["rayClusterSpec"] == helm_job["spec"]["rayClusterSpec"]  # one source of truth
    assert "submitted RayJob ml/dbg" in out and "b1k-train k8s follow dbg -n ml" in out
    assert "dbg: Running, job RUNNING, workers 2/2" in out
    assert "| [train] step 10/40 (25.0%)" in out or "| [train] step 20/40 (50.0%)" in out  # live, not only the end
    assert out.rstrip().splitlines()[-1].startswith("dbg: Complete, job SUCCEEDED, workers 2/2 | [train] step 40/40")
    assert cli(kube, "status", "dbg") == 0
    assert capsys.readouterr().out.startswith("dbg: Complete, job SUCCEEDED")
    assert cli(kube, "list") == 0 and "dbg: Complete" in capsys.readouterr().out
    # The follow waited on a watch stream, not only on polling.
    assert any(m == "GET" and "/rayjobs?" in p and "watch=true" in p for m, p in kube.requests), kube.requests


def test_failed_attempt_is_retried_on_a_new_cluster_and_restarts_are_reported(kube, capsys):
    kube.ray.scripts["flaky"] = [Attempt([PROGRESS.format(10, 25.0), "NCCL error: unhandled system error"],
                                         exit_code=1),
                                 Attempt([PROGRESS.format(40, 100.0)], seconds=1.0, restarts=2)]
    assert submit(kube, "flaky") == 0
    capsys.readouterr()
    assert cli(kube, "follow", "flaky", "--poll", "0.3") == 0
    out = capsys.readouterr().out
    assert "flaky: Retrying" in out and "failed attempts 1" in out
    assert "pod restarts 2" in out
    job = kube.get("rayjobs", "ml", "flaky")
    assert job["status"]["failed"] == 1 and job["status"]["jobDeploymentStatus"] == "Complete"


def test_job_failing_beyond_its_backoff_limit_fails_follow_and_status(kube, capsys):
    kube.ray.scripts["doomed"] = [Attempt(["Traceback: ValueError: bad shard"], exit_code=1)]
    assert submit(kube, "doomed") == 0
    assert cli(kube, "follow", "doomed", "--poll", "0.3") == 1
    err = capsys.readouterr().err
    assert "RayJob ml/doomed ended Failed after 3 failed attempt(s)" in err  # backoffLimit 2: three attempts
    assert "re-submitting the same run name resumes" in err
    assert cli(kube, "status", "doomed") == 1


def test_cancel_deletes_the_job_and_its_cluster(kube, capsys):
    kube.ray.scripts["long"] = [Attempt([PROGRESS.format(1, 2.5)] * 3, seconds=60)]
    assert submit(kube, "long") == 0
    job = wait_for(kube, "long", "Running")
    cluster = job["status"]["rayClusterName"]
    assert len(kube.list("pods", "ml", f"ray.io/cluster={cluster}")) == 3  # head + 2 workers
    assert cli(kube, "cancel", "long") == 0
    assert "cancelled RayJob ml/long" in capsys.readouterr().out
    assert kube.get("rayjobs", "ml", "long") is None
    deadline = time.monotonic() + 10
    while kube.list("pods", "ml", f"ray.io/cluster={cluster}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kube.list("pods", "ml", f"ray.io/cluster={cluster}") == []
    assert cli(kube, "status", "long") == 2
    assert "it does not exist" in capsys.readouterr().err


def test_suspend_deletes_the_cluster_and_resume_starts_a_new_one(kube, capsys):
    kube.ray.scripts["pausable"] = [Attempt([PROGRESS.format(5, 12.5)] * 4, seconds=60)]
    assert submit(kube, "pausable") == 0
    first = wait_for(kube, "pausable", "Running")["status"]["rayClusterName"]
    assert cli(kube, "suspend", "pausable") == 0
    job = wait_for(kube, "pausable", "Suspended")
    assert job["spec"]["suspend"] is True and kube.list("pods", "ml", f"ray.io/cluster={first}") == []
    assert cli(kube, "status", "pausable") == 0 and "pausable: Suspended" in capsys.readouterr().out
    assert cli(kube, "resume", "pausable") == 0
    job = wait_for(kube, "pausable", "Running")
    assert job["spec"]["suspend"] is False and job["status"]["rayClusterName"] != first
    assert cli(kube, "cancel", "pausable") == 0


def test_kueue_values_create_the_job_suspended(kube, tmp_path):
    values = tmp_path / "kueue.yaml"
    values.write_text(yaml.safe_dump({**VALUES, "training": {**VALUES["training"], "rayJob": {
        "kueueQueue": "gpu-research"}}}))
    assert cli(kube, "submit", "pi_behavior_debug", "--run-name", "queued", "--values", str(values)) == 0
    job = wait_for(kube, "queued", "Suspended")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-research"


def test_errors_name_the_problem_and_the_fix(kube, tmp_path, capsys):
    assert submit(kube, "taken") == 0
    wait_for(kube, "taken", "Complete")
    capsys.readouterr()
    # Name conflict: says what exists and what to do.
    assert submit(kube, "taken") == 2
    err = capsys.readouterr().err
    assert "RayJob ml/taken already exists (Complete)" in err and "b1k-train k8s follow taken" in err
    # RBAC denial.
    kube.forbidden.add(("create", "rayjobs"))
    assert submit(kube, "denied") == 2
    err = capsys.readouterr().err
    assert "RBAC denied it" in err and 'cannot create resource "rayjobs" in API group "ray.io"' in err
    assert "ask for a Role granting that verb on rayjobs in namespace ml" in err
    kube.forbidden.clear()
    # KubeRay not installed.
    kube.crds_installed = False
    assert submit(kube, "nocrd") == 2
    assert "no ray.io/v1 RayJob API; install the KubeRay operator" in capsys.readouterr().err
    kube.crds_installed = True
    # Rejected credentials.
    bad = kube.write_kubeconfig(str(tmp_path / "bad-token"), token="expired")
    assert main(["k8s", "status", "taken", "--kubeconfig", bad]) == 2
    assert "rejected the credentials" in capsys.readouterr().err
    # No cluster at all.
    from tests.integration.conftest import free_port

    gone = FakeKube()
    gone.url = f"http://127.0.0.1:{free_port()}"
    dead = gone.write_kubeconfig(str(tmp_path / "dead"))
    gone.server.server_close()
    assert main(["k8s", "status", "taken", "--kubeconfig", dead]) == 2
    assert "is unreachable" in capsys.readouterr().err
    assert main(["k8s", "status", "taken", "--kubeconfig", str(tmp_path / "missing")]) == 2
    assert "no Kubernetes configuration" in capsys.readouterr().err
    # Bad values: the chart's schema speaks before anything reaches the cluster.
    bad_values = tmp_path / "bad.yaml"
    bad_values.write_text(yaml.safe_dump({"training": {"workers": {"gpusPerWorker": -1}}}))
    before = len(kube.requests)
    assert cli(kube, "submit", "pi_behavior_debug", "--run-name", "x", "--values", str(bad_values)) == 2
    assert "at '/training/workers/gpusPerWorker'" in capsys.readouterr().err and len(kube.requests) == before
    assert cli(kube, "submit", "no_such_recipe", "--run-name", "x") == 2
    assert "no_such_recipe" in capsys.readouterr().err


def _policy_deployment(model: str, *, broken: bool = False) -> dict:
    dep = next(o for o in objects(render({"serving": {"model": model}, "training": {"enabled": False}}))
               if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-policy"))
    dep["metadata"]["namespace"] = "ml"
    if broken:
        dep["metadata"]["annotations"] = {"fake/broken": "true"}
    dep["status"] = {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}
    return dep


def test_rollout_moves_the_server_to_the_new_champion(kube, tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.create_registered_model("pi-behavior-ckpt1")
    for _ in range(2):
        client.create_model_version("pi-behavior-ckpt1", source="s3://lab/x/export")
    client.set_registered_model_alias("pi-behavior-ckpt1", "champion", "2")
    kube.put("deployments", _policy_deployment("models:/pi-behavior-ckpt1@champion"))
    args = ["rollout", "pi-behavior-ckpt1", "--tracking-uri", uri, "--poll", "0.1", "--timeout", "20"]
    assert cli(kube, *args) == 0
    out = capsys.readouterr().out
    dep = kube.get("deployments", "ml", "b1k-train-policy")
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"b1k-train/model": "models:/pi-behavior-ckpt1@champion", "b1k-train/model-version": "2"}
    assert dep["metadata"]["generation"] == 2 and dep["status"]["updatedReplicas"] == 2
    assert "rolling b1k-train-policy to models:/pi-behavior-ckpt1@champion version 2" in out
    assert "b1k-train-policy serves pi-behavior-ckpt1 version 2 (@champion)" in out
    # The same version again changes nothing.
    assert cli(kube, *args) == 0
    assert "already runs" in capsys.readouterr().out
    assert kube.get("deployments", "ml", "b1k-train-policy")["metadata"]["generation"] == 2
    # A server for another model is refused.
    kube.put("deployments", {**_policy_deployment("models:/other@champion"),
                             "metadata": {"name": "other-policy", "namespace": "ml"}})
    assert cli(kube, *args, "--deployment", "other-policy") == 2
    assert "serves models:/other@champion, not models:/pi-behavior-ckpt1@champion" in capsys.readouterr().err


def test_rollout_that_never_becomes_ready_times_out_with_the_next_step(kube, tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.create_registered_model("m")
    client.create_model_version("m", source="s3://lab/x/export")
    client.set_registered_model_alias("m", "champion", "1")
    kube.put("deployments", _policy_deployment("models:/m@champion", broken=True))
    assert cli(kube, "rollout", "m", "--tracking-uri", uri, "--poll", "0.1", "--timeout", "2") == 2
    err = capsys.readouterr().err
    assert "Deployment ml/b1k-train-policy not ready after 2 s (b1k-train-policy: 1/2 updated" in err
    assert "kubectl -n ml describe deploy/b1k-train-policy" in err
