"""Issue 21: the policy server as the stock BEHAVIOR evaluator client sees it (tests/evaluator_client.StockEvaluator:
strict metadata decoding, no receive timeout, /healthz polling, 3 resets before the first observation, reconnects
only on an abnormal close and only with allow_reconnect, no API key). A normal episode, over capacity, an idle
connection, a server restart mid-episode and a task outside the routing. The client polls /healthz every 0.2 s
here instead of 5 s (only the pace differs); every call is bounded by the test's own deadline."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serving.router import ModelRouter
from serving.security import SecurityConfig
from serving.server import PolicyServer
from tests.evaluator_client import StockEvaluator, wait_healthy
from tests.serving_support import make_artifacts, observation

pytestmark = pytest.mark.integration
POLL_S = 0.2


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("conformance"))


def _start(artifacts, port: int = 0, **security) -> PolicyServer:
    srv = PolicyServer(ModelRouter(artifacts["mapping"]), port=port, security=SecurityConfig(**security))
    srv.start_background()
    wait_healthy("127.0.0.1", srv.port)
    return srv


def within(seconds: float, fn, *args):
    """fn(*args) in a thread, failing the test if it has not returned after `seconds` (the client never times
    out by itself)."""
    out: list = []

    def run() -> None:
        try:
            out.append(("ok", fn(*args)))
        except BaseException as e:  # noqa: BLE001 - handed to the test below
            out.append(("err", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"{getattr(fn, '__name__', fn)} did not return within {seconds} s"
    kind, value = out[0]
    if kind == "err":
        raise value
    return value


@pytest.fixture(scope="module")
def server(artifacts):
    srv = _start(artifacts)
    yield srv
    srv.stop()


def test_normal_episode_preloaded_and_a_task_outside_the_routing(server, artifacts):
    assert server.router.resident() == ["a", "b"] and server.router.loads == 2  # both loaded before /healthz
    ev = StockEvaluator("127.0.0.1", server.port, poll_s=POLL_S)
    try:
        for _ in range(3):  # Evaluator.__init__, the instance and the episode each reset before the first obs
            within(30, ev.reset)
        steps = [within(60, ev.act, observation(0, seed=i)) for i in range(22)]
        first40, timing40 = within(60, ev.act, observation(40))
    finally:
        ev.close()
    # The metadata went through strict map keys and names no path.
    assert ev.metadata["protocol"] == "behavior-2025" and [m["name"] for m in ev.metadata["models"]] == ["a", "b"]
    assert artifacts["a"] not in repr(ev.metadata) and artifacts["mapping"] not in repr(ev.metadata)
    actions = np.stack([a for a, _ in steps])
    assert actions.shape == (22, 23) and np.all(np.isfinite(actions)) and np.all(np.isfinite(first40))
    timings = [t for _, t in steps]
    assert timings[0]["infer_ms"] > 0 and timings[0]["load_ms"] == 0 and timing40["load_ms"] == 0
    assert [i for i, t in enumerate(timings) if t["infer_ms"] > 0] == [0, 20]  # a chunk of 20 steps
    assert ev.connects == 1 and server.router.loads == 2
    # A task the routing does not serve: one line naming it, as the client's RuntimeError.
    other = StockEvaluator("127.0.0.1", server.port, poll_s=POLL_S)
    with pytest.raises(RuntimeError, match="unknown task id 7: .* routes tasks \\[0, 1, 40\\]"):
        within(30, other.act, observation(7))
    other.close()


def test_a_step_that_pays_a_load_reports_it_in_its_own_reply(artifacts):
    srv = PolicyServer(ModelRouter(artifacts["mapping"], preload="none"), port=0)
    srv.start_background()
    try:
        wait_healthy("127.0.0.1", srv.port)
        assert srv.router.resident() == ["a"]
        ev = StockEvaluator("127.0.0.1", srv.port, poll_s=POLL_S)
        _, cold = within(60, ev.act, observation(40))  # b loads during this step
        ev.close()
        assert cold["load_ms"] > 0 and cold["infer_ms"] > 0 and cold["prev_total_ms"] == 0
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="serving.preload must be one of auto, all, none, got 'some'"):
        ModelRouter(artifacts["mapping"], preload="some")


def test_over_capacity_the_evaluator_waits_for_a_slot(artifacts):
    srv = _start(artifacts, max_connections=1)
    first = StockEvaluator("127.0.0.1", srv.port, poll_s=POLL_S)
    second = StockEvaluator("127.0.0.1", srv.port, poll_s=POLL_S)
    try:
        within(60, first.act, observation(0))
        done = threading.Event()
        result: list = []
        t = threading.Thread(target=lambda: (result.append(second.act(observation(1))), done.set()), daemon=True)
        t.start()
        assert not done.wait(1.0)  # connected but held back: the stock client waits (it died on the old 503)
        assert srv.status()["waiting"] == 1 and srv.connections == 1
        first.close()
        assert done.wait(60), "the waiting evaluator did not get the freed slot"
        assert result[0][0].shape == (23,) and second.connects == 1
    finally:
        second.close()
        srv.stop()


def test_idle_close_is_one_the_evaluator_reconnects_on(artifacts):
    srv = _start(artifacts, idle_timeout_s=0.5)
    ev = StockEvaluator("127.0.0.1", srv.port, allow_reconnect=True, poll_s=POLL_S)
    try:
        within(60, ev.act, observation(0))
        time.sleep(1.0)  # idle: the server closes with 1013 (with 1001 the client raised ConnectionClosedOK)
        action, _ = within(60, ev.act, observation(0, seed=1))
        assert action.shape == (23,) and ev.connects == 2
    finally:
        ev.close()
        srv.stop()


def test_server_restart_mid_episode_with_allow_reconnect(artifacts):
    srv = _start(artifacts)
    port = srv.port
    ev = StockEvaluator("127.0.0.1", port, allow_reconnect=True, poll_s=POLL_S)
    try:
        for i in range(3):
            within(60, ev.act, observation(0, seed=i))
        polls = ev.health_polls
        srv.stop()  # closes with 1012; nothing listens for a while
        restarted: list[PolicyServer] = []
        starter = threading.Timer(1.0, lambda: restarted.append(_start(artifacts, port=port)))
        starter.start()
        action, timing = within(120, ev.act, observation(0, seed=3))  # reconnects, resends the observation
        starter.join(60)
        assert action.shape == (23,) and ev.connects == 2 and ev.health_polls > polls + 1
        assert timing["infer_ms"] > 0  # a new connection: the restarted server planned a new chunk
    finally:
        ev.close()
        for s in restarted:
            s.stop()
