"""The chart rendered by the real Helm engine for every documented value set: lint clean, every object valid
(kubernetes-validate strict for built-in kinds, the KubeRay CRD schemas with unknown fields rejected)."""

from __future__ import annotations

import shlex

import pytest

from tests.chart.support import CHART, KUBE_VERSION, objects, pod_specs, render, validate_object, value_set

VALUE_SETS = ["default", "cpu-dev", "gpu-4x8-elastic", "serve-only", "external-mlflow"]


def kinds(objs):
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objs)


@pytest.fixture(scope="module", params=VALUE_SETS)
def rendered(request):
    return request.param, objects(render(value_set(request.param)))


def test_lint_has_no_errors_or_warnings_for_any_value_set():
    import helm_python

    for name in VALUE_SETS:
        result = helm_python.lint(str(CHART), values=value_set(name), strict=True, kube_version=f"v{KUBE_VERSION}",
                                  namespace="ml")
        bad = [m for m in result["messages"] if m["severity"] >= 2] + list(result["errors"])
        assert result["total_charts_linted"] == 1 and not bad, (name, bad)


def test_every_object_validates_against_its_schema(rendered):
    name, objs = rendered
    assert objs, name
    errors = {f"{o['kind']}/{o['metadata']['name']}": validate_object(o) for o in objs}
    assert not {k: v for k, v in errors.items() if v}, (name, errors)


def test_default_render_has_every_part():
    objs = objects(render({}))
    assert kinds(objs) == [
        "Deployment/b1k-train-mlflow", "Deployment/b1k-train-policy", "PersistentVolumeClaim/b1k-train-mlflow",
        "PodDisruptionBudget/b1k-train-policy", "RayJob/b1k-train-ray", "Role/b1k-train", "RoleBinding/b1k-train",
        "Service/b1k-train-mlflow", "Service/b1k-train-policy", "ServiceAccount/b1k-train"]


def _by_kind(objs, kind):
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, (kind, kinds(objs))
    return found[0]


