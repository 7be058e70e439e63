"""Paths a user types are absolute before anything reaches Ray (issue 17 point 1), and a file given as --storage
is one line about the file (point 9). The commands run in-process with Ray, training and evaluation replaced by
recorders: what is checked is what they would have been handed."""

from __future__ import annotations

import types

import pytest

from trainer.cli import main


@pytest.fixture
def fresh_dir(tmp_path, monkeypatch):
    """A new user's working directory (relative paths resolve against it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def test_fit_hands_ray_absolute_storage_data_and_init_paths(fresh_dir, monkeypatch):
    import trainer.launch as launch

    seen: dict = {}

    def prepare_data(cfg, run_dir):
        seen["cfg"], seen["data_run_dir"] = cfg, run_dir
        return types.SimpleNamespace(shards=cfg.data.shards)

    def supervise(attempt, *, run_dir_url, **_):
        seen["run_dir"] = run_dir_url
        return types.SimpleNamespace(checkpoint=None, metrics={})

    monkeypatch.setattr(launch, "prepare_data", prepare_data)
    monkeypatch.setattr(launch, "init_ray", lambda n: None)
    monkeypatch.setattr(launch, "_workers_use_gpu", lambda: False)
    monkeypatch.setattr(launch, "supervise", supervise)
    assert main(["fit", "pi_behavior_debug", "--run-name", "dbg", "--storage", "./runs", "--workers", "2",
                 "--set", "data.shards=shards", "--set", "data.norm_stats=./stats/norm_stats.json",
                 "--set", "init_from=export:./init", "--set", "data.fast_tokenizer=s3://b/fast"]) == 0
    cfg = seen["cfg"]
    assert seen["run_dir"] == seen["data_run_dir"] == f"{fresh_dir}/runs/dbg"
    assert cfg.data.shards == f"{fresh_dir}/shards"
    assert cfg.data.norm_stats == f"{fresh_dir}/stats/norm_stats.json"
    assert cfg.init_from == f"export:{fresh_dir}/init"
    assert cfg.data.fast_tokenizer == "s3://b/fast"  # URLs are left alone


def test_export_resolves_storage_checkpoint_and_out(fresh_dir, monkeypatch):
    import checkpoints.manager
    import trainer.launch as launch

    seen: dict = {}
    monkeypatch.setattr(checkpoints.manager, "read_train_state", lambda url: {"step": 3, "world_size": 1})
    monkeypatch.setattr(launch, "fit", lambda cfg, **kw: seen.update(kw))
    assert main(["export", "pi_behavior_debug", "--run-name", "dbg", "--storage", "runs",
                 "--checkpoint", "runs/dbg/checkpoint_000000003"]) == 0
    extra = seen["loop_extra"]
    assert seen["data_run_dir"] == f"{fresh_dir}/runs/dbg"
    assert extra["restore_from"] == f"{fresh_dir}/runs/dbg/checkpoint_000000003"
    assert extra["export_to"] == f"{fresh_dir}/runs/dbg/exports/step_000000003"


def test_pipeline_root_and_overrides_are_absolute(fresh_dir):
    from trainer.overrides import apply_overrides
    from trainer.pipeline import Pipeline
    from trainer.recipes import get_pipeline

    cfg = apply_overrides(get_pipeline("pi_behavior_debug_2stage"), ["train.data.shards=../data/shards"])
    pipe = Pipeline(cfg, run_name="p", storage_url="./pipes")
    assert pipe.root == f"{fresh_dir}/pipes/p"
    assert pipe.cfg.train.data.shards == f"{fresh_dir.parent}/data/shards"
    assert pipe.tracking_uri == f"sqlite:///{fresh_dir}/pipes/p/mlflow/mlflow.db"


def test_eval_and_data_commands_get_absolute_paths(fresh_dir, monkeypatch):
    import data_loaders.stats
    import trainer.evaluate

    seen: dict = {}

    def evaluate_export(model, data, **_):
        seen["eval"] = (model, data)
        raise ValueError("recorded")

    def compute_norm_stats(shards, *, out, **_):
        seen["stats"] = (shards, out)
        return out

    monkeypatch.setattr(trainer.evaluate, "evaluate_export", evaluate_export)
    monkeypatch.setattr(data_loaders.stats, "compute_norm_stats", compute_norm_stats)
    assert main(["eval", "runs/dbg/export", "--data", "./views/eval"]) == 2
    assert seen["eval"] == (f"{fresh_dir}/runs/dbg/export", f"{fresh_dir}/views/eval")
    assert main(["data", "stats", "shards", "--out", "~/stats.json"]) == 0
    assert seen["stats"][0] == f"{fresh_dir}/shards" and not seen["stats"][1].startswith("~")


@pytest.mark.parametrize("command", ["fit pi_behavior_debug", "pipeline pi_behavior_debug_2stage"])
@pytest.mark.parametrize("storage", ["afile", "afile/runs"])
def test_a_file_as_storage_is_one_line_about_the_file(fresh_dir, capsys, command, storage):
    (fresh_dir / "afile").write_text("not a directory")
    assert main([*command.split(), "--run-name", "x", "--storage", storage]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{fresh_dir}/afile is a file, not a directory; pass a directory" in err, err
    assert "credentials" not in err and "AWS" not in err and "Traceback" not in err
