"""A newcomer's mistakes are one line naming the problem and the fix (issue 17 point 9): a --model that does not
exist is refused before the port is bound, an unknown registered model lists the ones that exist, and messages
name CLI flags, never Python arguments."""

from __future__ import annotations

import logging

import pytest

from trainer.cli import main


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_serve_a_missing_model_fails_before_binding_the_port(tmp_path, monkeypatch, capsys, caplog):
    import serving.server

    monkeypatch.chdir(tmp_path)
    bound = []
    monkeypatch.setattr(serving.server.PolicyServer, "run", lambda self, *a: bound.append(self.port))
    with caplog.at_level(logging.INFO):
        assert main(["serve", "--model", "nope/export", "--port", "0"]) == 2
    err = _one_error_line(capsys)
    assert f"--model {tmp_path}/nope/export does not exist; pass an export directory" in err, err
    assert not bound and "listening" not in caplog.text and "cannot serve" not in caplog.text


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A SQLite registry holding pi-behavior-debug-ckpt1 v1 with @challenger, and an empty model."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('registry')}/mlflow.db"
    c = MlflowClient(uri)
    c.create_registered_model("pi-behavior-debug-ckpt1")
    c.create_model_version("pi-behavior-debug-ckpt1", source="/tmp/nowhere/export")
    c.set_registered_model_alias("pi-behavior-debug-ckpt1", "challenger", "1")
    c.create_registered_model("pi-behavior-debug-empty")
    return uri


@pytest.mark.parametrize("command", ["eval", "serve"])
@pytest.mark.parametrize("uri, expected", [
    ("models:/no-such@champion", "models:/no-such@champion: no registered model 'no-such' in sqlite:///"),
    ("models:/pi-behavior-debug-ckpt1@champion", "pi-behavior-debug-ckpt1 has no alias @champion (its aliases: "
                                                 "@challenger -> v1)"),
    ("models:/pi-behavior-debug-ckpt1/7", "pi-behavior-debug-ckpt1 has no version 7 (its versions: 1)"),
])
def test_an_unknown_registered_model_lists_what_exists(registry, monkeypatch, capsys, command, uri, expected):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    args = ["eval", uri, "--data", "/nonexistent"] if command == "eval" else ["serve", "--model", uri, "--port", "0"]
    assert main(args) == 2
    err = _one_error_line(capsys)
    assert expected in err, err
    if "no-such" in uri:
        assert err.endswith("registered: pi-behavior-debug-ckpt1, pi-behavior-debug-empty"), err


def test_promote_list_of_an_unknown_name_says_so_and_fails(registry, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    assert main(["promote", "no-such", "--list"]) == 2
    assert "no registered model 'no-such'" in _one_error_line(capsys)
    assert main(["promote", "pi-behavior-debug-empty", "--list"]) == 0
    assert capsys.readouterr().out.strip() == "pi-behavior-debug-empty: no versions registered yet"
    assert main(["promote", "pi-behavior-debug-ckpt1", "--list"]) == 0
    assert "aliases=challenger" in capsys.readouterr().out


def test_data_synth_onto_an_existing_directory_names_the_flag(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "keep.txt").write_text("x")
    assert main(["data", "synth", str(tmp_path / "ds"), "--tasks", "0", "--frames", "31"]) == 2
    err = _one_error_line(capsys)
    assert "already exists and is not empty; pass --overwrite to replace it" in err and "overwrite=" not in err
