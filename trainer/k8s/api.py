"""A thin, dict-based layer over the `kubernetes` client for the objects b1k-train uses (RayJobs, Deployments,
pods and their logs) that turns every API failure into an error naming the problem and the fix."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from trainer.k8s.errors import AccessDenied, Invalid, K8sError, KubeRayMissing, NameConflict, NoClusterAccess, NotFound

log = logging.getLogger(__name__)

RAY_GROUP, RAY_VERSION, RAYJOBS = "ray.io", "v1", "rayjobs"
KUBERAY_INSTALL = ("install the KubeRay operator: helm repo add kuberay https://ray-project.github.io/kuberay-helm/ "
                   "&& helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0")
MERGE_PATCH = "application/merge-patch+json"


class KubeApi:
    """The cluster of a kubeconfig (its current context unless `context`), or the pod's own service account."""

    def __init__(self, *, kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None):
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        try:
            if kubeconfig or not _in_cluster():
                cfg = client.Configuration()
                config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
                _, active = config.list_kube_config_contexts(config_file=kubeconfig)
                default_ns = (active or {}).get("context", {}).get("namespace") or "default"
            else:
                cfg = client.Configuration()
                config.load_incluster_config(client_configuration=cfg)
                default_ns = _pod_namespace()
        except (ConfigException, FileNotFoundError) as e:
            raise NoClusterAccess(f"no Kubernetes configuration ({e}): set KUBECONFIG or --kubeconfig to a "
                                  f"kubeconfig with access to the cluster, or run inside a pod") from e
        cfg.retries = 1  # fail fast on an unreachable server instead of urllib3's long retry ladder
        self.host = cfg.host
        self.namespace = namespace or default_ns
        self.client = client.ApiClient(cfg)
        self.custom = client.CustomObjectsApi(self.client)
        self.apps = client.AppsV1Api(self.client)
        self.core = client.CoreV1Api(self.client)

    # --- RayJobs -----------------------------------------------------------------------------------------------

    def create_rayjob(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        return self._call(f"create RayJob {self.namespace}/{name}", "rayjobs", name, lambda: (
            self.custom.create_namespaced_custom_object(RAY_GROUP, RAY_VERSION, self.namespace, RAYJOBS, body)))

    def get_rayjob(self, name: str) -> dict[str, Any]:
        return self._call(f"get RayJob {self.namespace}/{name}", "rayjobs", name, lambda: (
            self.custom.get_namespaced_custom_object(RAY_GROUP, RAY_VERSION, self.namespace, RAYJOBS, name)))

    def list_rayjobs(self, label_selector: str = "") -> list[dict[str, Any]]:
        out = self._call(f"list RayJobs in {self.namespace}", "rayjobs", None, lambda: (
            self.custom.list_namespaced_custom_object(RAY_GROUP, RAY_VERSION, self.namespace, RAYJOBS,
                                                      label_selector=label_selector or None)))
        return out["items"]

    def patch_rayjob(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self._call(f"patch RayJob {self.namespace}/{name}", "rayjobs", name, lambda: (
            self.custom.patch_namespaced_custom_object(RAY_GROUP, RAY_VERSION, self.namespace, RAYJOBS, name, patch,
                                                       _content_type=MERGE_PATCH)))

    def delete_rayjob(self, name: str) -> None:
        # Foreground: the RayJob goes once KubeRay has removed its cluster and submitter.
        self._call(f"delete RayJob {self.namespace}/{name}", "rayjobs", name, lambda: (
            self.custom.delete_namespaced_custom_object(RAY_GROUP, RAY_VERSION, self.namespace, RAYJOBS, name,
                                                        propagation_policy="Foreground")))

    def watch_rayjob(self, name: str, *, resource_version: str | None, timeout_s: int) -> Iterator[dict[str, Any]]:
        """(event type, object) dicts for RayJob `name` until `timeout_s` passes or the server ends the stream."""
        from kubernetes import watch

        w = watch.Watch()
        stream = w.stream(self.custom.list_namespaced_custom_object, RAY_GROUP, RAY_VERSION, self.namespace, RAYJOBS,
                          field_selector=f"metadata.name={name}", resource_version=resource_version,
                          timeout_seconds=timeout_s)
        try:
            for event in self._iterate(f"watch RayJob {self.namespace}/{name}", "rayjobs", stream):
                yield {"type": event["type"], "object": event["raw_object"]}
        finally:
            w.stop()

    # --- pods and Deployments ----------------------------------------------------------------------------------

    def list_pods(self, label_selector: str) -> list[dict[str, Any]]:
        out = self._call(f"list pods in {self.namespace}", "pods", None, lambda: (
            self.core.list_namespaced_pod(self.namespace, label_selector=label_selector)))
        return self.client.sanitize_for_serialization(out)["items"]

    def pod_log(self, name: str, *, tail_lines: int | None = None) -> str:
        return self._call(f"read the log of pod {self.namespace}/{name}", "pods/log", name, lambda: (
            self.core.read_namespaced_pod_log(name, self.namespace, tail_lines=tail_lines)))

    def get_deployment(self, name: str) -> dict[str, Any]:
        out = self._call(f"get Deployment {self.namespace}/{name}", "deployments", name, lambda: (
            self.apps.read_namespaced_deployment(name, self.namespace)))
        return self.client.sanitize_for_serialization(out)

    def patch_deployment(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        out = self._call(f"patch Deployment {self.namespace}/{name}", "deployments", name, lambda: (
            self.apps.patch_namespaced_deployment(name, self.namespace, patch)))
        return self.client.sanitize_for_serialization(out)

    # --- error translation -------------------------------------------------------------------------------------

    def _call(self, what: str, resource: str, name: str | None, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - translated below, re-raised as is when unknown
            raise self._translate(what, resource, name, e) from e

    def _iterate(self, what: str, resource: str, iterator):
        try:
            yield from iterator
        except Exception as e:  # noqa: BLE001
            raise self._translate(what, resource, None, e) from e

    def _translate(self, what: str, resource: str, name: str | None, e: Exception) -> Exception:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        if isinstance(e, HTTPError) or isinstance(e, OSError):
            return NoClusterAccess(f"cannot {what}: the Kubernetes API at {self.host} is unreachable ({e}); check "
                                   f"the kubeconfig's current context (`kubectl cluster-info`)")
        if not isinstance(e, ApiException):
            return e
        status = _status_body(e)
        message = status.get("message") or e.reason or str(e)
        if e.status == 401:
            return NoClusterAccess(f"cannot {what}: the API server at {self.host} rejected the credentials "
                                   f"({message}); refresh the kubeconfig's token")
        if e.status == 403:
            return AccessDenied(f"cannot {what}: RBAC denied it ({message}); ask for a Role granting that verb on "
                                f"{resource} in namespace {self.namespace}, or use a context that has one")
        if e.status == 404:
            if resource == "rayjobs" and not (status.get("details") or {}).get("name"):
                return KubeRayMissing(f"cannot {what}: the cluster has no ray.io/v1 RayJob API; {KUBERAY_INSTALL}")
            return NotFound(f"cannot {what}: it does not exist (`b1k-train k8s list` shows the RayJobs of namespace "
                            f"{self.namespace})")
        if e.status == 409:
            return NameConflict(f"cannot {what}: {message}; choose another --run-name, or `b1k-train k8s cancel "
                                f"{name}` first")
        if e.status in (400, 422):
            causes = "; ".join(f"{c.get('field', '')}: {c.get('message', '')}"
                               for c in (status.get("details") or {}).get("causes", []))
            return Invalid(f"cannot {what}: the API server rejected it: {causes or message}")
        return K8sError(f"cannot {what}: HTTP {e.status} {message}")


def _status_body(e) -> dict[str, Any]:
    try:
        body = json.loads(e.body) if e.body else {}
        return body if isinstance(body, dict) else {}
    except (TypeError, ValueError):
        return {}


def _in_cluster() -> bool:
    import os

    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not os.environ.get("KUBECONFIG")


def _pod_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"
