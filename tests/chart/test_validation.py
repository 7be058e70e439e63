"""The validators the chart tests rely on reject what they must (else a passing render proves nothing), and the
values schema rejects bad values with messages naming the key."""

from __future__ import annotations

import copy

import pytest

from tests.chart.support import SCHEMAS_ENV, crd_json_schema, objects, render, schemas_dir, validate_object


@pytest.fixture(scope="module")
def default_objects():
    return objects(render({}))


def _one(objs, kind):
    return copy.deepcopy(next(o for o in objs if o["kind"] == kind))


def test_crd_schema_rejects_misspelled_and_mistyped_rayjob_fields(default_objects):
    job = _one(default_objects, "RayJob")
    assert validate_object(job) == []
    job["spec"]["backoffLimit"] = "two"
    job["spec"]["shutdownAfterJobFinish"] = True  # misspelled: silently dropped by a lenient API server
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resourcez"] = {}
    errors = validate_object(job)
    assert len(errors) == 3, errors
    assert any(e.startswith("spec/backoffLimit: 'two' is not of type 'integer'") for e in errors), errors
    assert any("shutdownAfterJobFinish" in e and "not allowed" in e for e in errors), errors
    assert any(e.startswith("spec/rayClusterSpec/workerGroupSpecs/0/template/spec/containers/0:") and "resourcez" in e
               for e in errors), errors


def test_crd_schema_requires_worker_group_bounds_and_keeps_open_maps_open(default_objects):
    cluster = copy.deepcopy(_one(default_objects, "RayJob")["spec"]["rayClusterSpec"])
    del cluster["workerGroupSpecs"][0]["maxReplicas"]
    obj = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"}, "spec": cluster}
    assert any("'maxReplicas' is a required property" in e for e in validate_object(obj))
    # rayStartParams is a string map: any key is fine, a non-string value is not.
    cluster["workerGroupSpecs"][0]["maxReplicas"] = 1
    cluster["headGroupSpec"]["rayStartParams"] = {"any-flag": "1"}
    assert validate_object(obj) == []
    cluster["headGroupSpec"]["rayStartParams"] = {"num-cpus": 0}
    assert any("is not of type 'string'" in e for e in validate_object(obj))


def test_builtin_kinds_are_validated_strictly(default_objects):
    deploy = _one(default_objects, "Deployment")
    assert validate_object(deploy) == []
    deploy["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    assert validate_object(deploy), "an unknown container field must be an error in strict mode"
    svc = _one(default_objects, "Service")
    svc["spec"]["ports"][0]["port"] = "http"
    assert validate_object(svc)


def test_unknown_custom_kinds_are_not_passed_silently():
    errors = validate_object({"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "LocalQueue", "metadata": {"name": "q"}})
    assert errors == ["no schema for kueue.x-k8s.io/v1beta1 LocalQueue"]


def test_schema_directory_comes_from_the_environment(monkeypatch, tmp_path):
    real = schemas_dir()
    monkeypatch.setenv(SCHEMAS_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"set {SCHEMAS_ENV} to the directory"):
        schemas_dir()
    for name in ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml"):
        (tmp_path / name).write_bytes((real / name).read_bytes())
    assert schemas_dir() == tmp_path
    assert crd_json_schema("RayJob")["properties"]["kind"] == {"const": "RayJob"}


BAD_VALUES = [
    ({"training": {"workers": {"minReplicas": 0}}}, "at '/training/workers/minReplicas': minimum: got 0, want 1"),
    ({"training": {"command": "train"}}, "at '/training/command': value must be one of 'fit', 'pipeline'"),
    ({"training": {"workers": {"gpusPerWorker": -1}}}, "at '/training/workers/gpusPerWorker'"),
    ({"training": {"overrides": ["num_steps"]}}, "at '/training/overrides/0'"),
    ({"training": {"runName": "bad name!"}}, "at '/training/runName'"),
    ({"training": {"rayJob": {"backoffLimit": "2"}}}, "at '/training/rayJob/backoffLimit'"),
    ({"training": {"head": {"resources": {"requests": {"cpu": "lots", "memory": "1Gi"}}}}},
     "at '/training/head/resources/requests/cpu'"),
    ({"training": {"workers": {"resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": None}}}},
     "at '/training/workers/resources'"),
    ({"training": {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "inlined"}]}}, "at '/training/env/0'"),
    ({"training": {"nccl": {"extraEnv": {"PATH": "/x"}}}},
     "at '/training/nccl/extraEnv': additional properties 'PATH' not allowed"),
    ({"serving": {"device": "tpu"}}, "at '/serving/device': value must be one of 'cuda', 'cpu'"),
    ({"serving": {"model": "my-model"}}, "at '/serving/model'"),
    ({"serving": {"gpus": 0}}, "at '/serving/gpus': minimum: got 0, want 1"),  # device cuda needs a GPU
    ({"serving": {"replica": 3}}, "at '/serving': additional properties 'replica' not allowed"),
    ({"serving": {"maxMessageMb": 3}}, "at '/serving/maxMessageMb'"),  # below a 720/480 observation
    ({"mlflow": {"enabled": False}}, "at '/mlflow/externalUri': minLength: got 0, want 1"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "at '/podSecurityContext/runAsNonRoot'"),
    ({"containerSecurityContext": {"allowPrivilegeEscalation": True}},
     "at '/containerSecurityContext/allowPrivilegeEscalation': value must be false"),
    ({"containerSecurityContext": {"capabilities": {"drop": []}}}, "at '/containerSecurityContext/capabilities/drop'"),
    ({"storage": {"url": "/local/path"}}, "at '/storage/url'"),
    ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'"),
]


@pytest.mark.parametrize("values,message", BAD_VALUES, ids=[m.split("'")[1] for _, m in BAD_VALUES])
def test_values_schema_rejects_bad_values_naming_the_key(values, message):
    from helm_python import HelmValuesError

    with pytest.raises(HelmValuesError) as e:
        render(values)
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize("values,message", [
    ({"training": {"workers": {"minReplicas": 3, "maxReplicas": 2, "replicas": 2}}},
     "minReplicas (3) is above maxReplicas (2)"),
    ({"training": {"workers": {"replicas": 5}}}, "replicas (5) must lie between minReplicas (1) and maxReplicas (1)"),
    ({"serving": {"replicas": 1}}, "podDisruptionBudget.minAvailable (1) must be below the server's replica count"),
    ({"serving": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}},
     "serving.autoscaling: minReplicas (5) is above maxReplicas (3)"),
    ({"training": {"enabled": False}, "serving": {"enabled": False}, "mlflow": {"enabled": False,
                                                                                "externalUri": "http://m"}},
     "nothing to install"),
    ({"serviceAccount": {"create": False}}, "serviceAccount.name: name an existing ServiceAccount"),
])
def test_cross_field_rules_fail_the_render_with_the_fix(values, message):
    from helm_python import HelmRenderError

    with pytest.raises(HelmRenderError, match=message.replace("(", r"\(").replace(")", r"\)")):
        render(values)
