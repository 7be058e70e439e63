"""What the driver prints of Ray's worker output: every line once, without colour codes in a file, and without
Ray's internal noise on a normal run (issue 17 point 6).

Ray forwards each worker's stdout/stderr to the driver, where it (a) collapses lines that look alike across
processes into "[repeated 2x across cluster]" - which hid one of two concurrent fine-tunes' progress lines -, (b)
wraps the "(Actor pid=N)" prefix in ANSI colours even when the output goes to a file, and (c) passes on lines
of its own internals that say nothing to a user. (a) and (b) are switched off by environment variables read when
ray is imported / when a line is printed; (c) by a filter in front of Ray's printer. With --verbose (B1K_DEBUG)
nothing is filtered.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Any, Callable

DEBUG_ENV = "B1K_DEBUG"

# Lines of Ray's and MLflow's internals a normal run drops. Each is printed by every run and needs no action:
NOISE = tuple(re.compile(p) for p in (
    # Ray Train's controller restarts its preemption watcher actor from object-store arguments; Ray warns at E.
    r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher'.*constructor arguments in the object store",
    # MLflow's own INFO lines (its format: "2026/12/02 21:39:16 INFO mlflow..."): the system-metrics monitor
    # starting and stopping, "Creating initial MLflow database tables" for every new local store. Its warnings stay.
    r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow\.",
    # Ray Train's worker-group start-up chatter (the progress lines say when training starts).
    r"^Requesting resources: ",
    r"^Attempting to start training worker group of size",
    r"^Started training worker group of size",
    r"^- \(ip=[^)]*\) world_rank=\d+, local_rank=\d+, node_rank=\d+",
    r"^Setting up process group for: ",
))

# Ray Train's placement-group cleaner looks the controller up with the state API, which, on a machine running more
# than one Ray cluster, fails with "Found multiple active Ray instances" and a traceback; the cleaner only matters
# if the controller dies, and the traceback is Ray's own business.
_CLEANER = "PlacementGroupCleaner"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _strip_ansi(record) -> bool:
    """Ray's own driver messages colour their arguments ("View the dashboard at <bright green>URL"): plain text."""
    message = record.getMessage()
    if "\x1b[" in message:
        record.msg, record.args = _ANSI.sub("", message), None
    return True


def plain_ray_driver_log() -> None:
    """No colour codes in the driver's own ray.* log lines when the output is not a terminal (RAY_COLOR_PREFIX=0,
    set by configure_env). Ray's logger has a handler of its own and does not propagate: filter there."""
    if os.environ.get("RAY_COLOR_PREFIX") != "0":
        return
    import logging

    for handler in logging.getLogger("ray").handlers:
        if _strip_ansi not in handler.filters:
            handler.addFilter(_strip_ansi)


def verbose() -> bool:
    return bool(os.environ.get(DEBUG_ENV))


def configure_env(*, is_tty: bool | None = None) -> None:
    """Before ray prints anything: no deduplication, and no colour unless the output is a terminal. A user's own
    RAY_DEDUP_LOGS / RAY_COLOR_PREFIX win."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if is_tty is None:
        is_tty = sys.stdout.isatty() and sys.stderr.isatty()
    if not is_tty:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if "ray._private.ray_constants" in sys.modules:  # already imported: its constant was read at import
        from ray._private import ray_constants

        ray_constants.RAY_DEDUP_LOGS = os.environ["RAY_DEDUP_LOGS"] not in ("0", "false", "False")


def keep_line(line: str) -> bool:
    return not any(p.search(line) for p in NOISE)


def filter_batch(data: dict[str, Any]) -> dict[str, Any] | None:
    """The log batch `data` (Ray's dict: lines, pid, actor_name, is_err, ...) without noise; None if nothing is
    left."""
    if data.get("actor_name") == _CLEANER and data.get("is_err"):
        return None
    lines = [line for line in data.get("lines", []) if keep_line(line)]
    if not lines:
        return None
    return {**data, "lines": lines}


def _filtered(printer: Callable[..., None], data: dict[str, Any], **kwargs: Any) -> None:
    kept = filter_batch(data)
    if kept is not None:
        printer(kept, **kwargs)


def install_filter() -> bool:
    """Put the noise filter in front of Ray's driver-side printer (after ray.init). False if Ray does not print
    worker logs here (log_to_driver off) or --verbose asked for everything."""
    if verbose():
        return False
    from ray._private import worker

    dispatcher = worker.global_worker_stdstream_dispatcher
    handler = dict(dispatcher.handlers).get("ray_print_logs")  # a list of (name, handler) pairs
    if handler is None or getattr(handler, "b1k_filtered", False):
        return False
    wrapped = functools.partial(_filtered, handler)
    wrapped.b1k_filtered = True  # type: ignore[attr-defined]
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", wrapped)
    return True
