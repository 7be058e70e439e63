"""A Kubernetes API server on 127.0.0.1 for the endpoints b1k-train uses, with Kubernetes' semantics: RayJobs in
ray.io/v1 (validated against the KubeRay CRD schema, unknown fields rejected), Deployments in apps/v1, pods and
their logs; create/get/list/patch/delete, watch streams, resourceVersions and generations, `Status` error bodies
(401, 403, 404, 409, 422), bearer-token auth, RBAC denials and a cluster without the KubeRay CRDs on demand.

No Kubernetes API server can run on the CI machines; the real `kubernetes` client talks to this one through a
kubeconfig, so everything above the HTTP layer is exercised for real.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from tests.chart.support import crd_errors

RESOURCES = {  # plural -> (group, version, kind)
    "rayjobs": ("ray.io", "v1", "RayJob"),
    "deployments": ("apps", "v1", "Deployment"),
    "pods": ("", "v1", "Pod"),
}
ROUTE = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/(?P<version>[^/]+))/namespaces/(?P<ns>[^/]+)/"
                   r"(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>log|status))?$")
DNS = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def status_body(code: int, reason: str, message: str, details: dict | None = None) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes a key)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def json_patch(target: dict, ops: list[dict]) -> dict:
    """RFC 6902 add/replace/remove (what clients send for simple edits)."""
    out = copy.deepcopy(target)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        node = out
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if op["op"] in ("add", "replace"):
            if isinstance(node, list):
                node.insert(int(last), op["value"]) if op["op"] == "add" else node.__setitem__(int(last), op["value"])
            else:
                node[last] = op["value"]
        elif op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
        else:
            raise ValueError(f"unsupported json-patch op {op['op']}")
    return out


def _matches(obj: dict, label_selector: str, field_selector: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, (label_selector or "").split(",")):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.split("==" if "==" in term else "=", 1)
            if labels.get(k) != v:
                return False
        elif term not in labels:
            return False
    for term in filter(None, (field_selector or "").split(",")):
        k, v = term.split("=", 1)
        if k == "metadata.name" and obj["metadata"]["name"] != v:
            return False
        if k == "metadata.namespace" and obj["metadata"]["namespace"] != v:
            return False
    return True


def _normalize_quantities(obj: dict) -> dict:
    """Resource quantities come back as strings from a real API server (`nvidia.com/gpu: 1` is stored as "1")."""
    pod = (obj.get("spec") or {}).get("template", {}).get("spec") if obj.get("kind") != "Pod" else obj.get("spec")
    for c in (pod or {}).get("containers", []) if isinstance(pod, dict) else []:
        for part in ("requests", "limits"):
            values = (c.get("resources") or {}).get(part) or {}
            for k, v in values.items():
                values[k] = str(v)
    return obj


class FakeKube:
    """The store, the HTTP server and the knobs tests turn (RBAC denials, missing CRDs, outages)."""

    def __init__(self, *, token: str = "b1k-test-token", user: str = "system:serviceaccount:ml:b1k-ci"):
        self.token, self.user = token, user
        self.crds_installed = True
        self.forbidden: set[tuple[str, str]] = set()  # (verb, plural) RBAC denies
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.logs: dict[tuple[str, str], list[str]] = {}  # (namespace, pod) -> lines
        self.events: list[tuple[int, str, str, dict]] = []  # (resourceVersion, plural, type, object)
        self.requests: list[tuple[str, str]] = []
        self.cond = threading.Condition()
        self.rv = 100
        self.listeners: list[Any] = []  # controllers: on_event(type, plural, obj)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakeKube:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def write_kubeconfig(self, path: str, *, namespace: str = "ml", token: str | None = None) -> str:
        import yaml

        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
               "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
               "users": [{"name": "ci", "user": {"token": token or self.token}}],
               "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "ci", "namespace": namespace}}]}
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        return path

    # --- store operations (also used directly by the fake controllers) -----------------------------------------

    def _bump(self, plural: str, kind: str, obj: dict) -> dict:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.events.append((self.rv, plural, kind, copy.deepcopy(obj)))
        self.cond.notify_all()
        return obj

    def put(self, plural: str, obj: dict, *, event: str = "ADDED") -> dict:
        with self.cond:
            group, version, kind = RESOURCES[plural]
            obj = _normalize_quantities(copy.deepcopy(obj))
            obj.setdefault("apiVersion", f"{group}/{version}" if group else version)
            obj.setdefault("kind", kind)
            md = obj["metadata"]
            md.setdefault("namespace", "ml")
            md.setdefault("uid", str(uuid.uuid4()))
            md.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            md.setdefault("generation", 1)
            self.objects[(plural, md["namespace"], md["name"])] = obj
            self._bump(plural, event, obj)
        self._notify(event, plural, obj)
        return copy.deepcopy(obj)

    def get(self, plural: str, ns: str, name: str) -> dict | None:
        with self.cond:
            obj = self.objects.get((plural, ns, name))
            return copy.deepcopy(obj) if obj else None

    def update_status(self, plural: str, ns: str, name: str, status: dict) -> dict | None:
        """Merge `status` into the object's status (what a controller does through /status)."""
        with self.cond:
            obj = self.objects.get((plural, ns, name))
            if obj is None:
                return None
            obj["status"] = merge_patch(obj.get("status") or {}, status)
            self._bump(plural, "MODIFIED", obj)
            return copy.deepcopy(obj)

    def delete(self, plural: str, ns: str, name: str) -> dict | None:
        with self.cond:
            obj = self.objects.pop((plural, ns, name), None)
            if obj is not None:
                self._bump(plural, "DELETED", obj)
                self.logs.pop((ns, name), None)
        if obj is not None:
            self._notify("DELETED", plural, obj)
        return obj

    def list(self, plural: str, ns: str, label_selector: str = "", field_selector: str = "") -> list[dict]:
        with self.cond:
            return [copy.deepcopy(o) for (p, n, _), o in sorted(self.objects.items())
                    if p == plural and n == ns and _matches(o, label_selector, field_selector)]

    def append_log(self, ns: str, pod: str, line: str) -> None:
        with self.cond:
            self.logs.setdefault((ns, pod), []).append(line)

    def _notify(self, event: str, plural: str, obj: dict) -> None:
        for listener in list(self.listeners):
            listener.on_event(event, plural, copy.deepcopy(obj))


