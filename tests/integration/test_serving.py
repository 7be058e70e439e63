"""The policy server over a real websocket: openpi-client and an evaluator-like client, task routing across two
checkpoints, protocol errors, a full-resolution (720/480) observation, 8 concurrent clients, the memory budget,
preloading and readiness."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed

from serving.policy import ServingPolicy
from serving.router import ModelRouter
from serving.server import PolicyServer
from serving.wire import pack
from tests.evaluator_client import EvaluatorClient, wait_healthy
from tests.serving_support import first_action, make_artifacts, observation

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def server(artifacts):
    srv = PolicyServer(ModelRouter(artifacts["mapping"]), port=0)
    port = srv.start_background()
    wait_healthy("127.0.0.1", port)
    yield srv
    srv.stop()


def test_openpi_client_gets_actions(server):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    client = WebsocketClientPolicy("127.0.0.1", server.port)
    meta = client.get_server_metadata()
    assert meta["protocol"] == "behavior-2025" and [m["name"] for m in meta["models"]] == ["a", "b"]
    for i in range(3):
        out = client.infer(observation(0, seed=i))
        assert out["action"].dtype == np.float32 and out["action"].shape == (23,)
        assert np.all(np.isfinite(out["action"]))
        assert set(out["server_timing"]) == {"infer_ms", "load_ms", "prev_total_ms"}
    # Step 0 ran the model; steps 1 and 2 came from the planned chunk.
    assert out["server_timing"]["infer_ms"] == 0.0


def _episode(client: EvaluatorClient, task: int, steps: int, seed: int = 0) -> np.ndarray:
    return np.stack([client.act(observation(task, seed=seed + i)) for i in range(steps)])


def test_evaluator_flow_resets_unanswered_and_tasks_routed(server, artifacts):
    client = EvaluatorClient("127.0.0.1", server.port)
    try:
        assert client.metadata["server"] == "b1k-train"
        for _ in range(3):  # Evaluator.__init__, the instance and the episode each reset before the first obs
            client.reset()
        radio = _episode(client, 0, 25)  # 25 steps: the 20-step chunk ran out once, so the model ran twice
        assert radio.shape == (25, 23) and np.all(np.isfinite(radio))
        client.reset()
        assert client.pending() is None, "a reset was answered"
        popcorn = _episode(client, 40, 3)  # checkpoint b
        client.reset()
        again = _episode(client, 0, 25)  # back on checkpoint a: after a reset the episode replays exactly
        np.testing.assert_allclose(again, radio, atol=1e-5)
        assert client.pending() is None
    finally:
        client.close()
    assert set(server.router.resident()) == {"a", "b"}
    # Checkpoint b answers task 40 with its own weights: in-process b on the same first observation agrees.
    np.testing.assert_allclose(popcorn[0], first_action(ServingPolicy.load(artifacts["b"]), observation(40)),
                               atol=1e-5)
    assert not np.allclose(popcorn[0], first_action(ServingPolicy.load(artifacts["a"]), observation(40)))


@pytest.mark.parametrize("make_bad, expect", [
    (lambda: b"\xc1\xff not msgpack", "not valid msgpack"),
    (lambda: pack({k: v for k, v in observation(0).items() if k != "robot_r1::proprio"}), "robot_r1::proprio"),
    (lambda: pack({**observation(0), "robot_r1::proprio": np.zeros(256, np.int32)}), "float32"),
    (lambda: pack({**observation(0), "robot_r1::proprio": np.zeros(200, np.float32)}), "shape (256,)"),
    (lambda: pack({**observation(0), "task_id": np.array([7], np.int64)}), "unknown task id 7"),
    (lambda: "hello", "text frames"),
])
def test_bad_input_gets_a_text_frame_and_1011_and_others_keep_working(server, make_bad, expect):
    errors_before = server.errors
    bad = EvaluatorClient("127.0.0.1", server.port)
    good = EvaluatorClient("127.0.0.1", server.port)
    try:
        bad.ws.send(make_bad())
        reply = bad.ws.recv(timeout=30)
        assert isinstance(reply, str) and expect in reply, reply
        with pytest.raises(ConnectionClosed) as closed:
            bad.ws.recv(timeout=30)
        assert closed.value.rcvd.code == 1011
        assert server.errors == errors_before + 1
        assert good.act(observation(1)).shape == (23,)  # the other connection is unaffected
    finally:
        good.close()


def test_full_resolution_observation(server):
    obs = observation(1, size=None)  # eval.py asks for proprio and rgb only: no depth or segmentation is sent
    assert len(pack(obs)) == 3_918_407  # 3.74 MiB: what serving/security.py sizes its limits from
    client = EvaluatorClient("127.0.0.1", server.port)
    try:
        action = client.act(obs)
        assert action.shape == (23,) and np.all(np.isfinite(action))
    finally:
        client.close()


def test_eight_concurrent_clients_are_batched_and_independent(server):
    server.batcher.batch_sizes.clear()
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def run(i: int) -> None:
        try:
            client = EvaluatorClient("127.0.0.1", server.port)
            client.reset()
            barrier.wait(timeout=60)
            # Clients 0-3 and 4-7 replay the same two episodes (tasks 1 and 40), at the same time.
            results[i] = _episode(client, 1 if i < 4 else 40, 22, seed=100 if i < 4 else 200)
            client.close()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert max(server.batcher.batch_sizes) > 1, server.batcher.batch_sizes  # requests were batched
    for i in (1, 2, 3):  # batching does not change a client's actions
        np.testing.assert_allclose(results[i], results[0], atol=1e-4)
        np.testing.assert_allclose(results[4 + i], results[4], atol=1e-4)
    assert not np.allclose(results[0], results[4])


def test_readiness_memory_budget_and_lru(artifacts):
    gate = threading.Event()

    def slow_loader(url, **kwargs):
        gate.wait(60)  # the first load is held back: /healthz must say 503 meanwhile
        return ServingPolicy.load(url, **kwargs)

    one_model = ServingPolicy.load(artifacts["a"]).nbytes
    router = ModelRouter(artifacts["mapping"], memory_budget_bytes=int(one_model * 1.5), loader=slow_loader,
                         preload="none")
    srv = PolicyServer(router, port=0)
    port = srv.start_background()
    try:
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert not_ready.value.code == 503
        gate.set()
        statuses = wait_healthy("127.0.0.1", port)
        assert statuses[-1] == 200
        client = EvaluatorClient("127.0.0.1", port)
        client.act(observation(0))
        client.act(observation(40))  # loads b; a and b do not both fit: a is dropped
        assert router.resident() == ["b"] and router.loads == 2
        client.act(observation(1))  # a again
        assert router.resident() == ["a"] and router.loads == 3
        client.close()
    finally:
        srv.stop()


def test_startup_error_is_reported(tmp_path):
    (tmp_path / "map.json").write_text('{"checkpoints": {"x": {"path": "missing", "tasks": [0]}}}')
    srv = PolicyServer(ModelRouter(str(tmp_path / "map.json")), port=0, exit_on_startup_error=False)
    port = srv.start_background()
    try:
        deadline = time.monotonic() + 30
        while srv.startup_error is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "model 'x'" in str(srv.startup_error) and "not a complete b1k-train export" in str(srv.startup_error)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert e.value.code == 503 and b"not a complete" in e.value.read()
    finally:
        srv.stop()


def _register(client, name: str, export_dir: str) -> str:
    from trainer.registry import register

    exp = client.get_experiment_by_name("serving-tests")
    exp_id = exp.experiment_id if exp else client.create_experiment("serving-tests")
    run_id = client.create_run(exp_id).info.run_id
    client.log_artifacts(run_id, export_dir, "export")
    client.set_terminated(run_id)
    mv, _ = register(client, name=name, run_id=run_id, export_url=export_dir, has_run_artifact=True, tags={})
    client.set_registered_model_alias(name, "champion", mv.version)
    return str(mv.version)


@pytest.mark.slow
def test_cli_serves_a_registry_alias_and_follows_it_on_sighup(artifacts, mlflow_server, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from mlflow import MlflowClient

    from tests.integration.conftest import free_port

    client = MlflowClient(mlflow_server)
    assert _register(client, "serve-test", artifacts["a"]) == "1"
    port = free_port()
    admin = {"Authorization": "Api-Key " + "admin-" + "ab" * 16}
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "B1K_MODEL_CACHE": str(tmp_path / "cache"),
           "B1K_ADMIN_KEYS": admin["Authorization"].split()[1]}
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "serve", "--model", "models:/serve-test@champion",
                             "--port", str(port), "--set", "seed=3"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        ev = EvaluatorClient("127.0.0.1", port)
        before = ev.act(observation(0))
        assert ev.metadata["models"][0]["version"] == "1"
        assert _register(client, "serve-test", artifacts["b"]) == "2"  # @champion now names version 2
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = json.loads(urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/admin/status", headers=admin), timeout=5).read())
            if status["models"][0]["version"] == "2":
                break
            time.sleep(0.2)
        assert status["models"][0]["version"] == "2" and status["connections"] == 1
        ev.reset()
        after = ev.act(observation(0))  # the same connection, now served by version 2
        # The admin endpoint does the same as SIGHUP, and answers with the versions now served.
        assert _register(client, "serve-test", artifacts["a"]) == "3"
        reloaded = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/admin/reload", headers=admin), timeout=30).read())
        assert reloaded == {"versions": {"serve-test@champion": "3"}}
        ev.reset()
        third = ev.act(observation(0))
        ev.close()
        expect = {v: first_action(ServingPolicy.load(artifacts[k], overrides=["seed=3"]), observation(0))
                  for k, v in (("a", "1"), ("b", "2"))}
        np.testing.assert_allclose(before, expect["1"], atol=1e-5)
        np.testing.assert_allclose(after, expect["2"], atol=1e-5)
        np.testing.assert_allclose(third, expect["1"], atol=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert "now names version 2" in out


def test_gripper_correction_from_the_artifacts_closure_table(server, artifacts):
    """Task 0's demonstrations never close either gripper in stage 0 (the synthetic data's table, computed by
    `data stats` and shipped in the export); task 1 has no demonstrations, so its table cell is unknown."""
    from data_loaders.behavior_facts import proprio_to_state

    table = ServingPolicy.load(artifacts["a"]).correction.closure
    assert table.frames[0, 0] > 0 and table.closed[0, 0].tolist() == [0, 0] and table.frames[1].sum() == 0

    def first(obs):
        client = EvaluatorClient("127.0.0.1", server.port)
        try:
            return client.act(obs)
        finally:
            client.close()

    shut = observation(0, gripper_width=0.0)  # both grippers fully closed: an empty grasp
    state = proprio_to_state(shut["robot_r1::proprio"])
    fixed = first(shut)
    assert fixed[14] == 1.0 and fixed[22] == 1.0  # opened
    np.testing.assert_allclose(fixed[3:14], state[3:14], atol=1e-6)  # and otherwise holding still
    np.testing.assert_allclose(fixed[15:22], state[15:22], atol=1e-6)
    assert not np.allclose(first(observation(0))[3:14], state[3:14], atol=1e-3)  # open grippers: the model acts
    unknown = first(observation(1, gripper_width=0.0))
    assert unknown[14] != 1.0 and not np.allclose(unknown[3:14], state[3:14], atol=1e-3)


def test_inpainting_pins_the_kept_actions_through_the_serving_transforms(artifacts):
    """Kept absolute actions go through delta (w.r.t. the current state) + per-step normalisation, get pinned by
    the sampler, and come back out through unnormalisation: pinned to the end, rows 0..3 are the kept rows."""
    import dataclasses

    from serving.control.session import InferenceRequest
    from serving.observation import parse_observation

    policy = ServingPolicy.load(artifacts["a"])
    obs = parse_observation(observation(0), num_tasks=50)

    def chunk(kept, key=(0, 0, 1)):
        req = InferenceRequest(images=obs.images, state=obs.state, task=0, stage=0, kept=kept, noise_key=key)
        return policy.infer([req])[0].actions

    kept = chunk(None, (0, 0, 0))[26:30] + 0.2  # a target the model would not produce on its own
    free, soft = chunk(None), chunk(kept)
    # Soft (the default: pinned while t > 0.3, then free): much closer to the kept rows than without inpainting.
    assert np.abs(soft[:4] - kept).mean() < 0.5 * np.abs(free[:4] - kept).mean()
    policy.model.cfg = dataclasses.replace(policy.model.cfg, inpaint_time_threshold=-1.0)  # pinned to t = 0
    policy.model._inpainters = {}
    np.testing.assert_allclose(chunk(kept)[:4], kept, atol=1e-4)
