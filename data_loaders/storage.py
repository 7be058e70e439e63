"""Uniform access to local paths, file:// and s3:// URLs through fsspec.

s3:// takes credentials from the standard AWS environment variables and a custom endpoint (MinIO, Ceph, a test
server) from AWS_ENDPOINT_URL, which botocore honours natively; nothing here is S3-vendor specific.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from typing import Any, Callable, TypeVar

import fsspec
from fsspec import AbstractFileSystem

T = TypeVar("T")


def resolve(url: str) -> tuple[AbstractFileSystem, str]:
    """Return (filesystem, path inside it) for a local path, file:// or s3:// URL."""
    if not url:
        raise ValueError("empty storage URL: pass a local path, file://... or s3://bucket/prefix")
    options = {}
    if url.startswith(("s3://", "s3a://")) and os.environ.get("AWS_ENDPOINT_URL"):
        # Bake the endpoint into the filesystem object: it is pickled to other processes (Ray's controller,
        # workers) whose environment may not carry AWS_ENDPOINT_URL, and must never fall back to AWS itself.
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def is_local(fs: AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def join(url: str, *parts: str) -> str:
    """Join URL parts with '/', keeping the scheme (works for s3://, file:// and local paths)."""
    out = url.rstrip("/")
    for p in parts:
        out = posixpath.join(out, p.strip("/"))
    return out


def write_bytes_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` so that `path` either does not exist or holds all of it.

    Local files go to a temporary sibling that is renamed into place; object stores publish an object only when
    its (single or multipart) upload completes, so a killed writer leaves nothing at `path`.
    """
    if is_local(fs):
        parent = posixpath.dirname(path)
        fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_bytes(fs: AbstractFileSystem, path: str) -> bytes:
    return fs.cat_file(path)


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = 4, base_delay_s: float = 0.5) -> T:
    """Run `fn`, retrying transient I/O errors with exponential backoff; FileNotFoundError is never retried."""
    for i in range(attempts):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except (OSError, TimeoutError) as e:
            if i == attempts - 1:
                raise OSError(f"{what}: failed after {attempts} attempts: {e}") from e
            time.sleep(base_delay_s * (2**i))
    raise AssertionError("unreachable")


def write_json_file(path: str, obj: Any) -> None:
    """Write `obj` as JSON with indent=4 (the dataset's own style) to a local path, creating parent dirs."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=4)


def write_jsonl_file(path: str, rows: list[dict[str, Any]]) -> None:
    """Write one compact JSON object per line to a local path, creating parent dirs."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
