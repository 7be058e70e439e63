"""Shared fixtures: a real S3-compatible HTTP server on 127.0.0.1 (moto server mode) and temporary buckets.

Like s3fs's own suite, the server is started once per session on a random loopback port and reached through
s3fs/botocore via AWS_ENDPOINT_URL, so every process the tests start (DataLoader workers, converters) talks to it.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Iterator

import pytest

# Keep everything on loopback and offline before any library reads the environment.
os.environ.update({
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray nodes on 127.0.0.1 instead of the LAN address (Ray otherwise swaps loopback for a routable IP).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
})
for _k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
    os.environ.pop(_k, None)
# Until the S3 fixture starts its server, S3 clients point at a closed loopback port: a test (or a process it
# starts) that forgets the fixture fails fast here instead of reaching for AWS.
os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"

_LOOPBACK = ("127.", "localhost", "::1", "0.0.0.0")
_real_getaddrinfo = socket.getaddrinfo


def _loopback_only_getaddrinfo(host, *args, **kwargs):
    """The suite talks to 127.0.0.1 only; resolving any other host is a bug, caught before a packet leaves."""
    name = host.decode() if isinstance(host, bytes) else str(host)
    if host is not None and not name.startswith(_LOOPBACK) and name != socket.gethostname():
        raise OSError(f"test tried to resolve non-loopback host {name!r}; only 127.0.0.1 is allowed")
    return _real_getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _loopback_only_getaddrinfo


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1 (random port); AWS_ENDPOINT_URL points at it for the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        if old is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = old
        server.stop()


@pytest.fixture(scope="session")
def s3fs_client(s3_endpoint: str):
    """An s3fs filesystem bound to the test endpoint (no instance caching, so tests see fresh listings)."""
    import s3fs

    return s3fs.S3FileSystem(anon=False, skip_instance_cache=True, use_listings_cache=False)


@pytest.fixture
def s3_bucket(s3fs_client) -> Iterator[str]:
    """A fresh, empty bucket; yields its s3:// URL and deletes it afterwards."""
    name = f"b1k-test-{uuid.uuid4().hex[:12]}"
    s3fs_client.mkdir(name)
    try:
        yield f"s3://{name}"
    finally:
        try:
            s3fs_client.rm(name, recursive=True)
        except FileNotFoundError:
            pass
