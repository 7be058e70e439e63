"""Offline Kubernetes validation for the chart tests: render with the real Helm engine (helm-python-sdk), validate
built-in kinds with kubernetes-validate (strict) and KubeRay kinds with JSON Schema derived from the CRDs."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "b1k-train"
VALUE_SETS = ROOT / "helm" / "values"
K8S_DIR = ROOT / "k8s"  # plain manifests: the default render (scripts/render_k8s.py)
K8S_NAMESPACE = "b1k-train"
KUBE_VERSION = "1.33.0"  # a current Kubernetes release kubernetes-validate 1.37 carries schemas for
SCHEMAS_ENV = "B1K_K8S_SCHEMAS"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


def schemas_dir() -> Path:
    """The KubeRay CRDs: $B1K_K8S_SCHEMAS, else ../shared/k8s-schemas next to the repository."""
    path = Path(os.environ.get(SCHEMAS_ENV) or ROOT.parent / "shared" / "k8s-schemas")
    missing = [f for f in CRD_FILES.values() if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"KubeRay CRDs {missing} not found in {path}: set {SCHEMAS_ENV} to the directory "
                                f"holding ray.io_rayjobs.yaml and ray.io_rayclusters.yaml (KubeRay v1.7.0)")
    return path


def _strict(node: Any) -> Any:
    """Close every object schema that lists its properties, as kubeconform's openapi2jsonschema does, unless the
    CRD says it keeps unknown fields: a misspelled field is then an error instead of being dropped silently."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.cache
def crd_json_schema(kind: str) -> dict[str, Any]:
    """JSON Schema (draft 7) of `kind` in ray.io/v1 from its CRD, unknown fields rejected."""
    crd = yaml.safe_load((schemas_dir() / CRD_FILES[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    return schema


def crd_errors(obj: dict[str, Any]) -> list[str]:
    """Every violation of the CRD schema, as 'path: message' lines (empty when valid)."""
    import jsonschema

    validator = jsonschema.Draft7Validator(crd_json_schema(obj["kind"]))
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in validator.iter_errors(obj))


def builtin_errors(obj: dict[str, Any]) -> list[str]:
    """kubernetes-validate's verdict (strict: unknown fields are errors) for a built-in kind."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {obj['apiVersion']} {obj['kind']}"]
    except kubernetes_validate.ValidationError as e:
        return [f"{'/'.join(map(str, e.path))}: {e.message}"]
    return []


def validate_object(obj: dict[str, Any]) -> list[str]:
    """All schema errors of one rendered object; custom kinds other than KubeRay's are an error (nothing silently
    unvalidated)."""
    if obj.get("apiVersion") == "ray.io/v1":
        return crd_errors(obj)
    return builtin_errors(obj)


@functools.cache
def chart():
    import helm_python

    return helm_python.Chart.load(str(CHART))


def value_set(name: str) -> dict[str, Any]:
    """A documented value set of helm/values/<name>.yaml ({} for "default")."""
    if name == "default":
        return {}
    return yaml.safe_load((VALUE_SETS / f"{name}.yaml").read_text()) or {}


def render(values: dict[str, Any], *, release: str = "b1k-train", namespace: str = "ml") -> dict[str, str]:
    """{template path: manifest text} of the chart for `values`, after the chart's schema check (as `helm install`
    does)."""
    ch = chart()
    ch.validate_schema(ch.merge_values(values))
    return ch.render(values, name=release, namespace=namespace)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """The Kubernetes objects of a render (NOTES.txt and empty documents dropped), in template order."""
    out = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        out += [d for d in yaml.safe_load_all(rendered[path]) if d]
    return out


def pod_specs(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod an object creates: Deployments, and KubeRay's head, worker and submitter
    pods."""
    spec = obj.get("spec", {})
    kind = obj["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [(f"{kind}/{obj['metadata']['name']}", spec["template"]["spec"])]
    if kind in ("RayJob", "RayCluster"):
        cluster = spec.get("rayClusterSpec", {}) if kind == "RayJob" else spec
        pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
        pods += [(f"worker {g['groupName']}", g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
        if kind == "RayJob" and "submitterPodTemplate" in spec:
            pods.append(("submitter", spec["submitterPodTemplate"]["spec"]))
        return [(f"{kind}/{obj['metadata']['name']} {where}", p) for where, p in pods]
    return []
