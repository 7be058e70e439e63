"""Per-file integrity records of a checkpoint, and the check a restore runs before it loads anything.

Every rank, while uploading its part of a checkpoint, writes `integrity/rank_<r>.json`: the size and SHA-256
of each file it contributes. Ray commits the checkpoint (lists it in its snapshot) only once every rank's upload,
record included, has finished, so a committed checkpoint has a complete record. A restore checks, before any
engine reads a byte:

- that a record exists for every rank of the world size that saved it (train_state.json says which);
- that every recorded file exists with its size and checksum (a truncated or overwritten file is caught here);
- that every file parses with a pickle-free reader: safetensors headers, JSON, and torch files through torch's
  weights-only unpickler (with `mmap`, so no tensor data is read twice). A planted pickle is refused here even
  when whoever planted it also rewrote the record.

The work is split over the ranks (file i goes to rank i % world) and the verdict is agreed collectively, so
every rank skips the same checkpoint: a rank that failed alone would leave the others waiting in a collective.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from checkpoints.safe_load import UnsafeCheckpointError, deepspeed_classes_allowed, load_torch_state

RECORD_DIR = "integrity"


def record_name(rank: int) -> str:
    return f"{RECORD_DIR}/rank_{rank:05d}.json"


def _files_under(local_dir: str) -> list[str]:
    out = []
    for root, _, files in os.walk(local_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local_dir).replace(os.sep, "/")
            if not rel.startswith(RECORD_DIR + "/"):
                out.append(rel)
    return sorted(out)


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_record(local_dir: str, rank: int) -> dict[str, dict[str, Any]]:
    """Record size and checksum of every file this rank staged in `local_dir` (its part of one checkpoint)."""
    files = {rel: {"size": os.path.getsize(os.path.join(local_dir, rel)),
                   "sha256": sha256_of(os.path.join(local_dir, rel))} for rel in _files_under(local_dir)}
    path = os.path.join(local_dir, record_name(rank))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"rank": rank, "files": files}, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    return files


def read_records(local_dir: str, saved_world_size: int) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} over every rank's record; ValueError naming a missing or bad one."""
    merged: dict[str, dict[str, Any]] = {}
    for rank in range(saved_world_size):
        path = os.path.join(local_dir, record_name(rank))
        if not os.path.exists(path):
            raise ValueError(f"{record_name(rank)} is missing: the checkpoint has no integrity record for rank "
                             f"{rank} (written by an older b1k-train, or its upload never finished)")
        try:
            with open(path) as f:
                files = json.load(f)["files"]
            for rel, info in files.items():
                if not isinstance(rel, str) or ".." in rel.split("/") or rel.startswith("/"):
                    raise ValueError(f"bad path {rel!r}")
                merged[rel] = {"size": int(info["size"]), "sha256": str(info["sha256"])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{record_name(rank)} is unreadable ({type(e).__name__}: {e})") from None
    return merged


def parse_safely(path: str, rel: str | None = None) -> None:
    """Read `path` (`rel` inside its checkpoint) with the pickle-free reader its kind has; raise ValueError if it
    does not parse."""
    name = os.path.basename(path)
    rel = rel if rel is not None else name
    try:
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                list(f.keys())
        elif name.endswith(".json"):
            with open(path) as f:
                json.load(f)
        elif name.endswith(".pt"):
            if any(part.startswith("zero") for part in rel.split("/")[:-1]):  # DeepSpeed's files (zero/, ...):
                with deepspeed_classes_allowed():  # its few classes are allowed too
                    load_torch_state(path, mmap=True)
            else:
                load_torch_state(path, mmap=True)
        # Anything else (DeepSpeed's `latest` tag file, its zero_to_fp32.py helper) is never loaded by us.
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser failure means the same thing: the file is not usable
        raise ValueError(f"does not parse ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
            from None


def check_files(local_dir: str, records: dict[str, dict[str, Any]], *, rank: int, world_size: int) -> str | None:
    """Check this rank's share of the recorded files; the first problem as "<file>: <reason>", or None."""
    for i, rel in enumerate(sorted(records)):
        if i % world_size != rank:
            continue
        path, want = os.path.join(local_dir, rel), records[rel]
        if not os.path.isfile(path):
            return f"{rel}: missing"
        size = os.path.getsize(path)
        if size != want["size"]:
            return f"{rel}: {size} bytes, the record says {want['size']} (truncated or overwritten)"
        if sha256_of(path) != want["sha256"]:
            return f"{rel}: checksum differs from the record (corrupted or overwritten)"
        try:
            parse_safely(path, rel)
        except ValueError as e:
            return f"{rel}: {e}"
    return None


def verify(local_dir: str, saved_world_size: int, *, rank: int = 0, world_size: int = 1) -> str | None:
    """This rank's verdict on checkpoint directory `local_dir`: None when intact, else the first problem."""
    try:
        records = read_records(local_dir, saved_world_size)
    except ValueError as e:
        return str(e)
    return check_files(local_dir, records, rank=rank, world_size=world_size)
