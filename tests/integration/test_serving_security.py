"""The policy server's protection over real sockets: API keys (openpi-client's `api_key` and our client's header),
401 before the upgrade, /healthz open, keys never logged; message-size and connection caps (a connection over the
cap waits for a slot); idle timeouts (off by default, 1013 when set); TLS with a self-signed certificate made
here. The stock evaluator's view of the same limits is tests/integration/test_evaluator_conformance.py."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import connect

from serving.router import ModelRouter
from serving.security import SecurityConfig, authorized, load_api_keys
from serving.server import PolicyServer
from tests.evaluator_client import EvaluatorClient, wait_healthy
from tests.serving_support import make_artifacts, observation

pytestmark = pytest.mark.integration

KEY = "k3y-" + "7f" * 16  # 36 characters
OTHER = "k3y-" + "00" * 16  # a wrong key of the right length


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("serving-security"))


def _start(artifacts, **security) -> PolicyServer:
    srv = PolicyServer(ModelRouter(artifacts["mapping"]), port=0, security=SecurityConfig(**security))
    srv.start_background()
    return srv


def _wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def _status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_api_keys_gate_everything_but_healthz_and_are_never_logged(artifacts, caplog):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    caplog.set_level(logging.DEBUG)
    srv = _start(artifacts, api_keys=(KEY,))
    try:
        base = f"http://127.0.0.1:{srv.port}"
        wait_healthy("127.0.0.1", srv.port)
        assert _status(f"{base}/healthz") == 200  # the evaluator polls it without credentials
        assert _status(f"{base}/admin/status", {"Authorization": f"Api-Key {KEY}"}) == 404  # no admin key: off
        for header in (None, {"Authorization": f"Api-Key {OTHER}"}, {"Authorization": f"Bearer {KEY}"},
                       {"Authorization": "Api-Key"}):
            with pytest.raises(InvalidStatus) as e:
                connect(f"ws://127.0.0.1:{srv.port}", additional_headers=header, open_timeout=10)
            assert e.value.response.status_code == 401
            assert b"Authorization: Api-Key <key>" in e.value.response.body
            assert b"stock BEHAVIOR evaluator cannot send one" in e.value.response.body
        # openpi-client (what the evaluator uses) with its api_key setting.
        policy = WebsocketClientPolicy(host="127.0.0.1", port=srv.port, api_key=KEY)
        action = policy.infer(observation(0))["action"]
        assert np.asarray(action).shape == (23,)
        client = EvaluatorClient("127.0.0.1", srv.port, api_key=KEY)
        assert client.act(observation(40)).shape == (23,)
        client.close()
        assert srv.status()["rejected"] == 4
    finally:
        srv.stop()
    server_log = "\n".join(r.getMessage() for r in caplog.records
                           if r.name.startswith(("serving", "websockets.server", "trainer")))
    assert "missing or invalid API key" in server_log and "Authorization: ***" in server_log  # debug: headers
    assert KEY not in server_log and OTHER not in server_log


def test_oversized_message_closes_only_that_connection_with_1009(artifacts):
    srv = _start(artifacts, max_message_mb=5)
    try:
        good = EvaluatorClient("127.0.0.1", srv.port)
        big = EvaluatorClient("127.0.0.1", srv.port)
        assert good.act(observation(1, size=None)).shape == (23,)  # a 720/480 observation (3.74 MiB) fits
        big.ws.send(b"\x00" * (6 * 1024 * 1024))
        with pytest.raises(ConnectionClosed) as e:
            big.ws.recv(timeout=30)
        assert e.value.rcvd.code == 1009
        assert good.act(observation(1)).shape == (23,)  # the others keep working
        good.close()
        assert srv.status()["errors"] == 1
    finally:
        srv.stop()


def test_connection_cap_makes_a_connection_wait_for_a_slot_within_a_bound(artifacts, caplog):
    caplog.set_level(logging.INFO)
    srv = _start(artifacts, max_connections=2, connect_wait_s=1.0)
    try:
        a = EvaluatorClient("127.0.0.1", srv.port)
        b = EvaluatorClient("127.0.0.1", srv.port)
        late = connect(f"ws://127.0.0.1:{srv.port}", open_timeout=10).__enter__()  # upgraded: no 503
        with pytest.raises(TimeoutError):
            late.recv(timeout=0.3)  # no metadata while both slots are held
        assert srv.status()["waiting"] == 1
        a.close()
        assert isinstance(late.recv(timeout=10), bytes)  # a's slot went to it: the metadata frame
        assert srv.connections == 2 and srv.status()["waiting"] == 0
        t0 = time.monotonic()
        with pytest.raises(ConnectionClosed) as e:  # nothing frees within connect_wait_s: closed with 1013
            connect(f"ws://127.0.0.1:{srv.port}", open_timeout=10).__enter__().recv(timeout=10)
        assert e.value.rcvd.code == 1013 and 0.9 < time.monotonic() - t0 < 5
        assert srv.status()["rejected"] == 1
        assert b.act(observation(1)).shape == (23,)
        b.close()
        late.close()
    finally:
        srv.stop()
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("serving"))
    assert "waits for a slot: 2 open (--max-connections 2), 1 waiting; at most 1 s" in logged
    assert "no slot freed within 1 s; closed with 1013" in logged


def test_idle_connection_is_closed_with_1013_and_only_when_enabled(artifacts):
    assert SecurityConfig().idle_timeout_s == 0  # off by default: an evaluator is silent while a scene loads
    srv = _start(artifacts, idle_timeout_s=0.5)
    try:
        client = EvaluatorClient("127.0.0.1", srv.port)
        assert client.act(observation(0)).shape == (23,)  # activity keeps it open...
        with pytest.raises(ConnectionClosed) as e:  # ...silence does not: no text frame (the client would raise)
            client.ws.recv(timeout=10)
        assert e.value.rcvd.code == 1013 and e.value.rcvd.reason == "idle for 0.5 s: reconnect"
        _wait_until(lambda: srv.connections == 0)
        assert srv.connections == 0  # the closed connection's slot (and memory) are released
    finally:
        srv.stop()


def _self_signed(tmp_path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "b1k-policy-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_handshake_with_a_self_signed_certificate(artifacts, tmp_path):
    cert, key = _self_signed(tmp_path)
    srv = _start(artifacts, tls_cert=cert, tls_key=key, api_keys=(KEY,))
    try:
        trust = ssl.create_default_context(cafile=cert)
        client = EvaluatorClient("127.0.0.1", srv.port, api_key=KEY, ssl_context=trust)
        assert client.act(observation(0)).shape == (23,)
        assert client.ws.socket.version() in ("TLSv1.2", "TLSv1.3")
        client.close()
        with pytest.raises(ssl.SSLCertVerificationError):  # an untrusting client refuses the handshake
            connect(f"wss://127.0.0.1:{srv.port}", ssl=ssl.create_default_context(), open_timeout=10)
        with pytest.raises((InvalidHandshake, OSError)):  # plain ws:// to a TLS port gets no websocket
            connect(f"ws://127.0.0.1:{srv.port}", open_timeout=5)
    finally:
        srv.stop()


def test_security_settings_are_validated_and_keys_loaded(tmp_path):
    with pytest.raises(ValueError, match=r"would reject the evaluator's full-resolution observations \(3.74 MiB"):
        SecurityConfig(max_message_mb=3.5)
    assert SecurityConfig().max_message_mb == 16  # ~4x the 3.74 MiB a 720/480 observation measures
    with pytest.raises(ValueError, match="must be >= 0"):
        SecurityConfig(connect_wait_s=-1)
    with pytest.raises(ValueError, match="at least 16 characters"):
        SecurityConfig(api_keys=("short",))
    with pytest.raises(ValueError, match="needs both --tls-cert and --tls-key"):
        SecurityConfig(tls_cert="c.pem")
    with pytest.raises(ValueError, match="cannot load the TLS certificate"):
        SecurityConfig(tls_cert=str(tmp_path / "no.pem"), tls_key=str(tmp_path / "no.key")).ssl_context()
    f = tmp_path / "keys"
    f.write_text(f"# policy server keys\n{KEY}\n\n{OTHER}\n")
    assert load_api_keys(file=str(f), environ={"B1K_API_KEYS": KEY}) == (KEY, OTHER)  # env and file, deduplicated
    assert load_api_keys(environ={"B1K_API_KEYS_FILE": str(f)}) == (KEY, OTHER)
    assert load_api_keys(environ={}) == ()
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(file=str(tmp_path / "empty"), environ={})
    assert authorized(f"Api-Key {KEY}", (OTHER, KEY)) and authorized(f"api-key {KEY}", (KEY,))
    assert not authorized(f"Api-Key {OTHER}", (KEY,)) and not authorized(None, (KEY,))
    assert not authorized(f"Bearer {KEY}", (KEY,)) and authorized(None, ())
