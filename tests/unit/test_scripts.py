"""scripts/test.sh runs what it is given (issue 17 point 3) and scripts/setup.sh says what it is doing while pip
works (point 7). setup.sh runs against a stand-in python whose pip prints like pip and takes its time."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAKE_PYTHON = r"""#!/usr/bin/env bash
# A stand-in interpreter for scripts/setup.sh: venv creation, a slow pip, and the torch check.
case "$1 $2" in
  "--version "*) echo "Python 3.11.7" ;;
  "-m venv") mkdir -p "$3/bin" && cp "$0" "$3/bin/python" ;;
  "-m pip")
    pkg="${@: -1}"
    echo "Looking in indexes: https://pypi.example/simple"
    echo "Collecting $pkg"
    sleep 2.5
    echo "Collecting dependency-of-$pkg"
    echo "INFO: pip is looking at multiple versions of dependency-of-$pkg to determine which version is compatible"
    echo "Collecting $pkg"
    if [[ "$pkg" == *"$FAKE_PIP_FAIL"* && -n "$FAKE_PIP_FAIL" ]]; then
      echo "ERROR: No matching distribution found for $pkg"; exit 1
    fi
    echo "Installing collected packages: dependency-of-$pkg, $pkg"
    echo "Successfully installed $pkg" ;;
  "- "*) cat >/dev/null ;;
esac
"""


def _fake_checkout(tmp_path) -> tuple[str, dict[str, str]]:
    """A checkout holding only setup.sh, env.sh and a pyproject.toml, and an environment using the fake python."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    for name in ("setup.sh", "env.sh"):
        shutil.copy(os.path.join(ROOT, "scripts", name), root / "scripts" / name)
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    python = tmp_path / "python3.11"
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PYTHON": str(python), "B1K_SETUP_HEARTBEAT_S": "1", "TMPDIR": str(tmp_path)}
    return str(root), env


def test_setup_prints_each_step_with_elapsed_time_and_a_heartbeat(tmp_path):
    root, env = _fake_checkout(tmp_path)
    out = subprocess.run(["bash", f"{root}/scripts/setup.sh"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert all(re.match(r"^\[setup \d+m\d\ds\] ", line) for line in lines), out.stdout
    for what in ("torch==2.13.0", "deepspeed==0.19.8", "b1k-train[dev]"):
        step = [line for line in lines if what in line]
        assert "] installing " + what in step[0], out.stdout
        # while pip is silent: how long, how many packages so far and which one it is on
        assert any(re.search(r": \d+ s, 1 packages collected \(now: Collecting ", line) for line in step), step
        assert any(re.search(r": resolved in \d+ s; installing 2 packages", line) for line in step), step
        assert re.search(r": done in \d+ s$", step[-1]), step
        # pip's backtracking notes, once each
        assert sum("pip is looking at multiple versions of dependency-of-" in line for line in step) == 1, step
    assert lines[-1].endswith("] done") and os.path.exists(f"{root}/.venv/.b1k-installed")
    again = subprocess.run(["bash", f"{root}/scripts/setup.sh"], capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 0 and again.stdout == ""  # up to date: nothing to do, nothing said


def test_setup_shows_pips_log_when_an_install_fails(tmp_path):
    root, env = _fake_checkout(tmp_path)
    env["FAKE_PIP_FAIL"] = "deepspeed"
    out = subprocess.run(["bash", f"{root}/scripts/setup.sh"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "pip failed installing deepspeed==0.19.8" in out.stderr
    assert "ERROR: No matching distribution found for deepspeed==0.19.8" in out.stderr
    assert "b1k-train[dev]" not in out.stdout and not os.path.exists(f"{root}/.venv/.b1k-installed")


def _test_sh(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """scripts/test.sh in a checkout whose setup.sh does nothing and whose .venv python is this one (a unit test
    must not install anything), run from tmp_path/work."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "scripts", "test.sh"), root / "scripts" / "test.sh")
    shutil.copy(os.path.join(ROOT, "scripts", "env.sh"), root / "scripts" / "env.sh")
    (root / "scripts" / "setup.sh").write_text("exit 0\n")
    (root / ".venv" / "bin").mkdir(parents=True)
    python = root / ".venv" / "bin" / "python"
    python.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return subprocess.run(["bash", str(root / "scripts" / "test.sh"), *args], capture_output=True, text=True,
                          cwd=tmp_path / "work", timeout=300)


def test_test_sh_runs_only_the_tests_it_is_given(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "test_only_this.py").write_text("def test_one():\n    pass\n")
    # relative to where it is typed, as pytest reads it
    out = _test_sh(tmp_path, "test_only_this.py", "--collect-only", "-q", "-p", "no:cacheprovider")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert [line for line in out.stdout.splitlines() if "::" in line] == ["test_only_this.py::test_one"], \
        out.stdout[-2000:]


def test_test_sh_still_fails_when_nothing_is_collected(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "test_nothing.py").write_text("# no tests here\n")
    out = _test_sh(tmp_path, "test_nothing.py", "-q", "-p", "no:cacheprovider")
    assert out.returncode == 5, out.stdout[-2000:] + out.stderr[-2000:]
    assert "collected no tests (exit 5)" in out.stderr


def test_test_sh_without_arguments_runs_the_tests_directory(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "checkout" / "tests").mkdir(parents=True)
    (tmp_path / "checkout" / "tests" / "test_suite.py").write_text("def test_in_suite():\n    pass\n")
    out = _test_sh(tmp_path)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
