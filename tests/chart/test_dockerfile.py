"""The Dockerfile installs exactly what pyproject.toml declares, in scripts/setup.sh's order, as a non-root user."""

from __future__ import annotations

import re
import shlex
import tomllib

from tests.chart.support import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def _pip_installs() -> list[list[str]]:
    """The package arguments of every `pip install` in RUN steps, in order."""
    out = []
    for op, args in _instructions():
        if op != "RUN":
            continue
        for cmd in args.split("&&"):
            argv = shlex.split(cmd)
            if argv[:2] == ["pip", "install"] or argv[1:4] == ["-m", "pip", "install"]:
                out.append([a for a in argv[argv.index("install") + 1:] if not a.startswith("-")])
    return out


def _pins() -> dict[str, str]:
    pins = {}
    for req in PYPROJECT["project"]["dependencies"] + PYPROJECT["build-system"]["requires"]:
        name = re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower()
        pins[name] = req.replace(" ", "")
    return pins


def test_pip_installs_only_pyproject_requirements_in_setup_order():
    installs = _pip_installs()
    pins = _pins()
    flat = [a for step in installs for a in step]
    assert flat[-1] == ".", f"the project itself (from pyproject.toml) must be installed last: {flat}"
    for arg in flat[:-1]:
        name = re.split(r"[<>=!~\[]", arg, maxsplit=1)[0].lower()
        if name == "wheel":  # build tool for the no-isolation DeepSpeed build, not a runtime dependency
            continue
        assert name in pins, f"Dockerfile installs {arg!r}, which pyproject.toml does not declare"
        assert arg.replace(" ", "") == pins[name], f"Dockerfile pins {arg!r} but pyproject.toml says {pins[name]!r}"
    order = [re.split(r"[<>=!~\[]", a, maxsplit=1)[0].lower() for a in flat]
    assert order.index("torch") < order.index("deepspeed") < len(order) - 1, order
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    for name in ("torch", "deepspeed"):
        assert f'"{pins[name]}"' in setup, f"scripts/setup.sh must install {pins[name]} like the Dockerfile"
    assert not re.search(r"requirements[^ ]*\.txt", DOCKERFILE), "no second dependency list"


def test_runtime_is_non_root_with_the_console_script_as_entrypoint():
    ops = _instructions()
    users = [args for op, args in ops if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    (entry,) = [args for op, args in ops if op == "ENTRYPOINT"]
    assert entry == '["b1k-train"]' and PYPROJECT["project"]["scripts"]["b1k-train"] == "trainer.cli:main"
    (health,) = [args for op, args in ops if op == "HEALTHCHECK"]
    assert "B1K_HEALTHCHECK_URL" in health
    base = next(args for op, args in ops if op == "FROM")
    assert re.match(r"python:3\.11", base) and PYPROJECT["project"]["requires-python"] == ">=3.11"


def test_every_package_is_copied_and_local_clutter_is_ignored():
    copied = {args.split()[0] for op, args in _instructions() if op == "COPY"}
    for package in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert package.rstrip("*") in copied, f"COPY {package.rstrip('*')} missing: the image would lack it"
    assert "helm/b1k-train" in copied and "B1K_CHART_DIR=/opt/b1k-train/helm/b1k-train" in DOCKERFILE
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tests"} <= ignored
