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
