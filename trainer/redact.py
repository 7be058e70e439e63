"""Keeps credentials out of everything b1k-train writes: log lines, printed output, MLflow params and tags,
config.json, checkpoints and exported artifacts.

Two kinds of secrets are recognised:
- values from a secret source: environment variables whose name says secret (AWS_SECRET_ACCESS_KEY,
  MLFLOW_TRACKING_TOKEN, B1K_API_KEYS, *_PASSWORD, ...) and keys handed to `REDACTOR.add` (the server's API keys);
- anything that looks like one: the password in a URL's userinfo, Authorization header values, AWS access key ids.
Both become "***" wherever text leaves the process through the hooks below.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from typing import Any

MASK = "***"
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|API_?KEYS?|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY|AUTH", re.I)
MIN_SECRET_CHARS = 6  # shorter values ("1", "true") would mask unrelated text
PATTERNS = [
    # user:password@ in any URL (s3://, http://, postgresql://...): keep the user, drop the password.
    (re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:)[^@\s/]+@"), rf"\1{MASK}@"),
    # Authorization headers as websockets/urllib3 debug logs print them, and bare scheme tokens.
    (re.compile(r"(?i)(authorization\s*[:=]\s*)[^\r\n]+"), rf"\1{MASK}"),
    (re.compile(r"(?i)\b(api-key|bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), rf"\1 {MASK}"),
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), MASK),
]


class Redactor:
    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()

    def add(self, *values: str | None) -> None:
        """Treat these exact values as secrets from now on."""
        with self._lock:
            self._values.update(v for v in values if v and len(v) >= MIN_SECRET_CHARS)

    def add_from_environ(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        for name, value in env.items():
            # B1K_API_KEYS_FILE and the like hold a path to the secret, not the secret: messages must name it.
            if SECRET_NAME.search(name) and not name.endswith("_FILE"):
                # Comma-separated lists (B1K_API_KEYS) are several secrets.
                self.add(value, *[v.strip() for v in value.split(",")] if "," in value else ())

    def __call__(self, text: str) -> str:
        """`text` with every known secret and secret-looking fragment masked."""
        if not text:
            return text
        with self._lock:
            values = sorted(self._values, key=len, reverse=True)  # longest first: a key containing another
        for value in values:
            if value in text:
                text = text.replace(value, MASK)
        for pattern, repl in PATTERNS:
            text = pattern.sub(repl, text)
        return text

    def obj(self, value: Any) -> Any:
        """A copy of a JSON-like value (dicts, lists, tuples, strings) with every string redacted."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, Mapping):
            return {k: self.obj(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.obj(v) for v in value)
        return value


REDACTOR = Redactor()


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (formatted with its args) and exception text before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = REDACTOR(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = REDACTOR(logging.Formatter().formatException(record.exc_info))
        return True


class RedactingStream(io.TextIOBase):
    """A text stream that redacts what is written before passing it on (print(), tracebacks, tqdm, Ray's
    forwarded worker output); everything else is the wrapped stream's."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, s: str) -> int:
        self._stream.write(REDACTOR(s))
        return len(s)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()


_FILTER = RedactingFilter()
_installed = False


def protect_logger(name: str) -> None:
    """Redact records created on logger `name` (filters on a logger see only its own records)."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


def install() -> None:
    """Learn the secrets of this process's environment, wrap stdout/stderr, and filter the root logger's and the
    chatty libraries' records. Idempotent; called by the CLI and by every training worker."""
    global _installed
    REDACTOR.add_from_environ()
    if _installed:
        return
    _installed = True
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
    root = logging.getLogger()
    for handler in root.handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    for name in ("", "websockets.server", "websockets.client", "urllib3.connectionpool", "botocore", "mlflow",
                 "ray", "trainer", "serving", "checkpoints", "data_loaders"):
        protect_logger(name)
