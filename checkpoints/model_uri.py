"""`models:/NAME@alias` and `models:/NAME/VERSION` wherever an export path is accepted.

A registry URI resolves, through the MLflow tracking server in $MLFLOW_TRACKING_URI, to a model version; its
files are downloaded once into a local cache keyed by name and version (versions are immutable, aliases are not,
so the alias is looked up every time and the version's files reused). Paths, file:// and s3:// URLs pass through,
except checkpoints in the openpi/1st-place layout (`<dir>/params/_METADATA`, optionally written `openpi:<dir>`):
those are imported once into `<cache>/openpi/<fingerprint>` (models/pi_behavior/openpi_import.py) and the
cached export is returned.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile

log = logging.getLogger(__name__)

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")
STATE_FILE = "state.json"  # checkpoints.export writes it last: present = complete
OPENPI_PREFIX = "openpi:"


def _is_openpi(url: str) -> bool:
    """An openpi/orbax checkpoint directory (and not a complete b1k-train export)."""
    from models.pi_behavior.openpi_import import is_openpi_checkpoint

    return is_openpi_checkpoint(os.path.expanduser(url))


@dataclasses.dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    alias: str | None
    source: str


def is_model_uri(url: str) -> bool:
    return url.startswith("models:/")


def cache_root() -> str:
    return os.environ.get("B1K_MODEL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "b1k-train", "models"))


def lookup(uri: str, *, tracking_uri: str | None = None) -> ModelRef:
    """The model version a registry URI names; raises ValueError/FileNotFoundError naming the problem and the fix."""
    m = _URI.match(uri)
    if not m:
        raise ValueError(f"{uri!r} is not a registry URI; use models:/NAME@ALIAS or models:/NAME/VERSION")
    uri_tracking = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri_tracking:
        raise ValueError(f"{uri} needs the MLflow registry: set MLFLOW_TRACKING_URI (e.g. http://mlflow:5000, or the "
                         f"sqlite:/// URI the pipeline printed)")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri_tracking)
    name, alias, version = m["name"], m["alias"], m["version"]
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as e:
        raise FileNotFoundError(f"{uri}: no such model version in the registry at {uri_tracking} ({e.message}); "
                                f"list them with `b1k-train promote {name} --list`") from e
    return ModelRef(name=name, version=str(mv.version), alias=alias, source=mv.source)


def resolve_model_url(url: str, *, tracking_uri: str | None = None) -> str:
    """A URL `load_exported` can read: registry URIs become a local cached copy of the version's files, openpi
    checkpoints a cached import."""
    if url.startswith(OPENPI_PREFIX) or (not is_model_uri(url) and _is_openpi(url)):
        from models.pi_behavior.openpi_import import cached_import

        return cached_import(os.path.expanduser(url.removeprefix(OPENPI_PREFIX)), cache_root())
    if not is_model_uri(url):
        return url
    ref = lookup(url, tracking_uri=tracking_uri)
    target = os.path.join(cache_root(), ref.name, ref.version)
    if os.path.exists(os.path.join(target, STATE_FILE)):
        return target
    import mlflow.artifacts

    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{ref.version}-", dir=os.path.dirname(target))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{ref.name}/{ref.version}", dst_path=staging,
                                            tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        if not os.path.exists(os.path.join(staging, STATE_FILE)):
            raise FileNotFoundError(f"{url} (version {ref.version}, source {ref.source}) is not a complete b1k-train "
                                    f"export: it has no {STATE_FILE}")
        try:
            os.rename(staging, target)  # atomic: a concurrent resolver either wins or finds the finished copy
        except OSError:
            if not os.path.exists(os.path.join(target, STATE_FILE)):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("resolved %s to version %s (%s), cached at %s", url, ref.version, ref.source, target)
    return target
