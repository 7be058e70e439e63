"""trainer.tracking against a real MLflow server (and the default local SQLite store): params, metrics, artifacts,
system metrics, resume into the same run, and that server failures only warn."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import logging
import math
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from mlflow import MlflowClient

from trainer.tracking import NullTracker, Tracker, clean_key, flatten_config, make_tracker, resolve_tracking_uri

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    # Tracker writes MLflow's HTTP settings into os.environ; registering them here restores them after each test.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                              key=lambda m: (m.step, m.timestamp))]


class _Mode(enum.Enum):
    DDP = "ddp"
    FSDP = "fsdp"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Optim:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Config:
    name: str = "demo"
    optim: _Optim = dataclasses.field(default_factory=_Optim)
    groups: tuple[dict, ...] = ({"name": "vision", "lr": 1e-5},)
    mode: _Mode = _Mode.FSDP
    notes: str = "x" * 7000
    extra: dict = dataclasses.field(default_factory=dict)
    resume_from: str | None = None


def test_flatten_config_and_clean_key():
    flat = flatten_config(_Config())
    assert flat == {"name": "demo", "optim.lr": "0.0003", "optim.betas": "[0.9, 0.95]", "groups.0.name": "vision",
                    "groups.0.lr": "1e-05", "mode": "FSDP", "notes": "x" * 5997 + "...", "extra": "{}",
                    "resume_from": "None"}
    assert flatten_config({"a": {"b": [1, 2]}, "c": Path("/p")}) == {"a.b": "[1, 2]", "c": "/p"}
    with pytest.raises(TypeError):
        flatten_config(_Config)
    assert clean_key("lr/vision tower") == "lr/vision tower"
    assert clean_key("grad norm(total)") == "grad norm_total_"
    assert clean_key("/abs//x") == "__abs__x"
    assert len(clean_key("k" * 300)) == 250


def test_params_metrics_artifacts_and_system_metrics(mlflow_server, tmp_path, caplog):
    tracker = Tracker(system_metrics_interval_s=0.3, flush_interval_s=0.2)
    run_id = tracker.start(run_dir_uri="s3://bucket/runs/basic", experiment="t-basic", run_name="basic",
                           resume_run_id=None, tracking_uri=mlflow_server)
    assert run_id and tracker.run_id == run_id
    tracker.log_params(flatten_config(_Config()))
    tracker.log_metrics({"loss": 2.0, "grad norm(total)": np.float32(1.5), "acc": np.array(0.25),
                         "nan_metric": float("nan"), "bad": "abc"}, step=1)
    tracker.log_metrics({"loss": 1.0}, step=2)
    (tmp_path / "notes.txt").write_text("hello")
    tracker.log_artifact(tmp_path / "notes.txt", "extra")
    tracker.log_dict({"path": Path("/x"), "n": 1}, "config.json")
    time.sleep(1.0)  # the background sender and the system-metrics sampler both get to run
    tracker.end()
    assert tracker.num_failures == 0

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "basic"
    assert run.data.params == flatten_config(_Config())
    assert run.data.tags["b1k.run_dir"] == "s3://bucket/runs/basic"
    assert _history(client, run_id, "loss") == [(1, 2.0), (2, 1.0)]
    assert _history(client, run_id, "grad norm_total_") == [(1, 1.5)]
    assert _history(client, run_id, "acc") == [(1, 0.25)]
    assert math.isnan(_history(client, run_id, "nan_metric")[0][1])
    assert "bad" not in run.data.metrics and "'bad'" in caplog.text
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run_id)} == {"extra", "config.json"}
    assert [a.path for a in client.list_artifacts(run_id, "extra")] == ["extra/notes.txt"]
    local = client.download_artifacts(run_id, "config.json", str(tmp_path / "download"))
    assert json.loads(Path(local).read_text()) == {"path": "/x", "n": 1}


def test_resume_appends_to_the_same_run(mlflow_server, caplog):
    client = MlflowClient(mlflow_server)
    common = dict(run_dir_uri="s3://bucket/runs/resume", experiment="t-resume", run_name="resume",
                  tracking_uri=mlflow_server, system_metrics=False)
    first = Tracker(flush_interval_s=0.2)
    run_id = first.start(resume_run_id=None, **common)
    first.log_params({"lr": 0.1, "num_steps": 10})
    first.log_metrics({"loss": 3.0}, step=1)
    first.log_metrics({"loss": 2.0}, step=2)
    first.end("FAILED")  # the crash
    assert client.get_run(run_id).info.status == "FAILED"

    second = Tracker(flush_interval_s=0.2)
    assert second.start(resume_run_id=run_id, **common) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    second.log_params({"lr": 0.1, "num_steps": 20, "new_key": "x"})
    second.log_metrics({"loss": 2.5}, step=2)  # replayed: the checkpoint was at step 1
    second.log_metrics({"loss": 1.0}, step=3)
    second.end()
    assert second.num_failures == 0

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "num_steps": "10", "new_key": "x"}
    assert run.data.tags["b1k.num_resumes"] == "1"
    # The replayed step 2 is dropped (the run has it already); new steps append.
    assert _history(client, run_id, "loss") == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert "num_steps" in caplog.text  # the changed param was reported, not raised

    # A run id the server does not know (e.g. another tracking server) gets a fresh run.
    third = Tracker()
    other = third.start(resume_run_id="0" * 32, **common)
    third.end()
    assert other != "0" * 32 and client.get_run(other).info.status == "FINISHED"


def test_run_killed_before_its_first_checkpoint_continues_its_mlflow_run(mlflow_server):
    """No checkpoint holds the run id yet, so the restart finds the run by its run directory instead of leaving an
    orphan run next to a second one (the pipeline's killed fine-tunes)."""
    client = MlflowClient(mlflow_server)
    common = dict(run_dir_uri="s3://bucket/runs/early-kill", experiment="t-early", run_name="early",
                  tracking_uri=mlflow_server, system_metrics=False)
    first = Tracker(flush_interval_s=0.2)
    run_id = first.start(resume_run_id=None, **common)
    first.log_metrics({"loss": 3.0}, step=1)
    first.end("KILLED")
    again = Tracker(flush_interval_s=0.2)
    assert again.start(resume_run_id=None, **common) == run_id
    again.log_metrics({"loss": 3.0}, step=1)  # the deterministic replay from step 0
    again.log_metrics({"loss": 2.0}, step=2)
    again.end()
    assert _history(client, run_id, "loss") == [(1, 3.0), (2, 2.0)]
    assert len(client.search_runs([client.get_experiment_by_name("t-early").experiment_id])) == 1
    other = Tracker()
    assert other.start(resume_run_id=None, **{**common, "run_dir_uri": "s3://bucket/runs/another"}) != run_id
    other.end()


def test_default_local_sqlite_store(tmp_path):
    run_dir = tmp_path / "run"
    tracker = Tracker(flush_interval_s=0.2)
    run_id = tracker.start(run_dir_uri=str(run_dir), experiment="local", run_name="local", resume_run_id=None,
                           tracking_uri=None, system_metrics=False)
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    (tmp_path / "f.txt").write_text("x")
    tracker.log_artifact(tmp_path / "f.txt")
    tracker.end()

    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"a": "1"}
    assert _history(client, run_id, "loss") == [(1, 1.0)]
    assert list((run_dir / "mlartifacts").rglob("f.txt"))

    # A remote run dir needs local_dir (or a tracking URI) for the SQLite default.
    with pytest.raises(ValueError, match="local_dir"):
        Tracker().start(run_dir_uri="s3://bucket/r", experiment="e", run_name="n", resume_run_id=None,
                        tracking_uri=None)
    assert resolve_tracking_uri(None, run_dir_uri="s3://bucket/r", local_dir=str(tmp_path / "tracking")) == (
        f"sqlite:///{tmp_path}/tracking/mlflow.db", (tmp_path / "tracking" / "mlartifacts").as_uri())
    assert resolve_tracking_uri("http://h:1", run_dir_uri="s3://bucket/r", local_dir=None) == ("http://h:1", None)


