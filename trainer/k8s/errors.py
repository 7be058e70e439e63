"""Errors of the Kubernetes commands, each naming the problem and the fix (the CLI prints them without a
traceback and exits 2)."""

from __future__ import annotations


class K8sError(RuntimeError):
    """A Kubernetes operation failed for a reason the user can act on."""


class NoClusterAccess(K8sError):
    """No configuration, an unreachable API server, or rejected credentials."""


class KubeRayMissing(K8sError):
    """The cluster has no ray.io/v1 API: the KubeRay operator (and its CRDs) is not installed."""


class AccessDenied(K8sError):
    """RBAC refused a verb on a resource."""


class NameConflict(K8sError):
    """An object of that name already exists."""


class NotFound(K8sError):
    """The named object does not exist."""


class Invalid(K8sError):
    """The API server rejected an object's content (e.g. against the CRD schema)."""


class JobFailed(K8sError):
    """A RayJob ended Failed (after its retries)."""


class RolloutTimeout(K8sError):
    """A Deployment did not become ready in time."""
