"""Run a training job to completion through failures: restart, circuit breaker, elastic worker counts.

Each attempt is one Ray Train `fit()` with Ray's own retries off (max_failures=0). When it fails, the driver
records the failure in <run>/failures.jsonl, sweeps uncommitted checkpoint directories, and starts the next
attempt, which resumes from the last committed checkpoint on however many workers the cluster can place.
It stops (raising RunFailedError that names the last errors) when

- the error is deterministic (bad config or data: ValueError, KeyError, FileNotFoundError, ...; no usable
  checkpoint; storage that is full, over quota, read-only or forbidden), which a restart would only repeat;
- more than `max_failures_in_window` failures of this invocation happened within `failure_window_s` (the circuit
  breaker; a re-run after fixing a cause starts with the full budget, earlier failures stay in the log as
  history);
- or the run used up `max_failures` restarts.

The supervisor's own bookkeeping never ends a run: if failures.jsonl cannot be written (the storage is full)
the failure is kept in memory and said once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

from data_loaders import storage

log = logging.getLogger(__name__)
# Errors a restart reproduces: the run is misconfigured or its data is bad, not unlucky.
DETERMINISTIC = (ValueError, TypeError, KeyError, IndexError, AttributeError, ImportError, FileNotFoundError,
                 PermissionError, NotImplementedError, ArithmeticError)


class RunFailedError(RuntimeError):
    """The run stopped for good; the message names the cause and the last errors."""


def parse_workers(text: str | int) -> tuple[int, int]:
    """"4" -> (4, 4); "2:8" -> (2, 8) (elastic: run on as many as fit, between the two)."""
    lo, _, hi = str(text).partition(":")
    try:
        lo_n, hi_n = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"--workers {text!r} must be N or MIN:MAX, e.g. 4 or 2:8") from None
    if not 1 <= lo_n <= hi_n:
        raise ValueError(f"--workers {text!r}: need 1 <= MIN <= MAX")
    return lo_n, hi_n


def check_worker_range(cfg: Any, lo: int, hi: int) -> None:
    """Every worker count the run may get must split the global batch exactly."""
    bad = []
    for n in range(lo, hi + 1):
        try:
            cfg.grad_accum_steps(n)
        except ValueError:
            bad.append(n)
    if bad:
        per = cfg.global_batch_size // cfg.micro_batch_size
        ok = [n for n in range(1, per + 1) if per % n == 0]
        raise ValueError(f"global_batch_size {cfg.global_batch_size} with micro_batch_size {cfg.micro_batch_size} "
                         f"cannot be split over {bad} workers; --workers must stay within counts dividing {per} "
                         f"({ok}), or change --set micro_batch_size=...")


def root_causes(error: BaseException) -> list[BaseException]:
    """The per-worker exceptions inside a Ray Train failure (or the error itself), unwrapped."""
    failures = getattr(error, "worker_failures", None)
    found = list(failures.values()) if failures else [getattr(error, "controller_failure", None) or error]
    return [getattr(e, "_base_exc", e) for e in found]


def describe(error: BaseException) -> str:
    parts = [f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
             for e in root_causes(error)]
    return "; ".join(dict.fromkeys(parts))[:500]


@dataclasses.dataclass
class FailureLog:
    """Failures of a run, persisted as <run>/failures.jsonl so the breaker and operators see every attempt."""

    run_dir_url: str
    entries: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.fs, self.path = storage.resolve(storage.join(self.run_dir_url, "failures.jsonl"))
        try:
            text = self.fs.cat_file(self.path).decode() if self.fs.exists(self.path) else ""
        except OSError as e:
            print(f"[supervisor] cannot read {self.path} ({e}); earlier failures are not shown", flush=True)
            text = ""
        for line in text.splitlines():
            try:
                entry = json.loads(line)
                self.entries.append({"time": float(entry["time"]), "attempt": int(entry["attempt"]),
                                     "error": str(entry["error"])})
            except (ValueError, KeyError, TypeError):
                continue  # a damaged history line says nothing about this invocation

    def add(self, attempt: int, error: BaseException) -> dict[str, Any]:
        entry = {"time": time.time(), "attempt": attempt, "error": describe(error)}
        self.entries.append(entry)
        data = "".join(json.dumps(e) + "\n" for e in self.entries).encode()
        try:
            storage.write_bytes_atomic(self.fs, self.path, data)
        except Exception as e:  # noqa: BLE001 - the log is history; losing a line must not end the run
            reason = (storage.storage_write_error(e, self.run_dir_url, what="failures.jsonl")
                      or f"{type(e).__name__}: {e}")
            print(f"[supervisor] could not record the failure ({reason}); it is kept in memory", flush=True)
        return entry

    def in_window(self, window_s: float, now: float | None = None, *, since: float = 0.0) -> list[dict[str, Any]]:
        """Failures within `window_s` of `now`, and not before `since` (this invocation's start)."""
        now = time.time() if now is None else now
        return [e for e in self.entries if now - e["time"] <= window_s and e["time"] >= since]


def supervise(run_attempt: Callable[[int], Any], *, run_dir_url: str, resilience: Any,
              before_attempt: Callable[[], None] | None = None) -> Any:
    """Call `run_attempt(attempt)` until it returns; on a Ray Train failure decide whether to go again. Ctrl-C or
    SIGTERM ends the run after saying which checkpoint is committed and how to resume."""
    failures = FailureLog(run_dir_url)
    started = time.time()
    with _interrupts_say_where_to_resume(run_dir_url):
        return _supervise(run_attempt, failures, started, run_dir_url=run_dir_url, resilience=resilience,
                          before_attempt=before_attempt)


def _supervise(run_attempt: Callable[[int], Any], failures: FailureLog, started: float, *, run_dir_url: str,
               resilience: Any, before_attempt: Callable[[], None] | None) -> Any:
    from ray.train import TrainingFailedError

    attempt = 0
    session_failures = 0  # max_failures counts this invocation; the breaker's window also sees earlier ones
    while True:
        attempt += 1
        if before_attempt is not None:
            before_attempt()
        try:
            return _in_a_thread(run_attempt, attempt)
        except TrainingFailedError as e:
            entry = failures.add(attempt, e)
            session_failures += 1
            print(f"[supervisor] attempt {attempt} failed: {entry['error']}", flush=True)
            storage_problem = _storage_problem(e, run_dir_url)
            if storage_problem:
                raise RunFailedError(f"{storage_problem}; {_resume_hint(run_dir_url)}") from e
            verdict = _verdict(e, failures, resilience, session_failures, since=started)
            if verdict:
                last = "\n  ".join(f"attempt {x['attempt']}: {x['error']}" for x in failures.entries[-3:])
                raise RunFailedError(f"{verdict}. Last errors:\n  {last}\nFix the cause and re-run the same command: "
                                     f"it resumes from the last committed checkpoint under {run_dir_url}.") from e
            print(f"[supervisor] restarting from the last committed checkpoint (attempt {attempt + 1})", flush=True)


def _in_a_thread(fn: Callable[[int], Any], attempt: int) -> Any:
    """Run one attempt off the main thread. Ray Train's fit() installs its own SIGINT handler when it runs in the
    main thread, turning Ctrl-C into an abort that ends in SystemExit with no word of what was kept; here the
    main thread keeps Ctrl-C (and our SIGTERM) as a KeyboardInterrupt that says where to resume."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(attempt)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread as is
            box["error"] = e

    worker = threading.Thread(target=target, name=f"b1k-attempt-{attempt}", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["value"]


def resume_command() -> str:
    """The command line that started this process, as the user would type it again."""
    argv = list(sys.argv)
    prog = os.path.basename(argv[0]) if argv else ""
    if prog in ("b1k-train", "__main__.py") or argv[:1] == ["-m"]:
        argv[0] = "b1k-train"
        return shlex.join(argv)
    return "the same command"


@contextlib.contextmanager
def _interrupts_say_where_to_resume(run_dir_url: str) -> Iterator[None]:
    """SIGTERM (a pod eviction, `kill`) ends the run like Ctrl-C; either way the last line says what is kept."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        def terminate(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except KeyboardInterrupt:
        print(f"\n[b1k-train] interrupted: {_resume_hint(run_dir_url, command=resume_command())}", flush=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _storage_problem(error: BaseException, run_dir_url: str) -> str | None:
    """The one-line message when the attempt failed because the run's storage cannot be written, else None."""
    for cause in root_causes(error):
        if isinstance(cause, storage.StorageWriteError):
            return str(cause)
        found = storage.storage_write_error(cause, run_dir_url, what="the run's checkpoints")
        if found:
            return found
    return None


def _resume_hint(run_dir_url: str, *, command: str = "the same command") -> str:
    from checkpoints.retention import committed_checkpoints

    try:
        names = committed_checkpoints(run_dir_url)
    except Exception:  # noqa: BLE001 - the hint is best effort; the storage may be what failed
        names = []
    if not names:
        return f"no checkpoint was committed yet; re-running {command} starts from the beginning"
    step = int(names[-1].rsplit("_", 1)[-1])
    return (f"the last committed checkpoint, {names[-1]}, is intact (step {step}); re-running {command} resumes "
            f"from it")


def _verdict(error: BaseException, failures: FailureLog, res: Any, session_failures: int, *,
             since: float = 0.0) -> str | None:
    causes = root_causes(error)
    if any(isinstance(c, DETERMINISTIC) for c in causes):
        return "the run stopped on an error a restart would repeat (bad configuration or data)"
    recent = failures.in_window(res.failure_window_s, since=since)
    if len(recent) > res.max_failures_in_window:
        return (f"circuit breaker: {len(recent)} failures within {res.failure_window_s:.0f} s (limit "
                f"resilience.max_failures_in_window={res.max_failures_in_window})")
    if res.max_failures != -1 and session_failures > res.max_failures:
        return f"the run failed {session_failures} times (limit resilience.max_failures={res.max_failures})"
    return None
