"""Experiment tracking on MLflow, from rank 0: one MLflow run per training run, kept across crash-resumes.

`make_tracker(rank)` gives rank 0 a `Tracker` and every other rank a `NullTracker` with the same methods, so the
loop calls them unconditionally. `Tracker.start(...)` returns the MLflow run id; the caller stores it in its
checkpoint and passes it back as `resume_run_id` after a restart, which reopens that same run.

Where runs go: `tracking_uri` if given, else $MLFLOW_TRACKING_URI, else a SQLite database `<local_dir>/mlflow.db`
with artifacts in `<local_dir>/mlartifacts` (no server; browse with `mlflow ui --backend-store-uri sqlite:///...`).

Failure policy: tracking never stops training.
- `log_params`/`log_metrics` only append to an in-memory buffer; a daemon thread sends it every `flush_interval_s`
  with `MlflowClient.log_batch` (at most 1000 metrics per request). A slow or dead server costs the loop nothing.
- A failed request logs a warning and counts in `num_failures`; the thread then waits `retry_after_s` before the
  next attempt. Metrics stay buffered (at most `max_buffered_metrics`; beyond that the oldest are dropped and
  counted in `num_dropped_metrics`) and go out once the server is back. Requests MLflow rejects as invalid (4xx)
  are dropped with a warning rather than retried forever.
- If the server cannot be reached at `start`, the run is created (or reopened) by the first later flush that gets
  through. Until then `run_id` is `resume_run_id` (None for a new run), so store `tracker.run_id` at each save.
- `log_artifact`/`log_dict` upload in the caller's thread (the file may not exist later); while the server is
  known to be down they are skipped with a warning.
- MLflow's HTTP retries (default 7 with exponential backoff, minutes in total) are lowered to `http_max_retries`
  (default 2 unless $MLFLOW_HTTP_REQUEST_MAX_RETRIES is set) for the whole process, so `end()` on a dead server
  returns within seconds.
- Only programming errors raise: a bad `status`, `start` twice, logging before `start`, a missing artifact file,
  no way to choose a tracking URI.

Replayed steps: after a crash the loop restarts from the last checkpoint, so the steps between that checkpoint and
the crash run again. A reopened run therefore drops points at steps it already has (up to the last step of its
`loss` history), so each step appears once; points the crashed attempt never sent are logged by the replay. The
run tag `b1k.num_resumes` says how often the run was reopened. A batch re-sent because its response was lost can
still duplicate points. NaN is stored as NaN; +-inf become +-1.8e308 (MLflow's SQL stores clamp them).

System metrics (CPU, memory, disk, network, and GPU when pynvml is present; keys `system/...`) come from MLflow's
own monitor thread sampling every `system_metrics_interval_s`. It is restarted after a server outage (MLflow's
monitor stops itself when a request fails) and stopped by `end()`.
"""

from __future__ import annotations

import atexit
import dataclasses
import enum
import json
import logging
import os
import posixpath
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from trainer.redact import REDACTOR

log = logging.getLogger(__name__)

MAX_PARAM_VALUE_CHARS = 6000  # MLflow rejects longer param values (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
MAX_KEY_CHARS = 250  # MLflow's limit for param and metric names
END_STATUSES = ("FINISHED", "FAILED", "KILLED")
_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # what MLflow accepts in a name, on POSIX
_TAG_RUN_DIR = "b1k.run_dir"
_TAG_NUM_RESUMES = "b1k.num_resumes"
_REPLAY_KEY = "loss"  # the metric whose last step tells a reopened run which steps it already has


# --- config flattening ---------------------------------------------------------------------------------------


def flatten_config(config: Any) -> dict[str, str]:
    """Flatten a (nested) dataclass or mapping to MLflow params: dotted keys, string values of <= 6000 chars.

    Nested dataclasses and mappings become `outer.inner` keys; sequences holding dataclasses or mappings are indexed
    (`groups.0.lr`); other sequences are written as one JSON list. Enums give their name, None gives "None".
    """
    if not (_is_record(config) or isinstance(config, Mapping)):
        raise TypeError(f"flatten_config expects a dataclass instance or a mapping, got {type(config).__name__}")
    out: dict[str, str] = {}
    _flatten_into(out, "", config)
    return out


