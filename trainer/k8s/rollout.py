"""Roll the policy-server Deployment to the version a registry alias now points at, and wait until it is ready."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from trainer.k8s.api import KubeApi
from trainer.k8s.errors import K8sError, RolloutTimeout

MODEL_ANNOTATION = "b1k-train/model"
VERSION_ANNOTATION = "b1k-train/model-version"


def served_model(deployment: dict[str, Any]) -> str:
    """The --model argument of the Deployment's policy-server container."""
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        args = list(c.get("args") or [])
        for i, a in enumerate(args):
            if a.startswith("--model="):
                return a.split("=", 1)[1]
            if a == "--model" and i + 1 < len(args):
                return args[i + 1]
    raise K8sError(f"Deployment {deployment['metadata']['name']} runs no `b1k-train serve --model …` container: "
                   f"pass --deployment naming the policy server's Deployment")


def rollout(api: KubeApi, deployment: str, *, model_uri: str, version: str, timeout_s: float = 600.0,
            poll_s: float = 2.0, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Restart the Deployment's pods so they load `model_uri` (now at registry `version`), then wait for every
    replica to be updated and available. The pod template gets the version as an annotation, so the rollout is
    recorded and a repeat for the same version changes nothing."""
    dep = api.get_deployment(deployment)
    serving = served_model(dep)
    if serving != model_uri:
        raise K8sError(f"Deployment {api.namespace}/{deployment} serves {serving}, not {model_uri}: roll the "
                       f"Deployment that serves it, or change serving.model in the chart values")
    current = ((dep["spec"]["template"].get("metadata") or {}).get("annotations") or {}).get(VERSION_ANNOTATION)
    if current == str(version):
        out(f"{deployment} already runs {model_uri} version {version}")
    else:
        out(f"rolling {deployment} to {model_uri} version {version} (was {current or 'unrecorded'})")
        dep = api.patch_deployment(deployment, {"spec": {"template": {"metadata": {"annotations": {
            MODEL_ANNOTATION: model_uri, VERSION_ANNOTATION: str(version)}}}}})
    return wait_ready(api, deployment, generation=int(dep["metadata"].get("generation", 0)), timeout_s=timeout_s,
                      poll_s=poll_s, out=out)


def wait_ready(api: KubeApi, deployment: str, *, generation: int, timeout_s: float, poll_s: float,
               out: Callable[[str], None]) -> dict[str, Any]:
    """Wait until the controller has seen `generation` and all replicas are updated and available (what
    `kubectl rollout status` checks)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        dep = api.get_deployment(deployment)
        want = int(dep["spec"].get("replicas", 1))
        st = dep.get("status") or {}
        updated, available = int(st.get("updatedReplicas", 0)), int(st.get("availableReplicas", 0))
        total = int(st.get("replicas", 0))
        line = f"{deployment}: {updated}/{want} updated, {available}/{want} available"
        if line != last:
            out(line)
            last = line
        if int(st.get("observedGeneration", 0)) >= generation and updated == want == available and total == want:
            return dep
        if time.monotonic() > deadline:
            raise RolloutTimeout(f"Deployment {api.namespace}/{deployment} not ready after {timeout_s:.0f} s ({line}): "
                                 f"see `kubectl -n {api.namespace} describe deploy/{deployment}` and the new pods' "
                                 f"logs (does the model load? /healthz answers 503 until it does)")
        time.sleep(poll_s)
