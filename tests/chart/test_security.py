"""Security settings hold for every container of every value set: non-root, no privilege escalation, all
capabilities dropped, read-only root filesystem, bounded resources, no host access, secrets referenced only."""

from __future__ import annotations

import re

import pytest

from tests.chart.support import objects, pod_specs, render, value_set
from tests.chart.test_render import VALUE_SETS

SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL", re.I)


@pytest.fixture(scope="module", params=VALUE_SETS)
def objs(request):
    return objects(render(value_set(request.param)))


def _containers(pod):
    return [*pod.get("initContainers", []), *pod["containers"]]


def test_every_pod_and_container_is_locked_down(objs):
    pods = [p for o in objs for p in pod_specs(o)]
    assert pods
    for where, pod in pods:
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 1000, where
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(key), (where, key)
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v], where
        for c in _containers(pod):
            sc = c["securityContext"]
            name = f"{where} container {c['name']}"
            assert sc["runAsNonRoot"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert not sc.get("privileged"), name
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert {"/tmp", "/home/b1k"} <= mounts, (name, mounts)  # writable scratch on the read-only root
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), (name, part)


def test_kuberay_autoscaler_sidecar_is_locked_down_and_bounded():
    job = next(o for o in objects(render(value_set("gpu-4x8-elastic"))) if o["kind"] == "RayJob")
    opts = job["spec"]["rayClusterSpec"]["autoscalerOptions"]
    assert opts["securityContext"]["allowPrivilegeEscalation"] is False
    assert opts["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(opts["resources"]["limits"])


def test_only_the_elastic_ray_head_gets_an_api_token(objs):
    sa = [o for o in objs if o["kind"] == "ServiceAccount"]
    assert all(o["automountServiceAccountToken"] is False for o in sa)
    for o in objs:
        for where, pod in pod_specs(o):
            elastic_head = where.endswith(" head") and o["spec"].get("rayClusterSpec", o["spec"]).get(
                "enableInTreeAutoscaling")
            assert pod["automountServiceAccountToken"] is bool(elastic_head), where


def test_secrets_are_referenced_never_inlined(objs):
    assert not [o for o in objs if o["kind"] == "Secret"]
    for o in objs:
        for where, pod in pod_specs(o):
            for c in _containers(pod):
                for e in c.get("env", []):
                    if SECRET_NAME.search(e["name"]):
                        assert "value" not in e and "secretKeyRef" in e["valueFrom"], (where, e)
                assert not [a for a in c.get("args", []) if re.search(r"://[^/@\s]+:[^/@\s]+@", a)], (where, c["args"])


def test_rbac_is_namespaced_and_read_only(objs):
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    for role in (o for o in objs if o["kind"] == "Role"):
        for rule in role["rules"]:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
            assert "secrets" not in rule["resources"] and "*" not in rule["resources"], rule