def _env(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_elastic_gpu_job_is_wired_for_4_nodes_of_8_gpus():
    objs = objects(render(value_set("gpu-4x8-elastic")))
    job = _by_kind(objs, "RayJob")
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:5] == ["b1k-train", "pipeline", "pi_behavior_b1k_2stage", "--run-name", "b1k-2stage-v1"]
    assert argv[argv.index("--storage") + 1] == "s3://my-lab-b1k/runs"
    assert argv[argv.index("--workers") + 1] == "16:32"  # 2..4 nodes x 8 GPUs, one Ray Train worker per GPU
    assert argv[argv.index("--set") + 1] == "finetune.max_concurrent=2"
    assert spec["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-research"
    assert spec["backoffLimit"] == 3 and spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 3600
    assert "TORCH_NCCL_DUMP_ON_TIMEOUT" in spec["runtimeEnvYAML"]
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (4, 2, 4)
    pod = group["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 8 == worker["resources"]["requests"]["nvidia.com/gpu"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "256Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in worker["volumeMounts"]
    env = _env(worker)
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["NCCL_NET_GDR_LEVEL"] == "PHB" and env["B1K_USE_GPU"] == "1"
    assert env["MLFLOW_TRACKING_URI"] == "http://b1k-train-mlflow.ml.svc:5000"
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "b1k-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    assert head["automountServiceAccountToken"] is True and pod["automountServiceAccountToken"] is False
    hpa = _by_kind(objs, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    server = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-policy"))
    assert "replicas" not in server["spec"]  # the HPA owns it


def test_cpu_dev_runs_gloo_without_gpu_settings():
    objs = objects(render(value_set("cpu-dev")))
    spec = _by_kind(objs, "RayJob")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[1:3] == ["fit", "pi_behavior_debug"] and argv[argv.index("--workers") + 1] == "2"
    cluster = spec["rayClusterSpec"]
    assert "enableInTreeAutoscaling" not in cluster and cluster["authOptions"] == {"mode": "disabled"}
    for where, pod in pod_specs(_by_kind(objs, "RayJob")):
        for c in pod["containers"]:
            assert "nvidia.com/gpu" not in c["resources"]["limits"], where
            assert not any(k.startswith("NCCL_") for k in _env(c)), where
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert _env(worker)["B1K_USE_GPU"] == "0" and _env(worker)["AWS_ENDPOINT_URL"] == "http://minio.minio.svc:9000"
    mlflow = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-mlflow"))
    store = next(v for v in mlflow["spec"]["template"]["spec"]["volumes"] if v["name"] == "store")
    assert "emptyDir" in store and not [o for o in objs if o["kind"] == "PersistentVolumeClaim"]
    server = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-policy"))
    args = server["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--device=cpu" in args and "--model=models:/pi-behavior-debug@champion" in args


def test_serve_only_has_the_server_and_nothing_else():
    objs = objects(render(value_set("serve-only"), release="b1k-policy"))
    assert kinds(objs) == ["Deployment/b1k-policy-b1k-train-policy", "PodDisruptionBudget/b1k-policy-b1k-train-policy",
                           "Role/b1k-policy-b1k-train", "RoleBinding/b1k-policy-b1k-train",
                           "Service/b1k-policy-b1k-train-policy", "ServiceAccount/b1k-policy-b1k-train"]
    server = _by_kind(objs, "Deployment")
    pod = server["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = _env(c)
    assert env["MLFLOW_TRACKING_URI"] == "https://mlflow.my-lab.internal"
    assert env["MLFLOW_TRACKING_TOKEN"] == {"secretKeyRef": {"name": "mlflow-token", "key": "token"}}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "ws", "scheme": "HTTP"}, probe
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] == 900
    assert server["spec"]["replicas"] == 3 and _by_kind(objs, "Service")["spec"]["type"] == "LoadBalancer"
    assert _by_kind(objs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_external_mlflow_has_no_tracking_server_and_a_long_lived_ray_cluster():
    objs = objects(render(value_set("external-mlflow")))
    assert not [o for o in objs if "mlflow" in o["metadata"]["name"]]
    assert not [o for o in objs if o["kind"] == "RayJob"]
    cluster = _by_kind(objs, "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert _env(head)["MLFLOW_TRACKING_URI"] == "https://mlflow.my-lab.internal"
    assert "AWS_SECRET_ACCESS_KEY" not in _env(head)  # the pod identity (IRSA) instead of keys
    sa = _by_kind(objs, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/b1k-train")


def test_default_mlflow_server_keeps_its_store_and_accepts_its_service_name():
    objs = objects(render({}))
    pvc = _by_kind(objs, "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    mlflow = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-mlflow"))
    (c,) = mlflow["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["mlflow"] and "--serve-artifacts" in c["args"]
    assert "--artifacts-destination=s3://b1k-train/mlflow-artifacts" in c["args"]
    hosts = next(a for a in c["args"] if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    from fnmatch import fnmatch

    for host in ("b1k-train-mlflow.ml.svc:5000", "b1k-train-mlflow:5000", "localhost:5000"):
        assert any(fnmatch(host, h) for h in hosts), (host, hosts)
    assert _env(c)["MLFLOW_BACKEND_STORE_URI"] == "sqlite:////mlflow/mlflow.db"
    ext = objects(render({"mlflow": {"backendStore": {"databaseUriSecret": {"name": "mlflow-db"}}}}))
    (c,) = next(o for o in ext if o["kind"] == "Deployment" and "mlflow" in o["metadata"]["name"])[
        "spec"]["template"]["spec"]["containers"]
    assert _env(c)["MLFLOW_BACKEND_STORE_URI"] == {"secretKeyRef": {"name": "mlflow-db", "key": "uri"}}
    assert not [o for o in ext if o["kind"] == "PersistentVolumeClaim"]


def test_notes_tell_how_to_follow_the_job_and_open_mlflow():
    notes = render({})["b1k-train/templates/NOTES.txt"]
    assert "kubectl -n ml get rayjob b1k-train-ray -w" in notes
    assert "kubectl -n ml logs -f job/b1k-train-ray" in notes
    assert "kubectl -n ml port-forward svc/b1k-train-mlflow 5000:5000" in notes
    assert "--workers 8" in notes


def test_policy_server_api_keys_tls_limits_and_network_policies():
    objs = objects(render({"serving": {"apiKeysSecret": {"name": "policy-keys"}, "tlsSecret": "policy-tls",
                                       "maxMessageMb": 32, "maxConnections": 8},
                           "networkPolicy": {"enabled": True, "policyServerFrom": [
                               {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "eval"}}}]}}))
    server = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-policy"))
    pod = server["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    # idle timeout 0 = off: the evaluator is silent while a scene loads
    assert {"--max-message-mb=32", "--max-connections=8", "--idle-timeout-s=0",
            "--tls-cert=/etc/b1k-train/tls/tls.crt", "--tls-key=/etc/b1k-train/tls/tls.key"} <= set(c["args"])
    assert _env(c)["B1K_API_KEYS_FILE"] == "/etc/b1k-train/api-keys/keys"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["api-keys"]["secret"] == {"secretName": "policy-keys", "defaultMode": 0o400,
                                             "items": [{"key": "api-keys", "path": "keys"}]}
    assert volumes["tls"]["secret"]["secretName"] == "policy-tls"
    assert all(m.get("readOnly") for m in c["volumeMounts"] if m["name"] in ("api-keys", "tls"))
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    policies = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}
    assert sorted(policies) == ["b1k-train-mlflow", "b1k-train-policy"]
    (rule,) = policies["b1k-train-policy"]["ingress"]
    assert rule["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "eval"}
    assert rule["ports"] == [{"port": "ws", "protocol": "TCP"}]
    (ml,) = policies["b1k-train-mlflow"]["ingress"]
    assert ml["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "b1k-train"}}}]
    assert all(validate_object(o) == [] for o in objs)
    closed = objects(render({"networkPolicy": {"enabled": True}}))
    assert next(o for o in closed if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].endswith("-policy"))[
        "spec"]["ingress"] == []  # nobody listed: nobody gets in
    # Training pods carry the release label MLflow's policy admits.
    job = next(o for o in closed if o["kind"] == "RayJob")
    head_labels = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert head_labels["app.kubernetes.io/instance"] == "b1k-train"


def test_network_policy_for_a_keyless_evaluator_admits_its_namespace_and_pods_only():
    """docs/serving.md: the stock evaluator cannot send an API key, so the server is restricted to the evaluator's
    namespace and, within it, its pods (one peer: both selectors must match)."""
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "behavior-eval"}},
            "podSelector": {"matchLabels": {"app": "behavior-eval"}}}
    objs = objects(render({"serving": {"apiKeysSecret": {"name": ""}},
                           "networkPolicy": {"enabled": True, "policyServerFrom": [peer]}}))
    server = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-policy"))
    assert "B1K_API_KEYS_FILE" not in _env(server["spec"]["template"]["spec"]["containers"][0])
    policy = next(o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].endswith("-policy"))
    assert policy["spec"]["podSelector"]["matchLabels"] == server["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["ingress"] == [{"from": [peer], "ports": [{"port": "ws", "protocol": "TCP"}]}]
    assert validate_object(policy) == []
