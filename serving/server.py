"""The websocket policy server the BEHAVIOR 2025 evaluator (`eval.py policy=websocket`) talks to.

Protocol (behavior_data_and_protocol §4-5): `GET /healthz` is 200 once the models are validated and the first
one is loaded, 503 before. A websocket (no size limit, no compression) gets one binary msgpack metadata frame on
connect; then each binary observation gets a binary `{"action": float32 (23,), "server_timing": {...}}` reply
(`infer_ms`, `load_ms`: a checkpoint load this step waited for, `prev_total_ms`), and `{"reset": true}` gets no
reply and clears that connection's control state. Anything malformed gets a text frame naming the problem, then
close code 1011; other connections are not affected.

Admin: `GET /admin/status` (JSON: models, resident set, batch sizes) and `GET /admin/reload` (re-resolve registry
aliases; SIGHUP does the same), both without dropping connections. They exist only with admin keys configured
(404 otherwise) and need `Authorization: Api-Key <admin key>`; a client API key does not open them.

Security (serving/security.py): with API keys configured, everything but /healthz and /admin/* needs
`Authorization: Api-Key <key>` (401 before the websocket upgrade otherwise; the stock evaluator cannot send one);
optional TLS; messages above the size cap close the connection with 1009.

The stock evaluator client (BEHAVIOR-1K WebsocketClientPolicy; tests/evaluator_client.StockEvaluator) dies on any
HTTP status at the upgrade and on a clean close (1000/1001, ConnectionClosedOK); with allow_reconnect it reconnects
on an abnormal one (ConnectionClosedError) inside act(). So: a connection beyond --max-connections is upgraded and
waits (its metadata frame is held back, the client has no receive timeout) until a slot frees, for at most
connect_wait_s; an idle timeout (off by default) closes with 1013; shutdown closes with 1012 (service restart), so
a reconnecting client resends its observation to the restarted server.

The event loop only moves bytes: parsing a message (msgpack, cheap checks) and, on steps that infer, converting its
images run on threads that keep small frames apart from large ones and limit the large ones' share
(serving/decoding.py); steps answered from the current chunk never touch the pixels. Inference runs on the
batcher's thread, so clients sending full-resolution frames do not hold up the others.
"""

from __future__ import annotations

import asyncio
import errno
import http
import itertools
import json
import logging
import signal
import threading
import time
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from serving.batcher import InferenceBatcher
from serving.control.session import ControlSession
from serving.decoding import Decoder
from serving.observation import Observation
from serving.router import ModelRouter
from serving.security import READ_AHEAD_MESSAGES, SecurityConfig, authorized
from serving.wire import ProtocolError, pack
from trainer import redact

log = logging.getLogger(__name__)
CLOSE_INTERNAL_ERROR = 1011
CLOSE_SERVICE_RESTART = 1012  # shutdown: the stock client's allow_reconnect retries it
CLOSE_TRY_AGAIN_LATER = 1013  # idle timeout, no slot within connect_wait_s (1001 would be ConnectionClosedOK)
CLOSE_MESSAGE_TOO_BIG = 1009


