"""pyproject.toml's runtime dependencies against what the packages import (issue 23 point 3).

Every declared runtime dependency must be imported by a package module (any `import`, also inside functions),
or be on PLUGINS: a short, reviewed list of dependencies that are loaded by name through another library (or
only pin the version of another one's dependency), each with a check that this still holds. The other direction
is reported too: a third-party module that the packages import must come from a declared dependency, or be on
UNDECLARED with the reason it is not (yet).
Both lists fail the test when an entry is no longer needed, so they only ever shrink.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("trainer", "data_loaders", "models", "checkpoints", "serving")  # [tool.setuptools.packages.find]


# The checks read registries and sources instead of importing s3fs or mlflow (seconds each on 2 busy cores).
def _fsspec_loads_s3fs() -> bool:
    from fsspec.registry import known_implementations

    return known_implementations["s3"]["class"].split(".")[0] == "s3fs"


def _mlflow_s3_store_imports_boto3() -> bool:
    path = importlib.metadata.distribution("mlflow-skinny").locate_file("mlflow/store/artifact/s3_artifact_repo.py")
    return "import boto3" in pathlib.Path(path).read_text()


def _tensorstore_requires_ml_dtypes() -> bool:
    return any(_dist_name(r) == "ml-dtypes" for r in importlib.metadata.requires("tensorstore") or [])


# distribution -> (why no module imports it, a check that the named library does load it)
PLUGINS = {
    "s3fs": ("fsspec opens s3:// URLs (data_loaders/storage.py) through the s3fs plugin it finds by protocol name",
             _fsspec_loads_s3fs),
    "boto3": ("MLflow's S3 artifact store (the chart's tracking server proxies artifacts to S3) imports it",
              _mlflow_s3_store_imports_boto3),
    "ml-dtypes": ("a version pin on tensorstore's dependency (0.6+ needs numpy>=2)", _tensorstore_requires_ml_dtypes),
}

# top-level module -> why it is imported without being a declared runtime dependency. Reported, not fixed here:
# pyproject's dependency list belongs to the lead; these are gaps to close there.
UNDECLARED: dict[str, str] = {}


def _dist_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def declared() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return {_dist_name(r) for r in tomllib.load(f)["project"]["dependencies"]}


@functools.cache
def imported_modules() -> dict[str, set[str]]:
    """Top-level third-party module -> the package files importing it (parsed once: ~2 s on a quiet core)."""
    out: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES and top != "__future__":
                        out.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return out


@functools.cache
def _module_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # scans every installed distribution: once


def _distributions_of(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in _module_distributions().get(module, [])}


def test_every_declared_dependency_is_imported_or_a_reviewed_plugin():
    used = set().union(*(_distributions_of(m) for m in imported_modules()))
    unused = declared() - used
    assert unused <= set(PLUGINS), (
        f"declared in pyproject.toml but imported by no package module: {sorted(unused - set(PLUGINS))}; remove "
        f"them, or add them to PLUGINS with the library that loads them by name")
    stale = set(PLUGINS) - unused
    assert not stale, f"PLUGINS entries now imported directly (drop them from the list): {sorted(stale)}"
    for dist, (why, loaded) in PLUGINS.items():
        assert dist in declared(), f"{dist} is on PLUGINS but not declared"
        assert loaded(), f"{dist}: the check behind {why!r} no longer holds; is it still needed?"


def test_every_imported_third_party_module_is_declared_or_explained():
    mods = imported_modules()
    missing = {m: sorted(files) for m, files in mods.items() if not _distributions_of(m) & declared()}
    unexplained = {m: f for m, f in missing.items() if m not in UNDECLARED}
    assert not unexplained, f"imported but not a declared runtime dependency (add to pyproject.toml): {unexplained}"
    stale = set(UNDECLARED) - set(missing)
    assert not stale, f"UNDECLARED entries no longer needed (declared now, or no longer imported): {sorted(stale)}"
