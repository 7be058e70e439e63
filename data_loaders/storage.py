"""Uniform access to local paths, file:// and s3:// URLs through fsspec.

s3:// takes credentials from the standard AWS environment variables and a custom endpoint (MinIO, Ceph, a test
server) from AWS_ENDPOINT_URL, which botocore honours natively; nothing here is S3-vendor specific.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import time
from typing import Any, Callable, Iterator, TypeVar

import fsspec
from fsspec import AbstractFileSystem

# Re-exported: callers handle storage failures through this module.
from data_loaders.storage_errors import (  # noqa: F401
    StorageWriteError,
    storage_write_error,
    sweep_stale_temp_files,
    temp_name,
)

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

    Local files go to a temporary sibling that is renamed into place (and removed if the write fails); object
    stores publish an object only when its (single or multipart) upload completes, so a killed writer leaves
    nothing at `path`. A full, read-only or forbidden storage raises StorageWriteError (see storage_errors.py).
    """
    with write_errors(fs, path):
        if is_local(fs):
            _replace_via_temp(path, lambda f: f.write(data))
        else:
            fs.pipe_file(path, data)


def put_file_atomic(fs: AbstractFileSystem, local_src: str, path: str) -> None:
    """Copy the local file `local_src` to `path` with the guarantees of write_bytes_atomic (no partial file)."""
    with write_errors(fs, path):
        if is_local(fs):
            with open(local_src, "rb") as src:
                _replace_via_temp(path, lambda f: shutil.copyfileobj(src, f, 16 * 2**20))
        else:
            fs.put_file(local_src, path)


def _replace_via_temp(path: str, write: Callable[[Any], Any]) -> None:
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, temp_name(os.path.basename(path)))
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # a half-written temp file would only fill the disk further
        raise


@contextlib.contextmanager
def write_errors(fs: AbstractFileSystem, path: str) -> Iterator[None]:
    """Inside, an OSError no retry can fix (full, read-only, forbidden) becomes StorageWriteError naming the URL
    of `path`; others pass unchanged."""
    try:
        yield
    except StorageWriteError:
        raise
    except OSError as e:
        message = storage_write_error(e, fs.unstrip_protocol(path) if not is_local(fs) else path)
        if message is None:
            raise
        raise StorageWriteError(message) from e


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
            if isinstance(e, OSError) and storage_write_error(e, "") is not None:
                raise  # full, read-only or forbidden: retrying only repeats the failure
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
