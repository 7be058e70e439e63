"""Issue 17 point 6 without a cluster: the driver-side filter in front of Ray's log printer, the environment that
turns off Ray's deduplication and colours, the stage tag of progress lines, /healthz probes at DEBUG."""

from __future__ import annotations

import io
import logging

import pytest

from trainer import ray_logs
from trainer.cli import _quiet_health_probes
from trainer.loop import train_tag
from trainer.progress import ProgressLine

# Lines as Ray printed them in a demo run (before this change), and ours, which must survive.
RAY_NOISE = [
    "[2026-12-02 21:29:55,910 E 30244 30279] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'0174873bffcf0ea37b7c9e6601000000' has constructor arguments in the object store and max_restarts > 0. If the "
    "arguments in the object store go out of scope or are lost, the actor restart will fail.",
    "2026/12/02 21:30:06 INFO mlflow.system_metrics.system_metrics_monitor: Started monitoring system metrics.",
    "2026/12/02 21:39:16 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
    "Requesting resources: {'CPU': 1} * 1",
    "Attempting to start training worker group of size 1 with the following resources: [{'CPU': 1}] * 1",
    "Started training worker group of size 1: ",
    "- (ip=127.0.0.1, pid=30386) world_rank=0, local_rank=0, node_rank=0",
    "Setting up process group for: env:// [rank=0, world_size=1]",
]
OURS = [
    "[train ckpt1] step 2/6 (33.3%) loss 2.9464 action 2.4860 9.2 samples/s mfu 3.67% data-wait 19.3% eta 0m03s",
    "[checkpoint] step 5 committed: /tmp/runs/demo/pretrain/checkpoint_000000005",
    "MLflow run c49bd08145b64a9aa2fdf5fe4f8eb527 (new) at sqlite:////tmp/mlflow.db",
    "ValueError: shard 3 is truncated",  # a real error of a training worker
    "2026/12/02 21:39:17 WARNING mlflow.utils.requirements_utils: Found torch version (2.5.1) ...",
]


def test_filter_drops_ray_internals_and_keeps_our_lines_and_errors():
    kept = ray_logs.filter_batch({"lines": RAY_NOISE + OURS, "pid": 1, "actor_name": "RayTrainWorker",
                                  "is_err": True})
    assert kept is not None and kept["lines"] == OURS and kept["pid"] == 1
    assert ray_logs.filter_batch({"lines": RAY_NOISE, "pid": 1, "is_err": False}) is None


def test_the_placement_group_cleaners_multiple_instances_traceback_is_dropped():
    batch = {"lines": ["Traceback (most recent call last):", "ConnectionError: Found multiple active Ray instances"],
             "actor_name": "PlacementGroupCleaner", "is_err": True, "pid": 7}
    assert ray_logs.filter_batch(batch) is None
    # The same lines from a training worker are a real failure and are printed.
    assert ray_logs.filter_batch({**batch, "actor_name": "RayTrainWorker"})["lines"] == batch["lines"]


@pytest.fixture
def ray_printer(monkeypatch):
    """Ray's driver-side dispatcher with a recorder in place of its printer."""
    from ray._private import worker

    dispatcher = worker.global_worker_stdstream_dispatcher
    monkeypatch.setattr(dispatcher, "handlers", [])
    printed: list[list[str]] = []
    dispatcher.add_handler("ray_print_logs", lambda data, **kw: printed.append(data["lines"]))
    return dispatcher, printed


def test_install_filter_wraps_rays_printer_once(ray_printer, monkeypatch):
    monkeypatch.delenv(ray_logs.DEBUG_ENV, raising=False)
    dispatcher, printed = ray_printer
    assert ray_logs.install_filter() and not ray_logs.install_filter()  # a second ray.init does not wrap twice
    dispatcher.emit({"lines": [RAY_NOISE[0], OURS[0]], "pid": 3, "is_err": False})
    dispatcher.emit({"lines": RAY_NOISE[1:], "pid": 3, "is_err": False})
    assert printed == [[OURS[0]]]


