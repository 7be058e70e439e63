"""A client that behaves as the BEHAVIOR 2025 evaluator's WebsocketPolicy does (behavior_data_and_protocol §4.2,
§4.5, §4.6), written from that description: poll GET /healthz until 2xx, connect with compression off, no size
limit and the evaluator's ping settings, store the metadata frame, send resets without reading a reply, and
turn a text frame into a RuntimeError."""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
from websockets.sync.client import connect

from serving.wire import pack, unpack


def wait_healthy(host: str, port: int, *, timeout_s: float = 60.0, retry_s: float = 0.2,
                 ssl_context: ssl.SSLContext | None = None) -> list[int]:
    """Poll /healthz like the evaluator (2 s timeout per try); returns the status codes seen, the last one 2xx."""
    seen = []
    deadline = time.monotonic() + timeout_s
    scheme = "https" if ssl_context else "http"
    while True:
        try:
            with urllib.request.urlopen(f"{scheme}://{host}:{port}/healthz", timeout=2, context=ssl_context) as r:
                seen.append(r.status)
                return seen
        except urllib.error.HTTPError as e:
            seen.append(e.code)
        except (urllib.error.URLError, ConnectionError):
            seen.append(0)
        if time.monotonic() > deadline:
            raise TimeoutError(f"server not healthy after {timeout_s} s (statuses {seen[-5:]})")
        time.sleep(retry_s)


class EvaluatorClient:
    def __init__(self, host: str, port: int, *, api_key: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        wait_healthy(host, port, ssl_context=ssl_context)
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None  # as the evaluator sends it
        self._conn = connect(f"{'wss' if ssl_context else 'ws'}://{host}:{port}", compression=None, max_size=None,
                             ping_interval=60, ping_timeout=300, open_timeout=30, additional_headers=headers,
                             ssl=ssl_context)
        self.ws = self._conn.__enter__()
        self.metadata = unpack(self.ws.recv(timeout=30))

    def reset(self) -> None:
        """`{"reset": True}`; the evaluator never reads a reply to it."""
        self.ws.send(pack({"reset": True}))

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        self.ws.send(pack(obs))
        reply = self.ws.recv(timeout=60)
        if isinstance(reply, str):
            raise RuntimeError(f"Error in inference server:\n{reply}")
        msg = unpack(reply)
        return np.asarray(msg["action"], dtype=np.float32)

    def pending(self, timeout_s: float = 0.5) -> Any:
        """Whatever the server sent unasked within `timeout_s` (None if nothing): a reset must not be answered."""
        try:
            return self.ws.recv(timeout=timeout_s)
        except TimeoutError:
            return None

    def close(self) -> None:
        self._conn.__exit__(None, None, None)


class StockEvaluator:
    """The stock BEHAVIOR evaluator client (BEHAVIOR-1K WebsocketClientPolicy as eval.py builds it), written from
    its observed behaviour (issue 21), not from its code:
    - lazy: the first reset()/act() connects. Connecting polls GET /healthz (2 s timeout, `poll_s` = 5 s between
      tries, any failure retried) until 2xx, then opens the websocket (compression off, no size limit, ping
      60/300 s, no API key: eval.py cannot configure one), retrying only ConnectionRefusedError, InvalidMessage and
      EOFError; any other failure (an HTTP status such as 401 or 503) ends the run.
    - the metadata frame is decoded with msgpack's strict map keys (an integer key raises).
    - no receive timeout anywhere (the tests bound each call themselves).
    - act(): send, receive; a text frame raises RuntimeError; a reply without "action" is re-sent up to twice; on
      ConnectionClosedError (an abnormal close; 1000/1001 raise ConnectionClosedOK, which it does not catch) it
      reconnects if allow_reconnect, resending the observation, at most twice. reset() sends and reads nothing,
      and does not reconnect."""

    def __init__(self, host: str, port: int, *, allow_reconnect: bool = False, poll_s: float = 5.0) -> None:
        self.host, self.port, self.allow_reconnect, self.poll_s = host, port, allow_reconnect, poll_s
        self.ws = None
        self.metadata: Any = None
        self.health_polls = 0  # GET /healthz sent, over all connects
        self.connects = 0

    def _connect(self) -> None:
        import msgpack
        from websockets.exceptions import InvalidMessage

        while True:
            self.health_polls += 1
            try:
                with urllib.request.urlopen(f"http://{self.host}:{self.port}/healthz", timeout=2) as r:
                    if 200 <= r.status < 300:
                        break
            except Exception:  # noqa: BLE001, S110 - the stock client retries whatever went wrong
                pass
            time.sleep(self.poll_s)
        while True:
            try:
                ws = connect(f"ws://{self.host}:{self.port}", compression=None, max_size=None, ping_interval=60,
                             ping_timeout=300).__enter__()  # websockets 17 warns unless entered
                self.metadata = msgpack.unpackb(ws.recv(), object_hook=_stock_unpack)  # strict_map_key
                self.ws, self.connects = ws, self.connects + 1
                return
            except (ConnectionRefusedError, InvalidMessage, EOFError):
                time.sleep(self.poll_s)

    def reset(self) -> None:
        if self.ws is None:
            self._connect()
        self.ws.send(pack({"reset": True}))

    def act(self, obs: dict[str, Any]) -> tuple[np.ndarray, dict]:
        """The action (float32) and the reply's server_timing."""
        import msgpack
        from websockets.exceptions import ConnectionClosedError

        if self.ws is None:
            self._connect()
        data = pack(obs)
        for attempt in range(3):
            try:
                self.ws.send(data)
                reply = self.ws.recv()
                if isinstance(reply, str):
                    raise RuntimeError(f"Error in inference server:\n{reply}")
                msg = msgpack.unpackb(reply, object_hook=_stock_unpack)
                if "action" not in msg:
                    if attempt < 2:
                        continue
                    raise RuntimeError(f"Server response missing 'action' key: {msg}")
                return np.array(msg["action"], dtype=np.float32), msg.get("server_timing", {})
            except ConnectionClosedError as e:
                if self.allow_reconnect and attempt < 2:
                    self._connect()
                    continue
                raise RuntimeError(f"Websocket connection error: {e}") from e
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()


def _stock_unpack(obj: dict) -> Any:
    # As msgpack-numpy decodes, with no checks: the stock client trusts the server.
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj
