"""trainer/redact.py: what counts as a secret, and every path text leaves through."""

from __future__ import annotations

import io
import logging

from trainer.redact import MASK, REDACTOR, RedactingFilter, RedactingStream, Redactor


def test_known_values_and_secret_looking_fragments_are_masked():
    r = Redactor()
    r.add_from_environ({"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI", "MLFLOW_TRACKING_TOKEN": "tok-123456",
                        "B1K_API_KEYS": "key-aaaaaaaa,key-bbbbbbbb", "HOME": "/home/b1k", "DEBUG": "true",
                        "SHORT_PASSWORD": "abc"})
    text = ("secret wJalrXUtnFEMI token tok-123456 keys key-aaaaaaaa key-bbbbbbbb home /home/b1k debug true abc "
            "uri http://b1k:hunter2pw@mlflow:5000/x db postgresql://u:p4ss@db/m id AKIAIOSFODNN7EXAMPLE "
            "header Authorization: Api-Key zzzzzzzzzzzz and Bearer qqqqqqqqqqqq")
    out = r(text)
    for secret in ("wJalrXUtnFEMI", "tok-123456", "key-aaaaaaaa", "key-bbbbbbbb", "hunter2pw", "p4ss",
                   "AKIAIOSFODNN7EXAMPLE", "zzzzzzzzzzzz", "qqqqqqqqqqqq"):
        assert secret not in out, (secret, out)
    # Not secrets: names that do not say so, short values, users and hosts of URLs.
    assert "home /home/b1k debug true abc" in out and f"http://b1k:{MASK}@mlflow:5000/x" in out
    assert r.obj({"a": ["tok-123456", 1, ("x", "http://u:pw12@h")]}) == {"a": [MASK, 1, ("x", f"http://u:{MASK}@h")]}


def test_log_records_and_streams_are_redacted():
    REDACTOR.add("planted-secret-value")
    buf = io.StringIO()
    stream = RedactingStream(buf)
    print("value planted-secret-value here", file=stream)
    assert buf.getvalue() == f"value {MASK} here\n"
    logger = logging.getLogger("test.redact")
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    try:
        logger.warning("connect to %s failed", "http://u:planted-secret-value@h")
        try:
            raise RuntimeError("bad token planted-secret-value")
        except RuntimeError:
            logger.exception("oops")
    finally:
        logger.removeHandler(handler)
    text = handler.stream.getvalue()
    assert "planted-secret-value" not in text and f"http://u:{MASK}@h" in text and "RuntimeError: bad token" in text
