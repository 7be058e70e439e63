"""The policy server's protection: optional API keys (`Authorization: Api-Key <key>`, for clients that can send
one: openpi-client's api_key, our tools), admin keys of their own for /admin/*, TLS, and bounds on message size,
image size, connection count and idle connections that the BEHAVIOR evaluator never hits.

The stock BEHAVIOR evaluator (eval.py policy=websocket) cannot send a key: its config has host, port and
allow_reconnect only. Protect it by where the server listens instead (loopback + port-forward, or the chart's
NetworkPolicy; docs/serving.md). Nothing here may end its run for a benign reason: a connection over the cap
waits for a slot (the client has no receive timeout) instead of getting 503, which it does not retry; idle
timeouts are off unless set, and close with a code its allow_reconnect retries (1013, not 1001).

Memory: websockets buffers no message ahead of the one being answered beyond one (`READ_AHEAD_MESSAGES`), so the
server holds at most 2 messages per open connection, each at most `max_message_mb`, plus the decoded copy of the
one large message being decoded (serving/decoding.py): at most max_message_mb x (2 x max_connections + 1) for
messages in flight, e.g. 16 MiB x 129 = 2 GiB with the defaults (lower --max-connections to fit a smaller pod);
while a frame is being received, websockets briefly holds up to two more copies of it (unmasking). Connections
waiting for a slot have not been sent the metadata yet, so the evaluator sends nothing on them.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import ssl

from data_loaders.behavior_facts import MODEL_IMAGE_SIZE
from serving.observation import DEFAULT_MAX_IMAGE_SIDE

API_KEYS_ENV = "B1K_API_KEYS"  # comma-separated accepted keys
API_KEYS_FILE_ENV = "B1K_API_KEYS_FILE"  # a file with one key per line (a mounted Kubernetes Secret)
ADMIN_KEYS_ENV, ADMIN_KEYS_FILE_ENV = "B1K_ADMIN_KEYS", "B1K_ADMIN_KEYS_FILE"  # the same, for /admin/*
# Measured (tests/serving_support.observation, byte-identical to the evaluator's): a 720/480 observation (three
# RGBA frames, 720x720 head and 480x480 wrists, plus proprio) is 3,918,407 bytes; a 224-px one 603,713.
FULL_RES_OBSERVATION_MIB = 3.74
MIN_KEY_CHARS = 16
READ_AHEAD_MESSAGES = 0  # websockets' max_queue: reading pauses while a received message waits for the handler


@dataclasses.dataclass(frozen=True)
class SecurityConfig:
    """Limits and credentials of one server. Defaults admit the evaluator with room to spare."""

    api_keys: tuple[str, ...] = ()  # empty: no authentication (the server then listens on 127.0.0.1 by default)
    admin_keys: tuple[str, ...] = ()  # empty: /admin/status and /admin/reload do not exist (404)
    max_message_mb: float = 16.0  # MiB; ~4x a full-resolution (720/480) observation
    max_connections: int = 64  # evaluator processes; each holds one connection for its whole run
    # A connection over max_connections waits this long for a slot (logged), then is closed with 1013. The stock
    # client treats that close as fatal, hence the generous bound: an evaluator run outlives most waits.
    connect_wait_s: float = 3600.0
    # 0 = off (the default): an evaluator is silent for 150-300 s while a scene loads, and its reset() does not
    # reconnect. When set, an idle connection is closed with 1013, which allow_reconnect retries on act().
    idle_timeout_s: float = 0.0
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE  # larger camera frames are a bad request
    decode_workers: int = 2  # threads that decode and resize small messages, off the event loop
    large_frame_share: float = 0.25  # of the wall time for frames above 4 MB while small ones are served
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if self.max_message_mb <= FULL_RES_OBSERVATION_MIB:
            raise ValueError(f"max_message_mb={self.max_message_mb} would reject the evaluator's full-resolution "
                             f"observations ({FULL_RES_OBSERVATION_MIB} MiB); use at least 4")
        if self.max_connections < 1 or self.decode_workers < 1:
            raise ValueError("max_connections and decode_workers must be >= 1")
        if self.idle_timeout_s < 0 or self.connect_wait_s < 0:
            raise ValueError(f"idle_timeout_s ({self.idle_timeout_s}) and connect_wait_s ({self.connect_wait_s}) "
                             f"must be >= 0 (idle_timeout_s 0 = off)")
        if self.max_image_side < MODEL_IMAGE_SIZE:
            raise ValueError(f"max_image_side={self.max_image_side} would reject the evaluator's {MODEL_IMAGE_SIZE}x"
                             f"{MODEL_IMAGE_SIZE} frames; use at least {MODEL_IMAGE_SIZE} (default "
                             f"{DEFAULT_MAX_IMAGE_SIDE}, sized for its 720x720 head camera)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key (PEM files)")
        for kind, keys in (("API", self.api_keys), ("admin", self.admin_keys)):
            for key in keys:
                problem = key_problem(key)
                if problem:
                    raise ValueError(f"{kind} keys must be {problem}")
        if set(self.api_keys) & set(self.admin_keys):
            raise ValueError("an admin key is also a client API key: admin keys must be separate (a client could "
                             "otherwise reload the server); generate one with `openssl rand -hex 32`")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server TLS context from the PEM files, or None for plain ws://."""
        if not self.tls_cert:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"cannot load the TLS certificate {self.tls_cert} / key {self.tls_key}: {e}") from e
        return ctx