def _is_record(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _flatten_into(out: dict[str, str], key: str, value: Any) -> None:
    if _is_record(value):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)) and any(_is_record(v) or isinstance(v, Mapping) for v in value):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        out[key] = _param_value(value)
        return
    if not items and key:
        out[key] = "[]" if isinstance(value, (list, tuple)) else "{}"
    for name, child in items:
        _flatten_into(out, f"{key}.{name}" if key else name, child)


def _param_value(value: Any) -> str:
    if isinstance(value, enum.Enum):
        text = value.name
    elif isinstance(value, (list, tuple)):
        text = json.dumps([v.name if isinstance(v, enum.Enum) else v for v in value], default=str)
    else:
        text = str(value)
    return text if len(text) <= MAX_PARAM_VALUE_CHARS else text[: MAX_PARAM_VALUE_CHARS - 3] + "..."


def clean_key(key: Any) -> str:
    """A param/metric name MLflow accepts: disallowed characters become "_", at most 250 chars."""
    clean = _BAD_KEY_CHARS.sub("_", str(key))[:MAX_KEY_CHARS]
    norm = posixpath.normpath(clean)
    if norm != clean or norm.startswith((".", "/")):  # MLflow also wants names that are canonical paths
        clean = ("_" + clean.replace("/", "_"))[:MAX_KEY_CHARS]
    return clean


# --- where the runs go ---------------------------------------------------------------------------------------


def resolve_tracking_uri(tracking_uri: str | None, *, run_dir_uri: str,
                         local_dir: str | None) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment, None meaning the store's default).

    Explicit `tracking_uri`, else $MLFLOW_TRACKING_URI, else SQLite under `local_dir` (or under `run_dir_uri` when
    that is a local path).
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    if local_dir is None:
        parsed = urlparse(run_dir_uri)
        if parsed.scheme not in ("", "file"):
            raise ValueError(
                f"no MLflow tracking URI: pass tracking_uri=..., set MLFLOW_TRACKING_URI, or pass local_dir=... "
                f"for a local SQLite store (run_dir_uri {run_dir_uri!r} is not a local path)")
        local_dir = parsed.path if parsed.scheme == "file" else run_dir_uri
    root = os.path.abspath(local_dir)
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db", Path(root, "mlartifacts").as_uri()


# --- the tracker ---------------------------------------------------------------------------------------------


class _ConfigError(Exception):
    """The tracking setup cannot work (e.g. a deleted experiment); retrying will not help."""


def _is_permanent(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, _ConfigError):
        return True
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return 400 <= status < 500 and status != 429
    return False


