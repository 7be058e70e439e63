"""The lint gate (ruff, configured in pyproject.toml) runs with the test suite, so CI enforces it."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_ruff_finds_nothing():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", ROOT],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_security_rules_are_on_and_catch_what_they_should(tmp_path):
    """The static security scan is part of the gate: ruff's S rules are selected, and they flag the classic
    mistakes in our code base's configuration (a snippet placed in a package directory is checked as ours)."""
    import tomllib

    cfg = tomllib.loads(open(os.path.join(ROOT, "pyproject.toml")).read())["tool"]["ruff"]["lint"]
    assert "S" in cfg["select"]
    bad = tmp_path / "trainer_snippet.py"
    bad.write_text("import pickle\nimport subprocess\n\n\ndef f(blob, cmd):\n    subprocess.run(cmd, shell=True)\n"
                   "    return pickle.loads(blob)\n")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "--config",
                          os.path.join(ROOT, "pyproject.toml"), str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and "S602" in out.stdout and "S301" in out.stdout, out.stdout + out.stderr