def key_problem(key: str) -> str | None:
    """What is wrong with a key, without showing any of it (keys end up in error messages and logs otherwise)."""
    if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
        return (f"at least {MIN_KEY_CHARS} characters without whitespace (one has {len(key)} characters); generate "
                f"one with `openssl rand -hex 32`")
    return None


def _read_keys_file(path: str, source: str) -> list[str]:
    """Keys of a file, one per line ('#' comments); one-line ValueError naming the file (never a key)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read the {source} {path}: {e.strerror}; check the path (a mounted Secret?)") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"the {source} {path} is not UTF-8 text (byte {e.start}): one key per line") from e
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        problem = key_problem(line)
        if problem:
            raise ValueError(f"the {source} {path}, line {n}: a key must be {problem}")
        keys.append(line)
    if not keys:
        raise ValueError(f"the {source} {path} holds no key: one key per line")
    return keys


def _load_keys(env_var: str, file_env_var: str, file: str | None, environ: dict[str, str] | None,
               what: str) -> tuple[str, ...]:
    env = os.environ if environ is None else environ
    keys: list[str] = [k.strip() for k in env.get(env_var, "").split(",") if k.strip()]
    path = file or env.get(file_env_var)
    if path:
        keys += _read_keys_file(path, f"{what} file" + ("" if file else f" (${file_env_var})"))
    return tuple(dict.fromkeys(keys))


def load_api_keys(*, file: str | None = None, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """Accepted keys from `file` (or $B1K_API_KEYS_FILE; one per line, '#' comments) and $B1K_API_KEYS
    (comma-separated). Empty when neither is set."""
    return _load_keys(API_KEYS_ENV, API_KEYS_FILE_ENV, file, environ, "API keys")


def load_admin_keys(*, file: str | None = None, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """Admin keys, as load_api_keys but from $B1K_ADMIN_KEYS / $B1K_ADMIN_KEYS_FILE / `file`."""
    return _load_keys(ADMIN_KEYS_ENV, ADMIN_KEYS_FILE_ENV, file, environ, "admin keys")


def authorized(header: str | None, keys: tuple[str, ...]) -> bool:
    """Whether an `Authorization: Api-Key <key>` header carries one of `keys`. Every key is compared in constant
    time, and all of them always are, so the timing reveals neither a key nor which one matched."""
    if not keys:
        return True
    scheme, _, presented = (header or "").strip().partition(" ")
    candidate = presented.strip().encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(candidate, key.encode())
    return ok and scheme.lower() == "api-key"