def test_verbose_prints_everything(ray_printer, monkeypatch):
    monkeypatch.setenv(ray_logs.DEBUG_ENV, "1")
    dispatcher, printed = ray_printer
    assert not ray_logs.install_filter()
    dispatcher.emit({"lines": RAY_NOISE, "pid": 3, "is_err": False})
    assert printed == [RAY_NOISE]


def test_env_turns_off_dedup_and_colour_when_not_a_terminal_and_respects_the_users_choice(monkeypatch):
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "RAY_DEDUP_LOGS", True)
    for var in ("RAY_DEDUP_LOGS", "RAY_COLOR_PREFIX"):
        monkeypatch.delenv(var, raising=False)
    ray_logs.configure_env(is_tty=False)
    import os

    assert os.environ["RAY_DEDUP_LOGS"] == "0" and os.environ["RAY_COLOR_PREFIX"] == "0"
    assert ray_constants.RAY_DEDUP_LOGS is False  # ray was imported first: its constant follows
    monkeypatch.delenv("RAY_COLOR_PREFIX")
    ray_logs.configure_env(is_tty=True)
    assert "RAY_COLOR_PREFIX" not in os.environ  # a terminal keeps Ray's colours
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")
    ray_logs.configure_env(is_tty=False)
    assert os.environ["RAY_DEDUP_LOGS"] == "1" and ray_constants.RAY_DEDUP_LOGS is True


def test_progress_lines_carry_the_stage_in_a_pipeline():
    assert train_tag({}) == "[train]" and train_tag({"stage": "ckpt1"}) == "[train ckpt1]"
    out = io.StringIO()
    line = ProgressLine(total_steps=4, start_step=0, enabled=True, stream=out, tag="[train ckpt4]")
    line.update(2, {"loss": 1.0})
    line.close()
    first, last = out.getvalue().splitlines()
    assert first.startswith("[train ckpt4] step 2/4 (50.0%) loss 1.0000") and last.startswith("[train ckpt4] done")


def test_rays_own_driver_lines_lose_their_colours_when_not_a_terminal(monkeypatch):
    import ray  # noqa: F401 - sets up the "ray" logger and its handler

    monkeypatch.setenv("RAY_COLOR_PREFIX", "0")
    handler = logging.getLogger("ray").handlers[0]
    monkeypatch.setattr(handler, "filters", [])
    ray_logs.plain_ray_driver_log()
    ray_logs.plain_ray_driver_log()
    assert len(handler.filters) == 1
    record = logging.LogRecord("ray._private.worker", logging.INFO, __file__, 1,
                               "Started a local Ray instance. View the dashboard at %s%s%s %s%s",
                               ("\x1b[1m", "\x1b[32m", "http://127.0.0.1:8265", "\x1b[39m", "\x1b[22m"), None)
    assert handler.filter(record)
    assert handler.format(record).endswith("View the dashboard at http://127.0.0.1:8265 ")


def _record(msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord("websockets.server", logging.INFO, __file__, 1, msg, args, None)


def test_health_probes_are_not_logged_at_info():
    assert not _quiet_health_probes(_record("connection rejected (%d %s)", 200, "OK"))
    assert not _quiet_health_probes(_record("connection rejected (%d %s)", 503, "Service Unavailable"))
    assert _quiet_health_probes(_record("connection open"))
    assert _quiet_health_probes(_record("server listening on %s", "127.0.0.1:8000"))


# --- issue 17 point 8: what a local fit no longer starts ------------------------------------------------------

def test_fits_without_ray_datasets_start_no_dataset_manager():
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    from trainer.launch import _without_unused_dataset_actor

    cls = _without_unused_dataset_actor(TorchTrainer)
    assert cls.__name__ == "TorchTrainer"
    plain = cls(lambda: None, scaling_config=None)
    assert not any(isinstance(c, DatasetsCallback) for c in plain._create_default_callbacks())
    # A dataset factory (Ray calls it on the controller; never here): no cluster, no ray.data import.
    with_data = cls(lambda: None, datasets={"train": lambda: None})
    assert any(isinstance(c, DatasetsCallback) for c in with_data._create_default_callbacks())
