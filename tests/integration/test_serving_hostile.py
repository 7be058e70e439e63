"""Issue 16, policy server: hostile input over real websockets on 127.0.0.1, and damaged exports.

float64 proprio that overflows float32; camera frames with a side of 0, beyond --max-image-side or too elongated to
resize; decoding off the event loop; at most two messages held per connection; admin endpoints off without an admin
key and closed to client keys; `serve` on a port in use; model.safetensors / config.json / serving.json that do not
match or have the wrong types -- each one line naming the key, file or field, and no traceback.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from serving.policy import ServingPolicy
from serving.router import ModelRouter
from serving.security import SecurityConfig
from serving.server import PolicyServer
from serving.wire import pack
from tests.evaluator_client import EvaluatorClient, wait_healthy
from tests.serving_support import make_artifacts, observation

pytestmark = pytest.mark.integration

PROPRIO = "robot_r1::proprio"
HEAD = "robot_r1::robot_r1:zed_link:Camera:0::rgb"
CLIENT_KEY = "client-" + "1f" * 16
ADMIN_KEY = "admin-" + "9c" * 16


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("serving-hostile"))


def _start(source: str, loader=None, **security) -> PolicyServer:
    router = ModelRouter(source) if loader is None else ModelRouter(source, loader=loader)
    srv = PolicyServer(router, port=0, security=SecurityConfig(**security))
    srv.start_background()
    wait_healthy("127.0.0.1", srv.port)
    return srv


@pytest.fixture(scope="module")
def server(artifacts):
    srv = _start(artifacts["a"])
    yield srv
    srv.stop()


def _bad_request(srv: PolicyServer, message: bytes) -> str:
    client = EvaluatorClient("127.0.0.1", srv.port)
    client.ws.send(message)
    reply = client.ws.recv(timeout=30)
    with pytest.raises(ConnectionClosed) as closed:
        client.ws.recv(timeout=30)
    assert closed.value.rcvd.code == 1011
    assert isinstance(reply, str), "bad input was answered with an action"
    return reply


def _no_traceback_logged(caplog) -> None:
    logged = [r for r in caplog.records if r.name.startswith("serving")]
    assert logged and not any(r.exc_info for r in logged), [r.getMessage() for r in logged]
    assert not any("server error" in r.getMessage() for r in logged)


# --- row "policy server: float64 proprio 1e300" ----------------------------------------------------------------

def test_float64_proprio_finite_only_in_float64_is_a_bad_request(server, caplog):
    caplog.set_level(logging.INFO)
    obs = observation(0)
    proprio = obs[PROPRIO].astype(np.float64)
    proprio[5] = 1e300  # finite as float64, inf as float32 (before: 20 of 23 actions came back inf)
    reply = _bad_request(server, pack({**obs, PROPRIO: proprio}))
    assert reply.startswith("bad request: 'robot_r1::proprio' has 1 value(s) that are not finite in float32"), reply
    assert "index 5: 1e+300" in reply
    # Two finite float32 finger widths whose sum overflows: the derived state is checked too.
    wide = obs[PROPRIO].copy()
    wide[193:195] = 3e38
    assert "overflows float32 in the 23-d state" in _bad_request(server, pack({**obs, PROPRIO: wide}))
    _no_traceback_logged(caplog)
    # Ordinary float64 proprio is still served, and gives what the float32 original gives.
    client = EvaluatorClient("127.0.0.1", server.port)
    try:
        as64 = client.act({**obs, PROPRIO: obs[PROPRIO].astype(np.float64)})
        client.reset()
        as32 = client.act(obs)
    finally:
        client.close()
    assert np.all(np.isfinite(as64)) and np.array_equal(as64, as32)


# --- row "a 1x4096 camera image" -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, expect", [
    ((1, 4096, 4), "is 1x4096: each side must be 1..1024 (--max-image-side"),
    ((0, 224, 4), "is 0x224: each side must be 1..1024"),
    ((1025, 1025, 4), "is 1025x1025: each side must be 1..1024"),
    ((2, 1000, 4), "is 2x1000: an aspect ratio beyond 224:1 leaves nothing after resizing"),
])
def test_camera_frame_with_a_bad_side_is_a_bad_request_naming_the_key(server, caplog, shape, expect):
    caplog.set_level(logging.INFO)
    obs = {**observation(0), HEAD: np.zeros(shape, np.uint8)}
    reply = _bad_request(server, pack(obs))
    assert reply.startswith(f"bad request: {HEAD!r} {expect}"), reply
    _no_traceback_logged(caplog)


def test_max_image_side_option_and_the_largest_accepted_frame(artifacts, server):
    client = EvaluatorClient("127.0.0.1", server.port)
    try:  # the default admits 1024 (and so the evaluator's 720x720 head camera)
        assert client.act({**observation(0), HEAD: np.zeros((1024, 1024, 4), np.uint8)}).shape == (23,)
    finally:
        client.close()
    with pytest.raises(ValueError, match="max_image_side=100 would reject the evaluator's 224x224 frames"):
        SecurityConfig(max_image_side=100)
    small = _start(artifacts["a"], max_image_side=480)
    try:
        full = observation(0, size=None)  # 720 head, 480 wrists
        assert "is 720x720: each side must be 1..480" in _bad_request(small, pack(full))
        ok = EvaluatorClient("127.0.0.1", small.port)
        assert ok.act({**full, HEAD: full[HEAD][:480, :480]}).shape == (23,)
        ok.close()
    finally:
        small.stop()


# --- row "4 clients sending 48 MB frames": decoding off the loop, bounded buffering ------------------------------

def test_decoding_runs_off_the_event_loop(server, monkeypatch):
    """A decode that takes 1.5 s (as a 48 MB frame does on a loaded machine, scaled up) must not stall other
    connections: their steps go on meanwhile."""
    import serving.decoding as decoding

    real = decoding.decode
    slow_started = threading.Event()

    def decode(message, **kwargs):
        if len(message) > 5_000_000:
            slow_started.set()
            time.sleep(1.5)
        return real(message, **kwargs)

    monkeypatch.setattr(decoding, "decode", decode)
    light = EvaluatorClient("127.0.0.1", server.port)
    heavy = EvaluatorClient("127.0.0.1", server.port)
    try:
        light.act(observation(0))  # the first step runs the model; the next ones come from the chunk
        heavy.ws.send(pack({**observation(0), "padding": np.zeros(8_000_000, np.uint8)}))
        assert slow_started.wait(10)
        t0 = time.perf_counter()
        for i in range(5):
            light.act(observation(0, seed=i))
        elapsed = time.perf_counter() - t0
        assert elapsed < 0.75, f"5 light steps took {elapsed:.2f} s while a heavy frame was decoded"
        assert not isinstance(heavy.ws.recv(timeout=30), str)  # and the heavy one is answered too
    finally:
        light.close()
        heavy.close()


def test_a_connection_holds_at_most_two_messages(artifacts):
    """A client that pipelines 40 MB messages while its first one is still being answered: the server reads one
    ahead and then stops reading (TCP back-pressure), so memory stays within 2 x the message cap per connection.
    websockets' default would have buffered 16 messages (640 MB) here."""
    gate = threading.Event()

    def gated(url, **kwargs):
        policy = ServingPolicy.load(url, **kwargs)
        infer = policy.infer
        policy.infer = lambda reqs: (gate.wait(60), infer(reqs))[1]
        return policy

    srv = _start(artifacts["a"], loader=gated, max_message_mb=48)
    frame = pack({**observation(0), "padding": np.zeros(40 << 20, np.uint8)})
    client = EvaluatorClient("127.0.0.1", srv.port)
    sent: list[int] = []

    def flood() -> None:
        try:
            for i in range(5):
                client.ws.send(frame)
                sent.append(i)
        except ConnectionClosed:
            pass

    sender = threading.Thread(target=flood, daemon=True)
    try:
        sender.start()
        deadline = time.monotonic() + 60
        while len(sent) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(3.0)  # 40 MB take well under a second through loopback, if anyone is reading them
        held = len(sent)
        gate.set()
        replies = [client.ws.recv(timeout=60) for _ in range(5)]
        sender.join(timeout=60)
    finally:
        gate.set()
        client.close()
        srv.stop()
    # One message being answered, one read ahead; a third can sit only partly in the kernel's socket buffers.
    assert held == 2, f"{held} messages of 40 MB were accepted while the first was being answered"
    assert len(sent) == 5 and all(not isinstance(r, str) for r in replies)


