"""Task -> model routing for the policy server, with lazy loading under a memory budget.

Sources (`b1k-train serve --model ...`):
- an export directory, s3:// prefix or `models:/NAME@alias` / `models:/NAME/VER`: one model serves every task;
- a `task_checkpoint_mapping.json` (the seed's format, `{"checkpoints": {name: {"path", "tasks"}}}`; the
  pipeline's also carry "model_uri"): each task goes to its checkpoint. A "path" may itself be a registry URI,
  and a relative path is taken relative to the mapping file.

Before /healthz turns 200, `preload` loads the routing's checkpoints so that no episode pays a load (issue 21: a
cold checkpoint made one step take 2.2 s): "auto" (the default) loads them in routing order while they fit the
memory budget, "all" loads every one and refuses to start when they do not fit, "none" loads only the first
(proof that the artifacts load) and the rest on first use. Models load on first use otherwise and stay resident
while the sum of their sizes fits `memory_budget_bytes`; beyond it the least recently used one is dropped (the
model in use never is); the server reports a load in the reply of the step that paid it (server_timing.load_ms).
A registry alias is looked up again on `reload()`: when it names a new version, the old model is dropped and the
next request loads the new one, while every connection stays open.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import threading
from typing import Callable

from checkpoints.model_uri import is_model_uri, lookup
from data_loaders import storage
from serving.observation import ObservationError
from serving.policy import ServingPolicy

log = logging.getLogger(__name__)
PRELOAD_MODES = ("auto", "all", "none")


@dataclasses.dataclass
class Route:
    name: str
    url: str  # as configured (a registry URI stays a URI: reload re-resolves it)
    tasks: tuple[int, ...] | None  # None = every task
    version: str | None = None  # resolved registry version


def _load_mapping(path: str) -> list[Route]:
    fs, local = storage.resolve(path)
    try:
        doc = json.loads(fs.cat_file(local))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("checkpoints"), dict) or not doc["checkpoints"]:
        raise ValueError(f'{path}: expected {{"checkpoints": {{name: {{"path": ..., "tasks": [ids]}}}}}}')
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    routes, seen = [], {}
    for name, entry in doc["checkpoints"].items():
        if not isinstance(entry, dict) or "path" not in entry or not isinstance(entry.get("tasks"), list):
            raise ValueError(f"{path}: checkpoint {name!r} needs a \"path\" and a \"tasks\" list")
        url = os.path.expanduser(str(entry["path"]))  # the seed's mapping says "~/models/checkpoint_1"
        if not (is_model_uri(url) or "://" in url or os.path.isabs(url)):
            url = storage.join(base, url)
        for t in entry["tasks"]:
            if t in seen:
                raise ValueError(f"{path}: task {t} is mapped to both {seen[t]!r} and {name!r}; map each task once")
            seen[t] = name
        routes.append(Route(name=name, url=url, tasks=tuple(int(t) for t in entry["tasks"])))
    return routes


def _is_mapping(url: str) -> bool:
    return url.endswith(".json") and not is_model_uri(url)


class ModelRouter:
    def __init__(self, source: str, *, memory_budget_bytes: int = 8 << 30, device: str = "cpu",
                 overrides: list[str] | None = None,
                 loader: Callable[..., ServingPolicy] = ServingPolicy.load, preload: str = "auto") -> None:
        if preload not in PRELOAD_MODES:
            raise ValueError(f"serving.preload must be one of {', '.join(PRELOAD_MODES)}, got {preload!r}")
        self.source, self.preload = source, preload
        self.routes = _load_mapping(source) if _is_mapping(source) else [
            Route(name=source.rstrip("/").rsplit("/", 1)[-1] or source, url=source, tasks=None)]
        self.budget, self.device, self.overrides, self._loader = memory_budget_bytes, device, overrides, loader
        self._by_task = {t: r for r in self.routes if r.tasks for t in r.tasks}
        self._resident: collections.OrderedDict[str, ServingPolicy] = collections.OrderedDict()
        self._lock = threading.RLock()
        self.loads = 0  # models loaded so far (tests and metrics)

    # --- routing -----------------------------------------------------------------------------------------------

    def route(self, task: int) -> Route:
        if self.routes[0].tasks is None:
            return self.routes[0]
        route = self._by_task.get(task)
        if route is None:
            raise ObservationError(f"unknown task id {task}: {self.source} routes tasks {sorted(self._by_task)}")
        return route

    def _key(self, route: Route) -> str:
        return f"{route.name}@{route.version}" if route.version else route.name

    def _resolved_url(self, route: Route) -> str:
        # The version pinned at resolve time, so a load racing an alias move still loads what `version` says.
        if not route.version:
            return route.url
        name = route.url[len("models:/"):].split("@", 1)[0].split("/", 1)[0]
        return f"models:/{name}/{route.version}"

    def get(self, task: int) -> ServingPolicy:
        """The model serving `task`, loading it (and evicting others beyond the budget) if needed."""
        return self._get(self.route(task), task)

    def _get(self, route: Route, task: int, evict: bool = True) -> ServingPolicy:
        with self._lock:
            if is_model_uri(route.url) and route.version is None:
                route.version = lookup(route.url).version
            key = self._key(route)
            policy = self._resident.get(key)
            if policy is not None:
                self._resident.move_to_end(key)
                return policy
            log.info("loading %s for task %d from %s", key, task, route.url)
            policy = self._loader(self._resolved_url(route), name=key, overrides=self.overrides, device=self.device)
            self.loads += 1
            self._resident[key] = policy
            while evict and len(self._resident) > 1 and self.resident_bytes > self.budget:
                old, dropped = self._resident.popitem(last=False)
                log.info("memory budget %.1f MB: unloaded %s (%.1f MB)", self.budget / 2**20, old,
                         dropped.nbytes / 2**20)
            return policy

    def peek(self, task: int) -> ServingPolicy | None:
        """The resident model for `task` without any I/O, or None (then call get() off the event loop). Never
        waits for a load in progress."""
        route = self.route(task)
        if is_model_uri(route.url) and route.version is None:
            return None
        if not self._lock.acquire(blocking=False):
            return None
        try:
            policy = self._resident.get(self._key(route))
            if policy is not None:
                self._resident.move_to_end(self._key(route))
            return policy
        finally:
            self._lock.release()

    @property
    def resident_bytes(self) -> int:
        return sum(p.nbytes for p in self._resident.values())

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._resident)

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Check every route points at a complete export (registry versions resolved), then load the models
        `preload` asks for: after this the server can answer. Raises naming the broken route."""
        from checkpoints.export_reader import read_state

        for route in self.routes:
            try:
                if is_model_uri(route.url):
                    route.version = lookup(route.url).version
                else:
                    read_state(route.url)
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"model {route.name!r} ({route.url}): {e}") from e
        self._preload()

    def _preload(self) -> None:
        todo = self.routes if self.preload != "none" else self.routes[:1]
        for i, route in enumerate(todo):
            self._get(route, route.tasks[0] if route.tasks else 0, evict=False)
            if self.resident_bytes <= self.budget or i == 0:
                continue
            # The LRU rule would now drop an earlier checkpoint: keep the ones loaded so far instead.
            with self._lock:
                dropped = self._resident.pop(self._key(route))
            need = sum(p.nbytes for p in self._resident.values()) + dropped.nbytes
            if self.preload == "all":
                raise ValueError(f"serving.preload=all: the routing's checkpoints need more than {need / 2**30:.2f}"
                                 f" GiB, over the memory budget of {self.budget / 2**30:.2f} GiB; raise "
                                 f"--memory-budget-gb or use serving.preload=auto")
            rest = ", ".join(r.name for r in todo[i:])
            log.warning("serving.preload=auto: %s do(es) not fit the memory budget of %.2f GiB next to %s; loaded "
                        "on first use (an episode then waits for the load)", rest, self.budget / 2**30,
                        ", ".join(self._resident))
            return

    def reload(self) -> dict[str, str | None]:
        """Look registry aliases up again; models whose alias moved are dropped (loaded again on next use).
        Returns {route name: version}."""
        with self._lock:
            for route in self.routes:
                if not is_model_uri(route.url):
                    continue
                version = lookup(route.url).version
                if version != route.version:
                    log.info("%s now names version %s (was %s)", route.url, version, route.version)
                    self._resident.pop(self._key(route), None)
                    route.version = version
            return {r.name: r.version for r in self.routes}

    def describe(self) -> dict:
        """For the connect-time metadata and the admin endpoint: models by name, registry alias and version, never
        by path or URL (they name the host's directories and buckets). String keys only: the evaluator decodes
        the metadata with msgpack's strict_map_key."""
        return {"models": [{"name": r.name, "alias": _alias(r.url), "version": r.version,
                            "tasks": list(r.tasks) if r.tasks else "all"} for r in self.routes],
                "resident": self.resident(), "preload": self.preload}


def _alias(url: str) -> str | None:
    """The alias of a `models:/NAME@alias` URI (None for a path or a pinned version)."""
    return url.rsplit("@", 1)[1] if is_model_uri(url) and "@" in url else None
