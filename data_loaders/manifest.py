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

The shards are plain webdataset tars, written and read with the webdataset library's own TarWriter and tar
iterators (docs/data.md has the key and extension conventions). `webdataset_urls()` gives the shard URLs for
`webdataset.WebDataset`, `register_webdataset_s3()` lets it open s3:// ones, and `index_shards()` writes the
manifest for webdataset shards made by other tools, so they stream through this package too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from typing import IO, Any, Iterator

import webdataset as wds
from fsspec import AbstractFileSystem
from webdataset.gopen import gopen_schemes
from webdataset.tariterators import group_by_keys, tar_file_iterator

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

    Yields (key, {extension: bytes}). The split of a member name into key and extension is webdataset's own
    (key = everything before the first dot of the file name, directories included), so a tar means the same
    samples here as in `webdataset.WebDataset`. A truncated or malformed tar raises ShardError naming `where`.
    """
    members = ({**m, "__url__": where} for m in tar_file_iterator(io.BytesIO(data)))
    try:
        for sample in group_by_keys(members):
            key = sample.pop("__key__")
            sample.pop("__url__", None)
            yield key, sample
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ShardError(f"{where}: unreadable tar ({type(e).__name__}: {e}); re-run `b1k-train data shard`") from e


def write_tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """Serialise samples into a deterministic tar with webdataset's TarWriter.

    The members are the already-encoded bytes (encoder=False): the image codec settings are ours. A fixed mtime,
    owner and mode make identical samples give identical bytes, which the sharder's resume relies on; these
    bytes equal those of the tarfile code this replaced, so older conversions resume unchanged.
    """
    buf = io.BytesIO()
    with wds.TarWriter(buf, user="", group="", mode=0o644, mtime=0, encoder=False) as writer:
        for key, files in samples:
            writer.write({"__key__": key, **files})
    return buf.getvalue()


def webdataset_urls(manifest_url: str) -> list[str]:
    """The URLs of the shards a manifest lists, in manifest order, for `webdataset.WebDataset(urls)`.

    Local paths come back as file:// URLs; s3:// ones need register_webdataset_s3() first.
    """
    m = load_manifest(manifest_url)
    urls = [m.shard_url(s.name) for s in m.shards]
    return [u if "://" in u else f"file://{u}" for u in urls]


def _open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
    fs, path = storage.resolve(url)
    return fs.open(path, mode)


def register_webdataset_s3() -> None:
    """Teach webdataset's gopen to open s3:// URLs through fsspec, with our endpoint handling.

    webdataset 1.0.2 ships no s3 scheme. The handler honours AWS_ENDPOINT_URL like storage.resolve, and forked
    DataLoader workers inherit it. Idempotent.
    """
    gopen_schemes["s3"] = _open_s3


def read_manifest_fs(fs: AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """Raw manifest at `path`/manifest.json or None if absent (no validation; used by the sharder)."""
    mpath = storage.join(path, MANIFEST_NAME)
    if not fs.exists(mpath):
        return None
    return json.loads(fs.cat_file(mpath))


def index_shards(url: str, *, quality: int | None = None) -> dict[str, Any]:
    """Write `<url>/manifest.json` for webdataset shards made by other tools (e.g. webdataset's ShardWriter)
    that carry our fields (sample_format.py), and return it; the loader, stats, splits and FAST tools then read
    them like a conversion of `b1k-train data shard`.

    Every `*.tar` directly under `url` is read once (sha256, sample count, meta.json of each sample), in name
    order. Each shard must hold samples of one episode (the splits select shards by episode) and all shards one
    image format. The manifest is written last and atomically, so an interrupted run leaves none. Raises
    ShardError naming the shard and what is wrong.
    """
    from data_loaders.behavior_facts import ACTION_HORIZON, CAMERAS, TASK_INSTRUCTIONS
    from data_loaders.sample_format import IMAGE_FORMATS, SampleError, decode_image, decode_sample

    fs, root = storage.resolve(url)
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if p.endswith(".tar"))
    if not names:
        raise ShardError(f"no *.tar shards directly under {url}")
    ext_to_format = {e: f for f, e in IMAGE_FORMATS.items()}
    shards: list[dict[str, Any]] = []
    episodes: dict[int, dict[str, Any]] = {}
    image_format: str | None = None
    image_size = 0
    for name in names:
        where, path = storage.join(url, name), storage.join(root, name)
        data = storage.with_retries(lambda p=path: fs.cat_file(p), what=f"reading shard {where}")
        metas = []
        for key, files in iter_tar_samples(data, where=where):
            exts = {m.rsplit(".", 1)[-1] for m in files if m.split(".", 1)[0] in CAMERAS}
            fmt = ext_to_format.get(next(iter(exts))) if len(exts) == 1 else None
            if fmt is None or (image_format is not None and fmt != image_format):
                raise ShardError(f"{where}#{key}: camera images {sorted(exts)}; expected one of "
                                 f"{sorted(ext_to_format)} for all three cameras in every shard")
            if image_format is None:
                image_format = fmt
                image_size = int(decode_image(files[f"{CAMERAS[0]}.{IMAGE_FORMATS[fmt]}"]).shape[0])
            try:  # the checks the loader makes, minus image decoding: fail here, not hours into a run
                sample = decode_sample(files, image_format=fmt, where=f"{where}#{key}", decode_images=False)
            except SampleError as e:
                raise ShardError(f"{e} (fields: docs/data.md)") from e
            metas.append(sample["meta"])
        eps = {int(m["episode"]) for m in metas}
        if len(eps) != 1:
            raise ShardError(f"{where}: holds samples of episodes {sorted(eps)[:5]}; write one episode per shard "
                             f"(start a new shard at each episode boundary)")
        ep = eps.pop()
        shards.append({"name": name, "num_samples": len(metas), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest(), "episode_index": ep,
                       "first_frame": min(int(m["frame"]) for m in metas)})
        rec = episodes.setdefault(ep, {"episode_index": ep, "task_index": int(metas[0]["task"]), "length": 0,
                                       "shards": []})
        rec["length"] += len(metas)
        rec["shards"].append(name)
    tasks = sorted({rec["task_index"] for rec in episodes.values()})
    raw = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "settings": {"samples_per_shard": max(s["num_samples"] for s in shards), "image_format": image_format,
                     "quality": quality, "image_size": image_size, "action_horizon": ACTION_HORIZON},
        "source": {"url": url, "layout": "webdataset", "codebase_version": None, "fps": None},
        "tasks": {str(t): TASK_INSTRUCTIONS[t] if 0 <= t < len(TASK_INSTRUCTIONS) else "" for t in tasks},
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_episodes": len(episodes),
        "episodes": [episodes[e] for e in sorted(episodes)],
        "shards": shards,
        "skipped_episodes": [],
    }
    storage.write_bytes_atomic(fs, storage.join(root, MANIFEST_NAME), manifest_to_bytes(raw))
    return raw
