"""The policy server's protection: optional API keys (the evaluator's `Authorization: Api-Key <key>` header), TLS,
and bounds on message size, connection count and idle connections that the BEHAVIOR evaluator never hits."""

from __future__ import annotations

import dataclasses
import hmac
import os
import ssl

API_KEYS_ENV = "B1K_API_KEYS"  # comma-separated accepted keys
API_KEYS_FILE_ENV = "B1K_API_KEYS_FILE"  # a file with one key per line (a mounted Kubernetes Secret)
FULL_RES_OBSERVATION_MB = 16  # three 720x720/480x480 RGBA frames plus proprio, msgpack-encoded
MIN_KEY_CHARS = 16


@dataclasses.dataclass(frozen=True)
class SecurityConfig:
    """Limits and credentials of one server. Defaults admit the evaluator with room to spare."""

    api_keys: tuple[str, ...] = ()  # empty: no authentication (the server then listens on 127.0.0.1 by default)
    max_message_mb: float = 64.0  # 4x a full-resolution observation
    max_connections: int = 64  # evaluator processes; each holds one connection for its whole run
    idle_timeout_s: float = 1800.0  # an evaluator between episodes (scene reset) stays well below this
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if self.max_message_mb <= FULL_RES_OBSERVATION_MB:
            raise ValueError(f"max_message_mb={self.max_message_mb} would reject the evaluator's full-resolution "
                             f"observations (~{FULL_RES_OBSERVATION_MB} MB); use more than {FULL_RES_OBSERVATION_MB}")
        if self.max_connections < 1 or self.idle_timeout_s <= 0:
            raise ValueError("max_connections must be >= 1 and idle_timeout_s > 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key (PEM files)")
        for key in self.api_keys:
            if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
                raise ValueError(f"API keys must be at least {MIN_KEY_CHARS} characters without whitespace (one was "
                                 f"{len(key)} characters); generate one with `openssl rand -hex 32`")

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


def load_api_keys(*, file: str | None = None, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """Accepted keys from `file` (or $B1K_API_KEYS_FILE; one per line, '#' comments) and $B1K_API_KEYS
    (comma-separated). Empty when neither is set."""
    env = os.environ if environ is None else environ
    keys: list[str] = [k.strip() for k in env.get(API_KEYS_ENV, "").split(",") if k.strip()]
    path = file or env.get(API_KEYS_FILE_ENV)
    if path:
        try:
            with open(path) as f:
                keys += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        except OSError as e:
            raise ValueError(f"cannot read the API keys file {path}: {e.strerror}") from e
        if not keys:
            raise ValueError(f"the API keys file {path} holds no key: one key per line")
    return tuple(dict.fromkeys(keys))


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