def test_tracking_uri_from_environment(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    tracker = Tracker()
    run_id = tracker.start(run_dir_uri="s3://bucket/r", experiment="t-env", run_name="env", resume_run_id=None,
                           tracking_uri=None, system_metrics=False)
    tracker.end()
    assert MlflowClient(mlflow_server).get_run(run_id).info.status == "FINISHED"


def test_null_tracker_has_the_same_api_and_does_nothing(tmp_path):
    assert isinstance(make_tracker(0, flush_interval_s=1.0), Tracker)
    null = make_tracker(3)
    assert isinstance(null, NullTracker)

    def public(cls):
        return {n for n in dir(cls) if not n.startswith("_")}

    assert public(NullTracker) == public(Tracker)
    for name in public(Tracker):
        if inspect.isfunction(getattr(Tracker, name)):
            assert inspect.signature(getattr(NullTracker, name)) == inspect.signature(getattr(Tracker, name)), name
    assert null.start(run_dir_uri=str(tmp_path), experiment="e", run_name="n", resume_run_id="abc",
                      tracking_uri=None) == "abc"
    null.log_params({"a": 1})
    null.log_metrics({"loss": 1.0}, step=1)
    null.log_artifact(tmp_path / "missing")
    null.log_dict({"a": 1}, "a.json")
    assert null.flush() is True
    null.end("FAILED")
    assert null.run_id is None and null.num_failures == 0
    assert list(tmp_path.iterdir()) == []


def test_dead_server_only_warns(tmp_path, caplog):
    dead = f"http://127.0.0.1:{_closed_port()}"
    common = dict(run_dir_uri="s3://bucket/r", experiment="e", run_name="n", tracking_uri=dead)
    tracker = Tracker(flush_interval_s=0.1, retry_after_s=0.0)
    with caplog.at_level(logging.WARNING, logger="trainer.tracking"):
        assert tracker.start(resume_run_id=None, **common) is None
        tracker.log_params({"a": 1})
        for step in range(5):
            tracker.log_metrics({"loss": 1.0}, step=step)
        (tmp_path / "f.txt").write_text("x")
        tracker.log_artifact(tmp_path / "f.txt")
        tracker.log_dict({"a": 1}, "a.json")
        time.sleep(0.3)  # the background sender fails a few times too
        assert tracker.flush() is False
        tracker.end("FAILED")
    assert tracker.num_failures >= 3
    assert "could not open MLflow run" in caplog.text
    assert "5 metric points and 1 params never sent" in caplog.text

    resumed = Tracker()
    assert resumed.start(resume_run_id="abc123", system_metrics=False, **common) == "abc123"
    resumed.end()


class _Relay:
    """TCP relay 127.0.0.1:<port> -> 127.0.0.1:<target> that can be switched off and on again (a server outage)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = _closed_port()
        self._sockets: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(16)
        self._listener.settimeout(0.1)
        self._running = True
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self._thread.join()
        self._listener.close()
        for s in self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._sockets = []

    def _accept_loop(self) -> None:
        while self._running:
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def test_outage_mid_run_buffers_metrics_and_recovers(mlflow_server, caplog):
    relay = _Relay(urlparse(mlflow_server).port)
    relay.start()
    tracker = Tracker(system_metrics_interval_s=0.3, flush_interval_s=60.0, retry_after_s=0.0)
    run_id = tracker.start(run_dir_uri="s3://bucket/r", experiment="t-outage", run_name="outage",
                           resume_run_id=None, tracking_uri=relay.url)
    tracker.log_metrics({"loss": 1.0}, step=1)
    assert tracker.flush()

    relay.stop()
    tracker.log_metrics({"loss": 0.5}, step=2)
    assert tracker.flush() is False  # warned and kept the point
    assert tracker.num_failures == 1

    relay.start()
    tracker.log_metrics({"loss": 0.25}, step=3)
    assert tracker.flush()
    assert "reachable again" in caplog.text
    time.sleep(0.5)  # the restarted system-metrics monitor samples once
    tracker.end()
    relay.stop()

    client = MlflowClient(mlflow_server)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert _history(client, run_id, "loss") == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert tracker.num_dropped_metrics == 0
