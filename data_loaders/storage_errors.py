"""Storage failures no retry can fix (full, over quota, read-only, forbidden) and the temporary files of writers.

`storage_write_error(e, url)` gives the one line a user sees for such a failure, or None when the error may be
transient (a dropped connection, a timeout) and retrying makes sense. Writers that stage a file next to its
final name (`temp_name`) remove it when the write fails; a writer killed outright cannot, so the next run calls
`sweep_stale_temp_files`, which deletes only temp files whose writer is certainly gone.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import uuid
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

TMP_PREFIX = ".tmp-"
# Temp files of writers on other hosts (a shared filesystem) cannot be checked for liveness; a single atomic
# write never takes this long, so one older than this before our start is stale.
FOREIGN_TEMP_GRACE_S = 3600.0

_FIX_SPACE = "free space or raise the quota (or choose other storage), then re-run"
_REASONS = {
    errno.ENOSPC: ("no space left on the storage", _FIX_SPACE),
    errno.EDQUOT: ("the storage quota is exceeded", _FIX_SPACE),
    errno.EFBIG: ("the file is larger than the storage allows", _FIX_SPACE),
    errno.EROFS: ("the storage is read-only", "mount it read-write or choose writable storage"),
    errno.EACCES: ("permission denied", "grant this user write access or choose storage it can write to"),
    errno.EPERM: ("operation not permitted", "grant this user write access or choose storage it can write to"),
}
# Object stores report the same conditions as error codes inside the message (s3fs keeps them there).
_CODES = {
    "XMinioStorageFull": errno.ENOSPC, "QuotaExceeded": errno.EDQUOT, "XMinioAdminBucketQuotaExceeded": errno.EDQUOT,
    "AccessDenied": errno.EACCES, "AllAccessDisabled": errno.EACCES,
}


class StorageWriteError(OSError):
    """A write that failed for a reason no retry can fix; str() is the one-line message naming the URL."""


def _causes(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


# Rust libraries (safetensors, tokenizers) wrap an io::Error into their own exception types; its text carries
# the errno as "Os { code: 28, kind: StorageFull, ..." or "(os error 28)".
_RUST_ERRNO = re.compile(r"Os \{ code: (\d+),|\(os error (\d+)\)")


def _errno_of(e: BaseException) -> int | None:
    for err in _causes(e):
        if isinstance(err, OSError) and err.errno in _REASONS:
            return err.errno
        text = str(err)
        code = next((c for c in _CODES if c in text), None)
        if code is not None:
            return _CODES[code]
        m = _RUST_ERRNO.search(text)
        if m is not None and int(m.group(1) or m.group(2)) in _REASONS:
            return int(m.group(1) or m.group(2))
    return None


def storage_write_error(e: BaseException, url: str, *, what: str = "") -> str | None:
    """The one-line message for a write to `url` that failed with `e` because the storage is full, over quota,
    read-only or forbidden (looking through wrapped causes), or None if `e` may be transient.

    `what` names what could not be written when `url` does not already say it (e.g. "the run's failures.jsonl").
    """
    code = _errno_of(e)
    if code is None:
        return None
    reason, fix = _REASONS[code]
    target = f"{what} at {url}" if what else url
    return f"cannot write {target}: {reason} ({errno.errorcode[code]}); {fix}"


# --- temporary files ---------------------------------------------------------------------------------------

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # short and filename-safe
_TEMP = re.compile(r"^\.tmp-([0-9a-f]{8})-([0-9]+)-[0-9a-f]{32}-")


def temp_name(basename: str) -> str:
    """Name of a temp sibling of `basename`; it records this host and process so a sweep can tell if the writer
    still lives."""
    return f"{TMP_PREFIX}{_HOST}-{os.getpid()}-{uuid.uuid4().hex}-{basename}"


def _process_alive_since(pid: int, mtime: float) -> bool:
    """Whether process `pid` of this host exists and already existed at `mtime` (not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        import psutil
    except ImportError:
        return True  # cannot tell a reused pid: keep the file
    try:
        return psutil.Process(pid).create_time() <= mtime + 1.0
    except psutil.Error:
        return False


def _is_stale(name: str, mtime: float, started_at: float) -> bool:
    if mtime >= started_at:
        return False  # written since we started: possibly a live writer
    m = _TEMP.match(name)
    if m is None or m.group(1) != _HOST:
        return mtime < started_at - FOREIGN_TEMP_GRACE_S
    pid = int(m.group(2))
    if pid == os.getpid():
        return True  # an earlier, finished write of this process (we are single-threaded per output)
    return not _process_alive_since(pid, mtime)


def sweep_stale_temp_files(fs: AbstractFileSystem, path: str, *, started_at: float) -> list[str]:
    """Delete temp files directly under the local directory `path` left by writers that are gone: written
    before `started_at` (the sweeping run's start) by a dead process of this host, or, from another host,
    FOREIGN_TEMP_GRACE_S before it. Returns the deleted paths. Object stores have no temp files: a no-op there."""
    from data_loaders.storage import is_local

    if not is_local(fs):
        return []
    try:
        entries = list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIX) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if _is_stale(entry.name, entry.stat(follow_symlinks=False).st_mtime, started_at):
                os.unlink(entry.path)
                removed.append(entry.path)
        except FileNotFoundError:
            continue  # its writer renamed or removed it meanwhile
    return removed
