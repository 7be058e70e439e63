"""`b1k-train serve` with a bad $B1K_API_KEYS_FILE (or admin keys file): one line naming the path (it is not a
secret), never any key content, exit code 2, no traceback; and the admin keys must differ from the client keys."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serving.security import SecurityConfig, load_admin_keys, load_api_keys
from trainer.cli import main

KEY = "k3y-" + "5a" * 16
SECRETISH = "hunter2-but-longer"  # a plausible key with whitespace after it on the same line


def _serve_error(capsys, monkeypatch, env: dict[str, str], *args: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # --model is never read: the keys are loaded (and refused) before anything else happens.
    assert main(["serve", "--model", "/nonexistent/export", "--port", "0", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _keys_file(tmp_path, content: str | bytes | None):
    path = tmp_path / "keys"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    return path


PROBLEMS = [
    (None, "cannot read the API keys file{src} {path}: No such file or directory"),
    ("dir", "cannot read the API keys file{src} {path}: Is a directory"),
    ("# only a comment\n\n", "the API keys file{src} {path} holds no key: one key per line"),
    (b"\xff\xfe" + KEY.encode(), "the API keys file{src} {path} is not UTF-8 text (byte 0)"),
    (f"{KEY}\nshort-key\n", "the API keys file{src} {path}, line 2: a key must be at least 16 characters without "
                            "whitespace (one has 9 characters)"),
    (f"{SECRETISH} trailing words\n", "the API keys file{src} {path}, line 1: a key must be at least 16 characters "
                                      "without whitespace (one has 33 characters)"),
]


@pytest.mark.parametrize("content, expect", PROBLEMS)
def test_api_keys_file_problems_name_the_path_and_mask_the_keys(tmp_path, capsys, monkeypatch, content, expect):
    path = _keys_file(tmp_path, content)
    err = _serve_error(capsys, monkeypatch, {}, "--api-keys-file", str(path))
    assert expect.format(src="", path=path) in err, err
    assert KEY not in err and "short-key" not in err and SECRETISH not in err


@pytest.mark.parametrize("content, expect", PROBLEMS)
def test_api_keys_file_from_the_environment(tmp_path, content, expect):
    path = _keys_file(tmp_path, content)
    with pytest.raises(ValueError) as e:
        load_api_keys(environ={"B1K_API_KEYS_FILE": str(path)})
    assert expect.format(src=" ($B1K_API_KEYS_FILE)", path=path) in str(e.value)
    assert KEY not in str(e.value) and "short-key" not in str(e.value) and SECRETISH not in str(e.value)


@pytest.fixture(scope="module")
def cli_missing_keys_file(tmp_path_factory) -> tuple[str, subprocess.CompletedProcess]:
    """The real CLI (its own process: the redaction of stderr is installed once per process)."""
    path = str(tmp_path_factory.mktemp("keys") / "missing")
    env = {**os.environ, "B1K_API_KEYS_FILE": path}
    return path, subprocess.run([sys.executable, "-m", "trainer", "serve", "--model", "/nonexistent"], env=env,
                                capture_output=True, text=True, timeout=120)


def test_cli_with_a_missing_keys_file_from_the_environment_is_one_line(cli_missing_keys_file):
    path, done = cli_missing_keys_file
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: cannot read the API keys file ($B1K_API_KEYS_FILE) {path}: No such file or directory; check the "
        "path (a mounted Secret?)"]


def test_cli_names_the_keys_file_path_from_the_environment(cli_missing_keys_file):
    path, done = cli_missing_keys_file
    assert path in done.stderr


def test_admin_keys_file_problems_and_overlap_with_client_keys(tmp_path, capsys, monkeypatch):
    err = _serve_error(capsys, monkeypatch, {}, "--admin-keys-file", str(tmp_path / "missing"))
    assert f"cannot read the admin keys file {tmp_path / 'missing'}: No such file or directory" in err
    (tmp_path / "admin").write_text(KEY + "\n")
    err = _serve_error(capsys, monkeypatch, {"B1K_ADMIN_KEYS_FILE": str(tmp_path / "admin"), "B1K_API_KEYS": KEY})
    assert "an admin key is also a client API key: admin keys must be separate" in err and KEY not in err
    assert load_admin_keys(environ={"B1K_ADMIN_KEYS_FILE": str(tmp_path / "admin")}) == (KEY,)
    assert load_admin_keys(environ={"B1K_API_KEYS": KEY}) == ()  # client keys never become admin keys
    assert load_api_keys(environ={"B1K_ADMIN_KEYS": KEY}) == ()
    with pytest.raises(ValueError, match="admin keys must be at least 16 characters"):
        SecurityConfig(admin_keys=("short",))