# --- point 5 / row "/admin/reload" ------------------------------------------------------------------------------

def _get(url: str, key: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Api-Key {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_admin_endpoints_are_off_without_an_admin_key(server):
    base = f"http://127.0.0.1:{server.port}"
    for path in ("/admin/status", "/admin/reload"):
        status, body = _get(base + path)
        assert status == 404 and b"admin endpoints need an admin key" in body
    assert _get(base + "/healthz")[0] == 200


def test_admin_endpoints_need_the_admin_key_and_refuse_client_keys(artifacts, caplog):
    caplog.set_level(logging.DEBUG)
    srv = _start(artifacts["mapping"], api_keys=(CLIENT_KEY,), admin_keys=(ADMIN_KEY,))
    try:
        base = f"http://127.0.0.1:{srv.port}"
        assert _get(base + "/healthz")[0] == 200  # the evaluator polls it without credentials
        for key in (None, CLIENT_KEY, ADMIN_KEY[:-1] + "0"):
            for path in ("/admin/status", "/admin/reload"):
                status, body = _get(base + path, key)
                assert status == 401 and b"missing or invalid admin key" in body, (key, path, status)
        status, body = _get(base + "/admin/status", ADMIN_KEY)
        assert status == 200 and json.loads(body)["rejected"] == 6
        # Models by name, alias and version: the export directories (absolute paths) are not shown (issue 21).
        assert json.loads(body)["models"] == [{"name": "a", "alias": None, "version": None, "tasks": [0, 1]},
                                              {"name": "b", "alias": None, "version": None, "tasks": [40]}]
        assert artifacts["a"] not in body.decode() and artifacts["mapping"] not in body.decode()
        status, body = _get(base + "/admin/reload", ADMIN_KEY)
        assert status == 200 and json.loads(body) == {"versions": {"a": None, "b": None}}
        assert _get(base + "/admin/other", ADMIN_KEY)[0] == 404
        client = EvaluatorClient("127.0.0.1", srv.port, api_key=CLIENT_KEY)  # clients are unaffected
        assert client.act(observation(0)).shape == (23,)
        client.close()
        with pytest.raises(InvalidStatus) as refused:  # and the admin key is no client key
            EvaluatorClient("127.0.0.1", srv.port, api_key=ADMIN_KEY)
        assert refused.value.response.status_code == 401
    finally:
        srv.stop()
    server_log = "\n".join(r.getMessage() for r in caplog.records
                           if r.name.startswith(("serving", "websockets.server", "trainer")))
    assert "missing or invalid admin key" in server_log and "Authorization: ***" in server_log
    assert ADMIN_KEY not in server_log and CLIENT_KEY not in server_log


# --- point 7: one-line errors naming the port, the file and the field -------------------------------------------

def _serve(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "trainer", "serve", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_serve_on_a_port_in_use_is_one_line_naming_the_port(artifacts):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve(["--model", artifacts["a"], "--port", str(port)])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port}: the port is already in use (another server?); stop it or "
        f"choose another with --port")


def _copy(artifacts, tmp_path, name: str = "bad") -> str:
    dst = tmp_path / name
    shutil.copytree(artifacts["a"], dst)
    return str(dst)


def _rewrite_json(path: str, edit) -> None:
    with open(path) as f:
        doc = json.load(f)
    edit(doc)
    with open(path, "w") as f:
        json.dump(doc, f)


def _safetensors_header(path: str) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), f.read()


