"""What the KubeRay operator and the kubelet do with a RayJob, against the fake API server: cluster pods, status
transitions (Initializing -> Running -> Complete | Retrying | Failed, Suspending -> Suspended), `backoffLimit`
retries on a fresh cluster, `suspend` deleting the cluster, deletion cancelling the job, and the driver's output
streamed into the submitter pod's log.

Two executors run a job's attempts:
- "scripted": the test lists per job the attempts' log lines, duration, exit code and pod restarts;
- "local": the RayJob's real entrypoint runs as a subprocess here (a real `b1k-train fit` on a local Ray cluster),
  with the head container's literal environment (storage endpoint, MLflow URI), so stages really train.
Also a Deployment controller that rolls pods when the pod template changes.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
import uuid

from tests.fake_kube.apiserver import FakeKube
from tests.processes import kill_process_tree


@dataclasses.dataclass
class Attempt:
    lines: list[str]
    seconds: float = 0.5
    exit_code: int = 0
    restarts: int = 0


class FakeKubeRay:
    def __init__(self, kube: FakeKube, *, executor: str = "scripted", env: dict[str, str] | None = None):
        self.kube, self.executor, self.env = kube, executor, env or {}
        self.scripts: dict[str, list[Attempt]] = {}
        self.fail_first: set[str] = set()  # local executor: these jobs' first attempt fails before running
        self.started: list[tuple[str, float]] = []  # (job, time an attempt began running)
        self.finished: list[tuple[str, float]] = []
        self.threads: dict[str, threading.Thread] = {}
        kube.listeners.append(self)

    def on_event(self, event: str, plural: str, obj: dict) -> None:
        name = obj["metadata"]["name"]
        if plural == "rayjobs" and event == "ADDED":
            t = threading.Thread(target=self._run, args=(obj["metadata"]["namespace"], name), daemon=True)
            self.threads[name] = t
            t.start()
        if plural == "deployments" and event in ("ADDED", "MODIFIED"):
            threading.Thread(target=self._roll, args=(obj,), daemon=True).start()

    # --- RayJob lifecycle ----------------------------------------------------------------------------------------

    def _job(self, ns: str, name: str) -> dict | None:
        return self.kube.get("rayjobs", ns, name)

    def _set(self, ns: str, name: str, **status) -> None:
        self.kube.update_status("rayjobs", ns, name, status)

    def _run(self, ns: str, name: str) -> None:
        failed = 0
        attempt_no = 0
        while True:
            job = self._job(ns, name)
            if job is None:
                return
            if job["spec"].get("suspend"):
                self._set(ns, name, jobDeploymentStatus="Suspended", jobStatus="")
                if not self._wait(ns, name, lambda j: not j["spec"].get("suspend")):
                    return
                continue
            cluster = f"{name}-{uuid.uuid4().hex[:5]}"
            workers = int(job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].get("replicas", 1))
            self._set(ns, name, jobDeploymentStatus="Initializing", rayClusterName=cluster, jobStatus="",
                      rayClusterStatus={"desiredWorkerReplicas": workers, "readyWorkerReplicas": 0})
            submitter = self._pods(ns, name, cluster, workers)
            self._set(ns, name, jobDeploymentStatus="Running", jobStatus="RUNNING",
                      rayClusterStatus={"readyWorkerReplicas": workers, "availableWorkerReplicas": workers})
            self.started.append((name, time.monotonic()))
            outcome = self._execute(ns, name, job, submitter, cluster, attempt_no)
            self.finished.append((name, time.monotonic()))
            attempt_no += 1
            if outcome == "gone":
                self._delete_pods(ns, cluster, name)
                return
            if outcome == "suspended":
                self._set(ns, name, jobDeploymentStatus="Suspending")
                self._delete_pods(ns, cluster, name)
                continue
            if outcome == 0:
                self._set(ns, name, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED", succeeded=1)
                return
            failed += 1
            limit = int(job["spec"].get("backoffLimit", 0))
            if failed <= limit:
                self._set(ns, name, jobDeploymentStatus="Retrying", jobStatus="FAILED", failed=failed)
                self._delete_pods(ns, cluster, name)
                continue
            self._set(ns, name, jobDeploymentStatus="Failed", jobStatus="FAILED", failed=failed,
                      reason="AppFailed", message=f"Job {name} failed with exit code {outcome}")
            return

    def _wait(self, ns: str, name: str, ready) -> bool:
        while True:
            job = self._job(ns, name)
            if job is None:
                return False
            if ready(job):
                return True
            time.sleep(0.1)

    def _pods(self, ns: str, name: str, cluster: str, workers: int) -> str:
        base = {"ray.io/cluster": cluster, "app.kubernetes.io/part-of": "b1k-train"}
        pods = [(f"{cluster}-head-{uuid.uuid4().hex[:5]}", {**base, "ray.io/node-type": "head"})]
        pods += [(f"{cluster}-worker-{uuid.uuid4().hex[:5]}", {**base, "ray.io/node-type": "worker"})
                 for _ in range(workers)]
        submitter = f"{name}-{uuid.uuid4().hex[:5]}"
        pods.append((submitter, {"job-name": name, "batch.kubernetes.io/job-name": name}))
        status = {"phase": "Running", "containerStatuses": [
            {"name": "c", "restartCount": 0, "image": "b1k-train", "imageID": "sha256:0", "started": True,
             "ready": True}]}
        for pod, labels in pods:
            self.kube.put("pods", {"metadata": {"name": pod, "namespace": ns, "labels": labels},
                                   "spec": {"containers": [{"name": "c", "image": "b1k-train"}]}, "status": status})
        return submitter

    def _delete_pods(self, ns: str, cluster: str, name: str) -> None:
        for pod in self.kube.list("pods", ns, f"ray.io/cluster={cluster}"):
            self.kube.delete("pods", ns, pod["metadata"]["name"])

    def _interrupted(self, ns: str, name: str) -> str | None:
        job = self._job(ns, name)
        if job is None:
            return "gone"
        return "suspended" if job["spec"].get("suspend") else None

    def _execute(self, ns: str, name: str, job: dict, submitter: str, cluster: str, attempt_no: int):
        """0 on success, the exit code on failure, or "gone"/"suspended" when interrupted."""
        if self.executor == "scripted":
            attempts = self.scripts.get(name) or [Attempt(["[train] done"])]
            a = attempts[min(attempt_no, len(attempts) - 1)]
            if a.restarts:
                worker = self.kube.list("pods", ns, f"ray.io/cluster={cluster},ray.io/node-type=worker")[0]
                worker["status"]["containerStatuses"][0]["restartCount"] = a.restarts
                self.kube.put("pods", worker, event="MODIFIED")
            step = a.seconds / max(1, len(a.lines))
            for line in a.lines:
                end = time.monotonic() + step
                while time.monotonic() < end:
                    if (why := self._interrupted(ns, name)) is not None:
                        return why
                    time.sleep(0.05)
                self.kube.append_log(ns, submitter, line)
            return a.exit_code
        if name in self.fail_first and attempt_no == 0:
            self.kube.append_log(ns, submitter, "ray.exceptions.NodeDiedError: the worker node was preempted")
            return 1
        return self._subprocess(ns, name, job, submitter)

    def _subprocess(self, ns: str, name: str, job: dict, submitter: str):
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        env = dict(os.environ)
        env.update({e["name"]: e["value"] for e in head.get("env", []) if "value" in e
                    and e["name"] not in ("HOME", "B1K_MODEL_CACHE", "PYTHONDONTWRITEBYTECODE")})
        env.update(self.env)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        proc = subprocess.Popen(["bash", "-c", job["spec"]["entrypoint"]], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        reader = threading.Thread(target=lambda: [self.kube.append_log(ns, submitter, line.rstrip("\n"))
                                                  for line in proc.stdout], daemon=True)
        reader.start()
        while proc.poll() is None:
            if (why := self._interrupted(ns, name)) is not None:
                kill_process_tree(proc)
                return why
            time.sleep(0.2)
        reader.join(timeout=10)
        return proc.returncode

    # --- Deployments ---------------------------------------------------------------------------------------------

    def _roll(self, dep: dict) -> None:
        """The Deployment controller: after a template change, the new pods come up (updated and available)."""
        md = dep["metadata"]
        gen = int(md.get("generation", 1))
        st = dep.get("status") or {}
        if int(st.get("observedGeneration", 0)) >= gen:
            return
        replicas = int(dep["spec"].get("replicas", 1))
        self.kube.update_status("deployments", md["namespace"], md["name"], {
            "observedGeneration": gen, "replicas": replicas + 1, "updatedReplicas": 1,
            "availableReplicas": replicas, "unavailableReplicas": 1})
        if md.get("annotations", {}).get("fake/broken") == "true":
            return  # the new pods never become ready (e.g. the model does not load)
        time.sleep(0.5)
        self.kube.update_status("deployments", md["namespace"], md["name"], {
            "observedGeneration": gen, "replicas": replicas, "updatedReplicas": replicas,
            "availableReplicas": replicas, "readyReplicas": replicas, "unavailableReplicas": None})