def _handler(kube: FakeKube):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: tests read kube.requests instead
            pass

        def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _fail(self, code: int, reason: str, message: str, details: dict | None = None) -> None:
            self._send(code, status_body(code, reason, message, details))

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"null")

        def do_GET(self) -> None:  # noqa: N802
            self._route("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._route("POST")

        def do_PATCH(self) -> None:  # noqa: N802
            self._route("PATCH")

        def do_PUT(self) -> None:  # noqa: N802
            self._route("PUT")

        def do_DELETE(self) -> None:  # noqa: N802
            self._route("DELETE")

        def _route(self, method: str) -> None:
            url = urlparse(self.path)
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            kube.requests.append((method, self.path))
            if self.headers.get("Authorization") != f"Bearer {kube.token}":
                return self._fail(401, "Unauthorized", "Unauthorized")
            m = ROUTE.match(url.path)
            if not m or m.group("plural") not in RESOURCES:
                return self._fail(404, "NotFound", "the server could not find the requested resource")
            plural, ns, name, sub = m.group("plural"), m.group("ns"), m.group("name"), m.group("sub")
            group, version, kind = RESOURCES[plural]
            if (m.group("group") or "") != group:
                return self._fail(404, "NotFound", "the server could not find the requested resource")
            if plural == "rayjobs" and not kube.crds_installed:
                return self._fail(404, "NotFound", "the server could not find the requested resource")
            watch = q.get("watch") in ("1", "true")
            verb = {"GET": "watch" if watch else ("get" if name else "list"), "POST": "create", "PATCH": "patch",
                    "PUT": "update", "DELETE": "delete"}[method]
            resource = f"{plural}/{sub}" if sub else plural
            if (verb, resource) in kube.forbidden:
                what = f'{plural}.{group} "{name}"' if group and name else (f'{plural}.{group}' if group else plural)
                return self._fail(403, "Forbidden", f'{what} is forbidden: User "{kube.user}" cannot {verb} resource '
                                  f'"{resource}" in API group "{group}" in the namespace "{ns}"',
                                  {"name": name or "", "group": group, "kind": plural})
            details = {"name": name, "group": group, "kind": plural}
            if verb == "watch":
                return self._watch(plural, ns, q)
            if verb == "list":
                items = kube.list(plural, ns, q.get("labelSelector", ""), q.get("fieldSelector", ""))
                return self._send(200, {"apiVersion": f"{group}/{version}" if group else version,
                                        "kind": f"{kind}List", "metadata": {"resourceVersion": str(kube.rv)},
                                        "items": items})
            if verb == "create":
                return self._create(plural, ns, kind, group, version, self._body())
            obj = kube.get(plural, ns, name)
            if obj is None:
                return self._fail(404, "NotFound", f'{plural}.{group} "{name}" not found' if group else
                                  f'{plural} "{name}" not found', details)
            if sub == "log":
                lines = list(kube.logs.get((ns, name), []))
                if q.get("tailLines"):
                    lines = lines[-int(q["tailLines"]):]
                return self._send(200, "".join(line + "\n" for line in lines), "text/plain")
            if verb == "get":
                return self._send(200, obj)
            if verb == "delete":
                kube.delete(plural, ns, name)
                return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success",
                                        "details": details})
            return self._patch(plural, obj, self._body(), self.headers.get("Content-Type", ""))

        def _create(self, plural, ns, kind, group, version, body) -> None:
            name = (body.get("metadata") or {}).get("name", "")
            want = f"{group}/{version}" if group else version
            if body.get("kind") != kind or body.get("apiVersion") != want:
                return self._fail(400, "BadRequest", f"expected {want} {kind}, got {body.get('apiVersion')} "
                                  f"{body.get('kind')}")
            if not DNS.match(name or "") or len(name) > 63:
                return self._fail(422, "Invalid", f'{kind} "{name}" is invalid: metadata.name: Invalid value',
                                  {"name": name, "kind": plural, "causes": [
                                      {"reason": "FieldValueInvalid", "field": "metadata.name",
                                       "message": "a lowercase RFC 1123 subdomain"}]})
            if kube.get(plural, ns, name) is not None:
                return self._fail(409, "AlreadyExists", f'{plural}.{group} "{name}" already exists',
                                  {"name": name, "group": group, "kind": plural})
            if not self._valid(plural, body):
                return
            body.setdefault("metadata", {})["namespace"] = ns
            body.pop("status", None)
            self._send(201, kube.put(plural, body))

        def _valid(self, plural: str, obj: dict) -> bool:
            if plural != "rayjobs":
                return True
            errors = crd_errors({k: v for k, v in obj.items() if k != "status"})
            if errors:
                name = obj["metadata"]["name"]
                self._fail(422, "Invalid", f'RayJob.ray.io "{name}" is invalid: ' + "; ".join(errors),
                           {"name": name, "group": "ray.io", "kind": "RayJob",
                            "causes": [{"reason": "FieldValueInvalid", "field": e.split(":")[0],
                                        "message": e.split(": ", 1)[-1]} for e in errors]})
                return False
            return True

        def _patch(self, plural: str, obj: dict, patch: Any, content_type: str) -> None:
            if "json-patch" in content_type:
                new = json_patch(obj, patch)
            elif "merge-patch" in content_type or "strategic-merge-patch" in content_type:
                new = merge_patch(obj, patch)
            else:
                return self._fail(415, "UnsupportedMediaType", f"unsupported patch type {content_type!r}")
            for k in ("name", "namespace", "uid", "creationTimestamp", "generation"):  # not the client's to change
                new["metadata"][k] = obj["metadata"][k]
            if not self._valid(plural, new):
                return
            if new.get("spec") != obj.get("spec"):
                new["metadata"]["generation"] = int(obj["metadata"].get("generation", 1)) + 1
            self._send(200, kube.put(plural, new, event="MODIFIED"))

        def _watch(self, plural: str, ns: str, q: dict) -> None:
            since = int(q.get("resourceVersion") or 0)
            deadline = time.monotonic() + float(q.get("timeoutSeconds") or 30)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")  # so the client does not pool a connection this side closes
            self.end_headers()
            sent = since
            try:
                if not since:  # no resourceVersion: the current objects first, as ADDED
                    for obj in kube.list(plural, ns, q.get("labelSelector", ""), q.get("fieldSelector", "")):
                        self._chunk({"type": "ADDED", "object": obj})
                    sent = kube.rv
                while time.monotonic() < deadline:
                    with kube.cond:
                        fresh = [e for e in kube.events if e[0] > sent and e[1] == plural]
                        if not fresh:
                            kube.cond.wait(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
                            continue
                    for rv, _, kind, obj in fresh:
                        sent = rv
                        if obj["metadata"]["namespace"] == ns and _matches(obj, q.get("labelSelector", ""),
                                                                           q.get("fieldSelector", "")):
                            self._chunk({"type": kind, "object": obj})
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

        def _chunk(self, event: dict) -> None:
            data = (json.dumps(event) + "\n").encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    return Handler