class PolicyServer:
    def __init__(self, router: ModelRouter, *, host: str = "127.0.0.1", port: int = 8000,
                 batch_window_ms: float = 2.0, max_batch: int = 16, exit_on_startup_error: bool = True,
                 security: SecurityConfig | None = None) -> None:
        self.router, self.host, self.port = router, host, port
        self.security = security or SecurityConfig()
        redact.REDACTOR.add(*self.security.api_keys, *self.security.admin_keys)
        redact.protect_logger("websockets.server")  # its debug log prints request headers, Authorization included
        self.rejected = 0  # requests refused for a missing/wrong API key, connections that found no slot in time
        self.exit_on_startup_error = exit_on_startup_error
        self.connections = 0  # connections holding a slot
        self.waiting = 0  # connections waiting for one
        self._slots: asyncio.Semaphore | None = None  # created on the server's loop
        self.batcher = InferenceBatcher(window_ms=batch_window_ms, max_batch=max_batch,
                                        expected=lambda: self.connections)
        self.ready = False
        self.startup_error: BaseException | None = None
        self.errors = 0  # connections closed because of bad input or a failure
        self._ids = itertools.count(1)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.decode = Decoder(workers=self.security.decode_workers, max_image_side=self.security.max_image_side,
                              large_share=self.security.large_frame_share)

    # --- HTTP side --------------------------------------------------------------------------------------------

    async def _process_request(self, connection: ServerConnection, request: Any):
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            if self.ready:
                return connection.respond(http.HTTPStatus.OK, "OK\n")
            why = f"failed: {self.startup_error}" if self.startup_error else "loading models"
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, f"not ready ({why})\n")
        if path.startswith("/admin/"):
            return await self._admin(connection, request, path)
        if not authorized(request.headers.get("Authorization"), self.security.api_keys):
            self.rejected += 1
            # Never log the header: a wrong key is often a real key of another service.
            log.warning("refused %s from %s: missing or invalid API key", path, connection.remote_address)
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or invalid API key: send the header "
                                      "'Authorization: Api-Key <key>' (openpi-client's api_key); the stock BEHAVIOR "
                                      "evaluator cannot send one: serve it without keys (docs/serving.md)\n")
        if not self.ready:  # the stock client polls /healthz before connecting: only other clients get here
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n")
        return None

    async def _admin(self, connection: ServerConnection, request: Any, path: str):
        if not self.security.admin_keys or path not in ("/admin/status", "/admin/reload"):
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found (admin endpoints need an admin key: "
                                      "--admin-keys-file or $B1K_ADMIN_KEYS_FILE)\n")
        if not authorized(request.headers.get("Authorization"), self.security.admin_keys):
            self.rejected += 1
            log.warning("refused %s from %s: missing or invalid admin key", path, connection.remote_address)
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or invalid admin key: send the header "
                                      "'Authorization: Api-Key <admin key>' (client API keys do not open /admin)\n")
        if path == "/admin/status":
            return connection.respond(http.HTTPStatus.OK, json.dumps(self.status()) + "\n")
        try:
            versions = await asyncio.get_running_loop().run_in_executor(None, self.router.reload)
        except Exception as e:  # noqa: BLE001 - reported to the caller, serving goes on
            log.exception("reload failed")
            return connection.respond(http.HTTPStatus.INTERNAL_SERVER_ERROR, f"reload failed: {e}\n")
        return connection.respond(http.HTTPStatus.OK, json.dumps({"versions": versions}) + "\n")

    def status(self) -> dict[str, Any]:
        return {"ready": self.ready, "connections": self.connections, "waiting": self.waiting, "errors": self.errors,
                "rejected": self.rejected,
                "batch_sizes": dict(sorted(self.batcher.batch_sizes.items())), **self.router.describe()}

    # --- websocket side ---------------------------------------------------------------------------------------

    async def _policy(self, task: int) -> tuple[Any, float]:
        """The model for `task` and the ms this step waited for it to load (0 when resident)."""
        policy = self.router.peek(task)  # raises ObservationError for an unmapped task
        if policy is not None:
            return policy, 0.0
        t0 = time.perf_counter()
        policy = await asyncio.get_running_loop().run_in_executor(None, self.router.get, task)
        return policy, (time.perf_counter() - t0) * 1e3

    async def _step(self, session: ControlSession, obs: Observation | None) -> dict[str, Any] | None:
        if obs is None:  # {"reset": true}
            session.reset()
            return None
        policy, load_ms = await self._policy(obs.task)
        session.begin(obs.task, policy.info(obs.task))
        infer_ms = 0.0
        if session.needs_inference():
            images = await self.decode.images(obs)  # only now: chunk steps never convert the pixels
            result = await self.batcher.submit(policy, session.request(images, obs.state))
            session.accept(obs.state, result)
            infer_ms = result.infer_ms
        action = np.asarray(session.next_action(), dtype=np.float32)
        return {"action": action, "server_timing": {"infer_ms": infer_ms, "load_ms": load_ms}}

    async def _take_slot(self, ws: ServerConnection, conn: int) -> bool:
        """Wait (bounded by connect_wait_s) for one of the max_connections slots; False if none freed in time
        (the connection is then closed with 1013)."""
        assert self._slots is not None
        if not self._slots.locked():
            await self._slots.acquire()
            return True
        wait_s = self.security.connect_wait_s
        log.warning("connection %d from %s waits for a slot: %d open (--max-connections %d), %d waiting; at most "
                    "%g s", conn, ws.remote_address, self.connections, self.security.max_connections,
                    self.waiting + 1, wait_s)
        self.waiting += 1
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=wait_s)
        except TimeoutError:
            self.rejected += 1
            log.warning("connection %d: no slot freed within %g s; closed with 1013", conn, wait_s)
            try:
                await ws.close(CLOSE_TRY_AGAIN_LATER, f"no free slot within {wait_s:g} s (--max-connections)")
            except ConnectionClosed:
                pass
            return False
        finally:
            self.waiting -= 1
        log.info("connection %d got a slot after %.1f s", conn, time.perf_counter() - t0)
        return True

    async def _receive(self, ws: ServerConnection) -> Any:
        if not self.security.idle_timeout_s:
            return await ws.recv()
        return await asyncio.wait_for(ws.recv(), timeout=self.security.idle_timeout_s)

    async def _handler(self, ws: ServerConnection) -> None:
        conn = next(self._ids)
        if not await self._take_slot(ws, conn):
            return
        self.connections += 1
        session = ControlSession()
        prev_total_ms = 0.0
        log.info("connection %d from %s", conn, ws.remote_address)
        try:
            await ws.send(pack({"server": "b1k-train", "protocol": "behavior-2025", "action_dim": 23,
                                **self.router.describe()}))
            while True:
                try:
                    message = await self._receive(ws)
                except TimeoutError:
                    await self._close_idle(ws, conn)
                    return
                t0 = time.perf_counter()
                try:
                    if isinstance(message, str):
                        raise ProtocolError("text frames are not part of the protocol: send binary msgpack frames")
                    obs = await self.decode(message)  # off the event loop
                    del message  # the observation holds copies of its arrays (msgpack bin): free the frame now
                    reply = await self._step(session, obs)
                except Exception as e:  # noqa: BLE001 - bad input or a failed inference ends this connection only
                    await self._fail(ws, conn, e)
                    return
                if reply is None:
                    continue
                reply["server_timing"]["prev_total_ms"] = prev_total_ms
                await ws.send(pack(reply))
                prev_total_ms = (time.perf_counter() - t0) * 1e3
        except ConnectionClosed as e:
            if e.sent is not None and e.sent.code == CLOSE_MESSAGE_TOO_BIG:
                self.errors += 1
                log.warning("connection %d: a message exceeded --max-message-mb %g; closed with 1009", conn,
                            self.security.max_message_mb)
        finally:
            self.connections -= 1
            assert self._slots is not None
            self._slots.release()
            log.info("connection %d closed", conn)

    async def _fail(self, ws: ServerConnection, conn: int, e: Exception) -> None:
        self.errors += 1
        if isinstance(e, ProtocolError):
            text = f"bad request: {e}"
            log.warning("connection %d: %s", conn, text)
        else:
            text = f"server error: {type(e).__name__}: {e}"
            log.exception("connection %d: inference failed", conn)
        try:
            await ws.send(text)
            await ws.close(CLOSE_INTERNAL_ERROR, text[:120])  # a close reason is limited to 123 bytes
        except ConnectionClosed:
            pass

    async def _close_idle(self, ws: ServerConnection, conn: int) -> None:
        # No text frame: the stock client turns one into a RuntimeError, while a 1013 close is what its
        # allow_reconnect retries (on its next act(); its reset() does not reconnect).
        log.info("connection %d: idle for %g s without a message: closed with 1013", conn,
                 self.security.idle_timeout_s)
        try:
            await ws.close(CLOSE_TRY_AGAIN_LATER, f"idle for {self.security.idle_timeout_s:g} s: reconnect")
        except ConnectionClosed:
            pass

    # --- lifecycle --------------------------------------------------------------------------------------------

    async def _warm_up(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.router.validate)
        except Exception as e:  # noqa: BLE001 - /healthz reports it; the process stays up to say why
            self.startup_error = e
            log.error("cannot serve: %s", e)
            if self.exit_on_startup_error:
                assert self._stop is not None
                self._stop.set()
            return
        self.ready = True
        scheme = "wss" if self.security.tls_cert else "ws"
        log.info("ready on %s://%s:%d (%s; %s)", scheme, self.host, self.port, ", ".join(self.router.resident()),
                 f"{len(self.security.api_keys)} API key(s)" if self.security.api_keys else "no authentication")

    async def run(self, started: threading.Event | None = None) -> None:
        """Serve until stop(); `started` is set once the port is bound (self.port holds the real port)."""
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._slots = asyncio.Semaphore(self.security.max_connections)
        try:
            server = await serve(self._handler, self.host, self.port, compression=None,
                                 max_size=self.security.max_message_bytes, max_queue=READ_AHEAD_MESSAGES,
                                 ssl=self.security.ssl_context(), process_request=self._process_request,
                                 ping_interval=60, ping_timeout=300)
        except OSError as e:
            raise ValueError(_bind_error(self.host, self.port, e)) from None  # the asyncio traceback says nothing
        self.batcher.start()
        try:
            self.port = server.sockets[0].getsockname()[1]
            if threading.current_thread() is threading.main_thread():
                self._loop.add_signal_handler(signal.SIGHUP, lambda: self._loop.run_in_executor(
                    None, self.router.reload))
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._loop.add_signal_handler(sig, self._stop.set)
            if started is not None:
                started.set()
            warm = asyncio.create_task(self._warm_up())
            await self._stop.wait()
            warm.cancel()
        finally:
            # 1012, not websockets' default 1001: a clean close is fatal to the stock client even with
            # allow_reconnect; 1012 makes it poll /healthz and resend its observation to the restarted server.
            server.close(code=CLOSE_SERVICE_RESTART, reason="server restarting: reconnect")
            await server.wait_closed()
        await self.batcher.stop()
        self.decode.shutdown()

    def serve_forever(self) -> None:
        """Serve until SIGTERM/SIGINT; re-raises the error if the models cannot be loaded."""
        asyncio.run(self.run())
        if self.startup_error is not None:
            raise self.startup_error

    def start_background(self, timeout_s: float = 30.0) -> int:
        """Run in a daemon thread (tests, benchmarks); returns the bound port once listening."""
        started, failed = threading.Event(), []

        def main() -> None:
            try:
                asyncio.run(self.run(started))
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                failed.append(e)
                started.set()

        self._thread = threading.Thread(target=main, daemon=True, name="b1k-policy-server")
        self._thread.start()
        if not started.wait(timeout_s):
            raise RuntimeError(f"policy server did not start within {timeout_s} s")
        if failed:
            raise failed[0]
        return self.port

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=30)


def _bind_error(host: str, port: int, e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return (f"cannot listen on {host}:{port}: the port is already in use (another server?); stop it or choose "
                f"another with --port")
    if e.errno == errno.EACCES:
        return f"cannot listen on {host}:{port}: permission denied; use a port above 1023 with --port"
    return f"cannot listen on {host}:{port}: {e.strerror or e}; check --host and --port"