def _short(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + "..."


@dataclasses.dataclass(frozen=True, kw_only=True)
class _RunSpec:
    uri: str
    artifact_location: str | None
    run_dir_uri: str
    experiment: str
    run_name: str
    resume_run_id: str | None
    system_metrics: bool


class Tracker:
    """MLflow tracking for rank 0. See the module docstring for the failure policy.

    Args:
        system_metrics_interval_s: seconds between system-metric samples ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
            wins if set).
        flush_interval_s: how often the background thread sends buffered params and metrics.
        retry_after_s: pause after a failed request before the next attempt.
        max_buffered_metrics: metric points kept while the server is unreachable; the oldest are dropped beyond.
        http_max_retries / http_timeout_s: MLflow's HTTP retry count and per-request timeout, set process-wide
            ($MLFLOW_HTTP_REQUEST_MAX_RETRIES / $MLFLOW_HTTP_REQUEST_TIMEOUT). None keeps the environment's value
            or, if unset, uses 2 retries and 30 s.
    """

    def __init__(self, *, system_metrics_interval_s: float = 10.0, flush_interval_s: float = 5.0,
                 retry_after_s: float = 30.0, max_buffered_metrics: int = 100_000,
                 http_max_retries: int | None = None, http_timeout_s: int | None = None):
        if system_metrics_interval_s <= 0 or flush_interval_s <= 0 or retry_after_s < 0:
            raise ValueError("system_metrics_interval_s and flush_interval_s must be > 0, retry_after_s >= 0")
        if max_buffered_metrics < 1:
            raise ValueError(f"max_buffered_metrics must be >= 1, got {max_buffered_metrics}")
        self._system_metrics_interval_s = system_metrics_interval_s
        self._flush_interval_s = flush_interval_s
        self._retry_after_s = retry_after_s
        self._max_buffered = max_buffered_metrics
        self._http = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": (http_max_retries, 2),
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": (http_timeout_s, 30)}
        self._spec: _RunSpec | None = None
        self._client: Any = None
        self._run_id: str | None = None  # set once the run exists (or is reopened) on the server
        self._logged_params: dict[str, str] = {}  # what the MLflow run already has
        self._pending_params: dict[str, str] = {}
        self._pending_metrics: deque[tuple[str, float, int, int]] = deque()  # (key, value, timestamp_ms, step)
        self._lock = threading.Lock()  # guards the pending buffers and counters
        self._io_lock = threading.Lock()  # one conversation with the server at a time
        self._num_failures = 0
        self._num_dropped = 0
        self._retry_at = 0.0  # time.monotonic() before which the server is left alone
        self._in_outage = False
        self._disabled = False  # a permanent setup error: nothing more is sent
        self._monitor: Any = None
        self._warned_values: set[str] = set()
        self._logged_through = -1  # a reopened run already has every step up to this one
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ended = False

    # -- public API --

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; before the server was first reached, the `resume_run_id` given to `start`."""
        if self._run_id is not None:
            return self._run_id
        return self._spec.resume_run_id if self._spec else None

    @property
    def num_failures(self) -> int:
        """Requests to the tracking server that failed (each also logged as a warning)."""
        return self._num_failures

    @property
    def num_dropped_metrics(self) -> int:
        """Metric points given up on: buffer overflow during an outage, or rejected by MLflow."""
        return self._num_dropped

    def start(self, *, run_dir_uri: str, experiment: str, run_name: str, resume_run_id: str | None,
              tracking_uri: str | None, system_metrics: bool = True, local_dir: str | None = None) -> str | None:
        """Create the MLflow run, or reopen `resume_run_id`, and start the background sender.

        Returns the run id to store in the checkpoint (see `run_id`). `run_dir_uri` (where the training run writes
        its checkpoints) is recorded as the run tag `b1k.run_dir`; `local_dir` holds the default SQLite store.
        A run id that no longer exists (another tracking server, deleted run) gets a new run and a warning.
        """
        if self._spec is not None:
            raise RuntimeError("Tracker.start was already called; use one Tracker per training run")
        from mlflow import MlflowClient

        uri, artifact_location = resolve_tracking_uri(tracking_uri, run_dir_uri=run_dir_uri, local_dir=local_dir)
        for var, (value, default) in self._http.items():
            if value is not None:
                os.environ[var] = str(value)
            else:
                os.environ.setdefault(var, str(default))
        self._spec = _RunSpec(uri=uri, artifact_location=artifact_location, run_dir_uri=run_dir_uri,
                              experiment=experiment, run_name=run_name, resume_run_id=resume_run_id,
                              system_metrics=system_metrics)
        self._client = MlflowClient(uri)
        with self._io_lock:
            self._open_run()
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-tracker", daemon=True)
        self._thread.start()
        atexit.register(self._end_at_exit)
        return self.run_id

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Queue params (a flat mapping, e.g. from `flatten_config`); values are stringified and truncated.

        MLflow params are immutable: keys the run already has are skipped (on resume), with a warning listing
        those whose value changed.
        """
        self._check_started()
        clean = {clean_key(k): REDACTOR(_param_value(v)) for k, v in flat.items()}
        with self._lock:
            self._pending_params.update(clean)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue one point per metric at `step` (never blocks on the network).

        Values go through float() (Python/numpy numbers, one-element tensors); others are skipped with a warning.
        """
        self._check_started()
        if self._ended:
            return
        timestamp_ms = int(time.time() * 1000)
        points = []
        for key, value in metrics.items():
            try:
                points.append((clean_key(key), float(value), timestamp_ms, int(step)))
            except (TypeError, ValueError, RuntimeError):
                if key not in self._warned_values:
                    self._warned_values.add(key)
                    log.warning("metric %r: %r is not a number; not logged (warned once per key)", key, value)
        with self._lock:
            self._pending_metrics.extend(points)
            self._trim_metrics()

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents, into the run's artifacts under `artifact_path`, in the
        caller's thread."""
        self._check_started()
        if not os.path.exists(local_path):
            raise FileNotFoundError(f"artifact to log does not exist: {local_path}")
        if os.path.isdir(local_path):  # its contents go under artifact_path (the run's root when None)
            upload = lambda: self._client.log_artifacts(self._run_id, os.fspath(local_path), artifact_path)  # noqa: E731
        else:
            upload = lambda: self._client.log_artifact(self._run_id, os.fspath(local_path), artifact_path)  # noqa: E731
        self._upload(f"log artifact {os.fspath(local_path)}", upload)

    def log_dict(self, obj: Any, name: str) -> None:
        """Write `obj` as the run artifact `name`: YAML for .yaml/.yml, else JSON (non-JSON values via str)."""
        self._check_started()
        if name.endswith((".yaml", ".yml")):
            clean = REDACTOR.obj(obj)
            self._upload(f"log {name}", lambda: self._client.log_dict(self._run_id, clean, name))
        else:
            text = REDACTOR(json.dumps(REDACTOR.obj(obj), indent=2, default=str))
            self._upload(f"log {name}", lambda: self._client.log_text(self._run_id, text, name))

    def flush(self) -> bool:
        """Send everything queued now, in the caller's thread (one attempt, even while waiting to retry).

        Returns True when nothing is left to send.
        """
        self._check_started()
        with self._io_lock:
            return self._send_pending()

    def end(self, status: str = "FINISHED") -> None:
        """Send what is queued, stop system metrics and mark the run `status` (FINISHED, FAILED or KILLED).

        Idempotent. Call it from a `finally` with "FAILED" when training raises; a process that exits without it
        marks the run KILLED at interpreter exit.
        """
        if status not in END_STATUSES:
            raise ValueError(f"status must be one of {END_STATUSES}, got {status!r}")
        if self._spec is None or self._ended:
            return
        self._ended = True
        atexit.unregister(self._end_at_exit)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._io_lock:
            sent = self._send_pending()
            self._stop_monitor()
            if sent:
                try:
                    self._client.set_terminated(self._run_id, status)
                except Exception as e:
                    self._failed(f"mark the run {status}", e)
        if not sent:
            log.warning("MLflow run %s ended with %d metric points and %d params never sent (server %s unreachable)",
                        self.run_id or "(never created)", len(self._pending_metrics), len(self._pending_params),
                        self._spec.uri)

    # -- internals --

    def _check_started(self) -> None:
        if self._spec is None:
            raise RuntimeError("call Tracker.start(...) before logging")

    def _trim_metrics(self) -> None:  # with self._lock held
        overflow = len(self._pending_metrics) - self._max_buffered
        if overflow > 0:
            for _ in range(overflow):
                self._pending_metrics.popleft()
            self._num_dropped += overflow

    def _failed(self, what: str, exc: BaseException) -> bool:
        """Count and report a failed request (with self._io_lock held); returns True if retrying is pointless."""
        self._num_failures += 1
        if _is_permanent(exc):
            log.warning("MLflow refused to %s; dropped: %s", what, _short(exc))
            return True
        self._retry_at = time.monotonic() + self._retry_after_s
        self._in_outage = True
        log.warning("could not %s on the MLflow tracking server %s (failure %d); training goes on, next attempt in "
                    "%.0f s: %s", what, self._spec.uri, self._num_failures, self._retry_after_s, _short(exc))
        return False

    def _open_run(self) -> bool:
        """Make sure the MLflow run exists and is RUNNING (with self._io_lock held); False if not reachable."""
        if self._run_id is not None:
            return True
        if self._disabled:
            return False
        spec = self._spec
        try:
            run_id = spec.resume_run_id or self._run_of_run_dir()
            run = self._reopen(run_id) if run_id else None
            resumed = run is not None
            if run is None:
                run = self._client.create_run(self._experiment_id(), run_name=spec.run_name,
                                              tags={_TAG_RUN_DIR: spec.run_dir_uri, _TAG_NUM_RESUMES: "0"})
        except Exception as e:
            if self._failed(f"open MLflow run {spec.resume_run_id or spec.run_name!r}", e):
                self._disabled = True
                log.error("MLflow tracking is off for this training run: the setup at %s cannot work (see above)",
                          spec.uri)
            return False
        self._run_id = run.info.run_id
        self._logged_params = dict(run.data.params)
        log.info("MLflow run %s (%s) at %s", self._run_id, "resumed" if resumed else "new", spec.uri)
        if spec.system_metrics:
            self._start_monitor(resumed=resumed)
        return True

    def _run_of_run_dir(self) -> str | None:
        """The MLflow run already tracking this run directory, if any. A run killed before its first checkpoint
        has no run id in storage to resume from; its MLflow run (and the steps it logged, which the deterministic
        replay reproduces) is continued instead of leaving an orphan next to a second run."""
        if not self._spec.run_dir_uri:
            return None
        uri = self._spec.run_dir_uri.replace("'", "\\'")
        found = self._client.search_runs([self._experiment_id()], filter_string=f"tags.`{_TAG_RUN_DIR}` = '{uri}'",
                                         max_results=1, order_by=["attributes.start_time DESC"])
        return found[0].info.run_id if found else None

    def _reopen(self, run_id: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            log.warning("MLflow run %s (from the checkpoint) is missing or deleted at %s; starting a new run",
                        run_id, self._spec.uri)
            return None
        history = self._client.get_metric_history(run_id, _REPLAY_KEY) if _REPLAY_KEY in run.data.metrics else []
        self._logged_through = max((m.step for m in history), default=-1)
        num_resumes = int(run.data.tags.get(_TAG_NUM_RESUMES, "0")) + 1
        self._client.update_run(run_id, status="RUNNING")
        self._client.set_tag(run_id, _TAG_NUM_RESUMES, str(num_resumes))
        return run

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self._spec.experiment
        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self._client.create_experiment(name, artifact_location=self._spec.artifact_location)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self._client.get_experiment_by_name(name)  # another process created it in between
        if exp.lifecycle_stage == "deleted":
            raise _ConfigError(f"MLflow experiment {name!r} is deleted: restore it (`mlflow experiments restore`) "
                               f"or use another experiment name")
        return exp.experiment_id

    def _send_loop(self) -> None:
        while not self._stop.wait(self._flush_interval_s):
            if time.monotonic() < self._retry_at:
                continue
            try:
                with self._io_lock:
                    self._send_pending()
            except Exception:  # a bug here must not silently end tracking for the rest of the run
                log.exception("MLflow tracker: unexpected error while sending")

    def _send_pending(self) -> bool:
        """One attempt to open the run and send queued params and metrics (with self._io_lock held)."""
        if not self._open_run():
            return False
        done = self._send_params() and self._send_metrics()
        if done and self._in_outage:
            self._in_outage = False
            log.warning("MLflow tracking server %s is reachable again (%d failed requests so far)",
                        self._spec.uri, self._num_failures)
            if self._monitor is not None:  # MLflow's monitor thread stops at its first failed request
                self._stop_monitor()
                self._start_monitor(resumed=True)
        return done

    def _send_params(self) -> bool:
        from mlflow.entities import Param

        with self._lock:
            pending, self._pending_params = self._pending_params, {}
        changed = sorted(k for k, v in pending.items() if self._logged_params.get(k, v) != v)
        if changed:
            log.warning("MLflow params are immutable; keeping the run's values for %d changed keys: %s",
                        len(changed), ", ".join(changed[:20]) + (" ..." if len(changed) > 20 else ""))
        new = {k: v for k, v in pending.items() if k not in self._logged_params}
        if not new:
            return True
        try:
            self._client.log_batch(self._run_id, params=[Param(k, v) for k, v in new.items()])
        except Exception as e:
            if not self._failed(f"log {len(new)} params", e):
                with self._lock:
                    self._pending_params = {**new, **self._pending_params}
                return False
            return True
        self._logged_params.update(new)
        return True

    def _send_metrics(self) -> bool:
        from mlflow.entities import Metric

        while True:
            with self._lock:
                n = min(len(self._pending_metrics), _METRICS_PER_REQUEST)
                batch = [self._pending_metrics.popleft() for _ in range(n)]
                if self._logged_through >= 0:  # replayed steps after a resume: the run has them already
                    batch = [p for p in batch if p[3] > self._logged_through or p[0].startswith("system/")]
                    if not batch and self._pending_metrics:
                        continue
            if not batch:
                return True
            try:
                self._client.log_batch(self._run_id, metrics=[Metric(*point) for point in batch])
            except Exception as e:
                permanent = self._failed(f"log {len(batch)} metric points", e)
                with self._lock:
                    if permanent:
                        self._num_dropped += len(batch)
                        continue
                    self._pending_metrics.extendleft(reversed(batch))
                    self._trim_metrics()
                return False

    def _upload(self, what: str, upload: Any) -> None:
        if self._ended:
            log.warning("MLflow tracker already ended; did not %s", what)
            return
        with self._io_lock:
            if time.monotonic() < self._retry_at or not self._open_run():
                log.warning("MLflow tracking server %s is unreachable; did not %s", self._spec.uri, what)
                return
            try:
                upload()
            except Exception as e:
                self._failed(what, e)

    def _start_monitor(self, *, resumed: bool) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self._run_id, sampling_interval=self._system_metrics_interval_s,
                                                 resume_logging=resumed, tracking_uri=self._spec.uri)
            self._monitor.start()
        except Exception as e:  # e.g. psutil missing: the run goes on without system metrics
            log.warning("MLflow system metrics are off: %s", _short(e))
            self._monitor = None

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()  # joins its thread and sends what it sampled
            self._monitor = None

    def _end_at_exit(self) -> None:
        try:
            self.end("KILLED")
        except Exception as e:
            log.warning("MLflow tracker: could not end the run at exit: %s", _short(e))


class NullTracker:
    """What ranks other than 0 get: `Tracker`'s methods, doing nothing."""

    run_id: str | None = None
    num_failures = 0
    num_dropped_metrics = 0

    def start(self, *, run_dir_uri: str, experiment: str, run_name: str, resume_run_id: str | None,
              tracking_uri: str | None, system_metrics: bool = True, local_dir: str | None = None) -> str | None:
        return resume_run_id

    def log_params(self, flat: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, name: str) -> None:
        pass

    def flush(self) -> bool:
        return True

    def end(self, status: str = "FINISHED") -> None:
        pass


def make_tracker(rank: int, **tracker_kwargs: Any) -> Tracker | NullTracker:
    """A `Tracker` (built with `tracker_kwargs`) on rank 0, a `NullTracker` elsewhere."""
    return Tracker(**tracker_kwargs) if rank == 0 else NullTracker()
