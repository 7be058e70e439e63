"""Submit, inspect, follow, cancel, suspend and resume training RayJobs."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from typing import Any

from trainer.k8s.api import KubeApi
from trainer.k8s.errors import JobFailed, NameConflict, NotFound

# KubeRay's jobDeploymentStatus values (ray.io/v1): terminal ones end `follow`.
TERMINAL = {"Complete", "Failed", "ValidationFailed"}
PROGRESS = re.compile(r"\[train(?: [^\]]+)?\] step \d+/\d+.*")  # "[train <stage>]" in a pipeline
MANAGED_BY = {"app.kubernetes.io/managed-by": "b1k-train"}


@dataclasses.dataclass
class JobStatus:
    name: str
    deployment: str  # jobDeploymentStatus ("" before KubeRay saw the job)
    job: str  # Ray's job status: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    suspended: bool
    cluster: str
    workers_ready: int
    workers_desired: int
    failed_attempts: int
    restarts: int  # container restarts over the job's pods (OOM kills, lost nodes)
    progress: str  # the trainer's latest progress line, from the driver's log
    message: str
    labels: dict[str, str]

    @property
    def finished(self) -> bool:
        return self.deployment in TERMINAL

    def line(self) -> str:
        parts = [f"{self.name}: {self.deployment or 'Pending'}"]
        if self.job:
            parts.append(f"job {self.job}")
        if self.cluster:
            parts.append(f"workers {self.workers_ready}/{self.workers_desired}")
        if self.failed_attempts:
            parts.append(f"failed attempts {self.failed_attempts}")
        if self.restarts:
            parts.append(f"pod restarts {self.restarts}")
        text = ", ".join(parts)
        if self.progress:
            text += f" | {self.progress}"
        if self.message and self.deployment in ("Failed", "ValidationFailed"):
            text += f" | {self.message}"
        return text


def submit(api: KubeApi, body: dict[str, Any]) -> dict[str, Any]:
    """Create the RayJob `body`; a name already taken is a NameConflict naming its current state."""
    name = body["metadata"]["name"]
    body["metadata"]["labels"].update(MANAGED_BY)
    try:
        return api.create_rayjob(body)
    except NameConflict as e:
        try:
            state = status(api, name, with_logs=False).deployment or "Pending"
        except NotFound:
            raise e from None
        raise NameConflict(f"RayJob {api.namespace}/{name} already exists ({state}): follow it with `b1k-train k8s "
                           f"follow {name}`, cancel it with `b1k-train k8s cancel {name}`, or pick another "
                           f"--run-name") from e


def status(api: KubeApi, name: str, *, with_logs: bool = True, obj: dict[str, Any] | None = None) -> JobStatus:
    """The job's state: KubeRay's status, its pods' restarts and the driver's last progress line."""
    obj = obj or api.get_rayjob(name)
    st = obj.get("status") or {}
    cluster_st = st.get("rayClusterStatus") or {}
    cluster = st.get("rayClusterName", "")
    restarts = 0
    pods = api.list_pods(f"ray.io/cluster={cluster}") if cluster else []
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            restarts += int(cs.get("restartCount", 0))
    progress = last_progress(api, name) if with_logs else ""
    return JobStatus(
        name=name, deployment=st.get("jobDeploymentStatus", ""), job=st.get("jobStatus", ""),
        suspended=bool(obj["spec"].get("suspend")), cluster=cluster,
        workers_ready=int(cluster_st.get("readyWorkerReplicas", cluster_st.get("availableWorkerReplicas", 0))),
        workers_desired=int(cluster_st.get("desiredWorkerReplicas", 0)),
        failed_attempts=int(st.get("failed", 0)), restarts=restarts, progress=progress,
        message=st.get("message", ""), labels=obj["metadata"].get("labels", {}))


def last_progress(api: KubeApi, name: str) -> str:
    """The latest `[train] step …` line of the job's driver output (the submitter pod streams it), or ""."""
    pods = api.list_pods(f"job-name={name}")
    if not pods:
        return ""
    newest = max(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))
    try:
        text = api.pod_log(newest["metadata"]["name"], tail_lines=200)
    except NotFound:
        return ""
    found = PROGRESS.findall(text or "")
    return found[-1] if found else ""


def follow(api: KubeApi, name: str, *, out: Callable[[str], None] = print, poll_s: float = 5.0,
           timeout_s: float | None = None) -> JobStatus:
    """Print the job's state whenever it changes (KubeRay status from a watch, progress from the driver log) until
    it finishes. Returns the final status; raises JobFailed when the job failed."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last_line = ""
    obj = api.get_rayjob(name)
    while True:
        st = status(api, name, obj=obj)
        line = st.line()
        if line != last_line:
            out(line)
            last_line = line
        if st.finished:
            if st.deployment != "Complete":
                raise JobFailed(f"RayJob {api.namespace}/{name} ended {st.deployment} after {st.failed_attempts} "
                                f"failed attempt(s): {st.message or 'see the driver log'} (kubectl -n "
                                f"{api.namespace} logs job/{name}); re-submitting the same run name resumes from "
                                f"its last checkpoint")
            return st
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"RayJob {api.namespace}/{name} still {st.deployment or 'Pending'} after "
                               f"{timeout_s:.0f} s")
        # Wait for the next status change, but no longer than poll_s: progress lines come from the log, not events.
        rv = obj["metadata"].get("resourceVersion")
        for event in api.watch_rayjob(name, resource_version=rv, timeout_s=max(1, int(poll_s))):
            if event["type"] == "DELETED":
                raise JobFailed(f"RayJob {api.namespace}/{name} was deleted while it ran (cancelled?)")
            obj = event["object"]
            break
        else:
            obj = api.get_rayjob(name)


def cancel(api: KubeApi, name: str) -> None:
    """Delete the RayJob, its Ray cluster and its submitter; checkpoints in storage stay (re-submit resumes)."""
    api.delete_rayjob(name)


def set_suspended(api: KubeApi, name: str, suspended: bool) -> dict[str, Any]:
    """spec.suspend (the field Kueue toggles): true deletes the Ray cluster, false creates it again and the job
    resumes from its last checkpoint."""
    return api.patch_rayjob(name, {"spec": {"suspend": suspended}})


def list_jobs(api: KubeApi) -> list[JobStatus]:
    """The b1k-train RayJobs of the namespace (chart- or CLI-created)."""
    return [status(api, o["metadata"]["name"], with_logs=False, obj=o)
            for o in api.list_rayjobs("app.kubernetes.io/part-of=b1k-train")]
