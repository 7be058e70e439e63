"""The shard manifest (the commit point of a conversion) and reading samples out of shard tars.

`manifest.json` is written last by the sharder. Readers only ever open shards it lists, so a shard left behind
by a killed conversion is never read. Layout:

    {"format": "b1k-train-shards", "version": 1,
     "settings": {"samples_per_shard", "image_format", "quality", "image_size", "action_horizon"},
     "source": {"url", "layout", "codebase_version", "fps"},
     "tasks": {"<task_index>": "<instruction>"},
     "num_samples", "num_episodes",
     "episodes": [{"episode_index", "task_index", "length", "shards": [names]}],
     "shards": [{"name", "num_samples", "bytes", "sha256", "episode_index", "first_frame"}],
     "skipped_episodes": [{"episode_index", "reason"}]}

A *view* (data_loaders/splits.py) is a manifest in another directory that lists a subset of a conversion's
shards and says where they live with "base_url"; readers open `<base_url>/<name>`, so a view costs no copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from typing import Any, Iterator

from fsspec import AbstractFileSystem

from data_loaders import storage

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "b1k-train-shards"
FORMAT_VERSION = 1


class ShardError(RuntimeError):
    """A shard listed in the manifest is missing, truncated or fails its checksum. Names the shard."""


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    bytes: int
    sha256: str
    episode_index: int
    first_frame: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest plus the URL of the directory holding it."""

    url: str
    raw: dict[str, Any]
    shards: tuple[ShardInfo, ...]

    @property
    def num_samples(self) -> int:
        return int(self.raw["num_samples"])

    @property
    def image_format(self) -> str:
        return str(self.raw["settings"]["image_format"])

    @property
    def tasks(self) -> dict[int, str]:
        return {int(k): v for k, v in self.raw["tasks"].items()}

    @property
    def base_url(self) -> str:
        """Directory holding the shard files: the manifest's own, or a view's "base_url"."""
        return str(self.raw.get("base_url") or self.url)

    def shard_url(self, name: str) -> str:
        return storage.join(self.base_url, name)


def manifest_to_bytes(raw: dict[str, Any]) -> bytes:
    """Canonical serialisation: identical content gives identical bytes."""
    return (json.dumps(raw, indent=1, sort_keys=True) + "\n").encode()


def load_manifest(url: str) -> Manifest:
    """Read `<url>/manifest.json`; raises FileNotFoundError/ValueError naming the problem and the fix."""
    fs, path = storage.resolve(url)
    mpath = storage.join(path, MANIFEST_NAME)
    try:
        raw = json.loads(storage.with_retries(lambda: fs.cat_file(mpath), what=f"reading {url}/{MANIFEST_NAME}"))
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} at {url}: the shards are missing or their conversion did not finish; "
            f"run (or re-run) `b1k-train data shard SRC {url}`") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}/{MANIFEST_NAME} is not valid JSON ({e}); re-run `b1k-train data shard`") from e
    if raw.get("format") != FORMAT_NAME or raw.get("version") != FORMAT_VERSION:
        raise ValueError(f"{url}/{MANIFEST_NAME}: unsupported manifest format {raw.get('format')!r} "
                         f"version {raw.get('version')!r} (this b1k-train reads {FORMAT_NAME} v{FORMAT_VERSION})")
    shards = tuple(ShardInfo(**{f.name: s[f.name] for f in dataclasses.fields(ShardInfo)}) for s in raw["shards"])
    if sum(s.num_samples for s in shards) != raw["num_samples"]:
        raise ValueError(f"{url}/{MANIFEST_NAME}: shard sample counts do not add up to num_samples")
    return Manifest(url=url.rstrip("/"), raw=raw, shards=shards)


def read_shard_bytes(manifest: Manifest, shard: ShardInfo, *, verify: bool = True) -> bytes:
    """Fetch a whole shard (one GET), verifying size and sha256 against the manifest."""
    url = manifest.shard_url(shard.name)
    fs, path = storage.resolve(url)
    try:
        data = storage.with_retries(lambda: fs.cat_file(path), what=f"reading shard {url}")
    except FileNotFoundError as e:
        raise ShardError(f"shard {url} is listed in the manifest but missing; re-run `b1k-train data shard`") from e
    if verify:
        if len(data) != shard.bytes:
            raise ShardError(f"shard {url} has {len(data)} bytes, manifest says {shard.bytes} (truncated?); "
                             f"re-run `b1k-train data shard` to rewrite it")
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            raise ShardError(f"shard {url} fails its sha256 checksum (corrupt); re-run `b1k-train data shard`")
    return data


def iter_tar_samples(data: bytes, *, where: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group the members of an in-memory webdataset tar by sample key, in tar order.

    Yields (key, {extension: bytes}). A truncated or malformed tar raises ShardError naming `where`.
    """
    key: str | None = None
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                k, _, ext = base.partition(".")
                if k != key:
                    if key is not None:
                        yield key, files
                    key, files = k, {}
                f = tf.extractfile(member)
                assert f is not None
                files[ext] = f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"{where}: unreadable tar ({type(e).__name__}: {e}); re-run `b1k-train data shard`") from e
    if key is not None:
        yield key, files


def write_tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """Serialise samples into a deterministic tar (fixed mtime/uid/names order) for webdataset readers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, files in samples:
            for ext in sorted(files):
                info = tarfile.TarInfo(name=f"{key}.{ext}")
                info.size = len(files[ext])
                info.mtime = 0
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(files[ext]))
    return buf.getvalue()


def read_manifest_fs(fs: AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """Raw manifest at `path`/manifest.json or None if absent (no validation; used by the sharder)."""
    mpath = storage.join(path, MANIFEST_NAME)
    if not fs.exists(mpath):
        return None
    return json.loads(fs.cat_file(mpath))