def _write_safetensors(path: str, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def _first_tensor(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def test_weights_that_do_not_match_the_config_name_the_file_and_the_first_tensor(artifacts, tmp_path):
    export = _copy(artifacts, tmp_path)
    weights = f"{export}/model.safetensors"
    header, data = _safetensors_header(weights)
    first = _first_tensor(header)

    def load_error() -> str:
        with pytest.raises(ValueError) as e:
            ServingPolicy.load(export)
        return str(e.value)

    shape = header[first]["shape"]
    _write_safetensors(weights, {**header, first: {**header[first], "shape": [shape[0] + 1, *shape[1:]]}}, data)
    assert load_error().startswith(f"{weights}: tensor {first!r} has shape [{shape[0] + 1}")
    assert f"config.json needs {shape}" in load_error()
    _write_safetensors(weights, header, data[: len(data) // 2])  # truncated: the bytes do not cover the tensors
    message = load_error()
    assert message.startswith(f"{weights}: tensor ") and "the file is truncated" in message
    _write_safetensors(weights, {k: v for k, v in header.items() if k != first}, data)
    assert load_error().startswith(f"{weights}: tensor {first!r} is missing")
    with open(weights, "wb") as f:
        f.write(b"\x00\x01")
    assert "too short for a safetensors file" in load_error()


def test_config_and_serving_json_field_types_name_file_and_field(artifacts, tmp_path):
    export = _copy(artifacts, tmp_path)
    _rewrite_json(f"{export}/config.json", lambda d: d["model"]["vision"].update(width="64"))
    with pytest.raises(ValueError) as e:
        ServingPolicy.load(export)
    assert str(e.value) == f"{export}/config.json: field 'model.vision.width' must be int, got str '64'"
    _rewrite_json(f"{export}/config.json", lambda d: d["model"].update(task_num_stages=[5, "x"]))
    with pytest.raises(ValueError, match=r"config.json: field 'model.task_num_stages\[1\]' must be int"):
        ServingPolicy.load(export)

    export = _copy(artifacts, tmp_path, "bad-serving")
    _rewrite_json(f"{export}/serving.json", lambda d: d.update(execute_steps="20"))
    with pytest.raises(ValueError) as e:
        ServingPolicy.load(export)
    assert str(e.value) == f"{export}/serving.json: field 'execute_steps' must be int, got str '20'"
    _rewrite_json(f"{export}/serving.json", lambda d: d.update(execute_steps=20, inpainting=1))
    with pytest.raises(ValueError, match="serving.json: field 'inpainting' must be bool, got int 1"):
        ServingPolicy.load(export)
    with open(f"{export}/serving.json", "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=r"serving.json: not valid JSON \(Expecting property name"):
        ServingPolicy.load(export)


def test_cli_reports_a_damaged_export_in_one_line(artifacts, tmp_path):
    export = _copy(artifacts, tmp_path)
    _rewrite_json(f"{export}/config.json", lambda d: d["model"].update(num_cameras=3.5))
    done = _serve(["--model", export, "--port", "0"])
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {export}/config.json: field 'model.num_cameras' must be int, got float 3.5")
