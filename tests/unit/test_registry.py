"""Registration and promotion rules on a real MLflow registry (SQLite store in a temp dir; no server needed)."""

import json

import pytest

from trainer.pipeline_config import PromotionConfig
from trainer.registry import CHALLENGER, CHAMPION, eval_tags, promote, register


def _result(per_task: dict[str, float], *, split="s1", norm="n1") -> dict:
    tasks = {t: {"num_samples": 10, "action_mse": v, "stage_acc": 0.5, "action_mse_per_group": {},
                 "baseline": {"action_mse": 1.0}} for t, v in per_task.items()}
    mean = sum(per_task.values()) / len(per_task)
    return {"tasks": tasks, "overall": {"action_mse": mean, "stage_acc": 0.5, "baseline": {"action_mse": 1.0}},
            "split": split, "view": "s3://b/p/data/views/eval-a", "norm_stats": norm}


@pytest.fixture
def client(tmp_path):
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    c.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    return c


def _new(client, per_task, **kw):
    run = client.create_run(client.get_experiment_by_name("e").experiment_id)
    mv, created = register(client, name="m", run_id=run.info.run_id, export_url="s3://b/x/export",
                           has_run_artifact=False,
                           tags={"b1k.tasks": json.dumps([0, 1]), **eval_tags(_result(per_task, **kw))})
    assert created
    return str(mv.version), run.info.run_id


def _alias(client, alias):
    return str(client.get_model_version_by_alias("m", alias).version)


def test_register_is_idempotent_per_training_run(client):
    v1, run_id = _new(client, {"0": 1.0, "1": 1.0})
    again, created = register(client, name="m", run_id=run_id, export_url="s3://b/x/export", has_run_artifact=False,
                              tags={})
    assert (str(again.version), created) == (v1, False)
    assert _alias(client, CHALLENGER) == v1
    assert client.get_model_version("m", v1).source == "s3://b/x/export"


def test_first_challenger_becomes_champion_then_worse_is_refused_and_better_promoted(client):
    v1, _ = _new(client, {"0": 1.0, "1": 2.0})
    d = promote(client, "m", PromotionConfig())
    assert d["promoted"] and "no @champion yet" in d["reason"] and _alias(client, CHAMPION) == v1
    assert promote(client, "m", PromotionConfig())["reason"].endswith("already is @champion")
    v2, _ = _new(client, {"0": 1.2, "1": 2.0})  # worse on average
    d = promote(client, "m", PromotionConfig())
    assert not d["promoted"] and "does not beat" in d["reason"] and _alias(client, CHAMPION) == v1
    assert d["challenger_mse"] == pytest.approx(1.6) and d["champion_mse"] == pytest.approx(1.5)
    v3, _ = _new(client, {"0": 0.9, "1": 1.9})
    d = promote(client, "m", PromotionConfig())
    assert d["promoted"] and _alias(client, CHAMPION) == v3 and v2 != v3
    assert client.get_model_version("m", v3).tags["b1k.previous_champion"] == v1


def test_min_improvement_and_per_task_policy(client):
    _new(client, {"0": 1.0, "1": 1.0})
    promote(client, "m", PromotionConfig())
    _new(client, {"0": 0.99, "1": 0.99})  # 1% better
    assert not promote(client, "m", PromotionConfig(min_improvement=0.02))["promoted"]
    v3, _ = _new(client, {"0": 0.5, "1": 1.2})  # much better on average, 20% worse on task 1
    d = promote(client, "m", PromotionConfig(policy="per_task", max_task_regression=0.05))
    assert not d["promoted"] and "tasks ['1']" in d["reason"]
    assert promote(client, "m", PromotionConfig(policy="mean_mse"))["promoted"] and _alias(client, CHAMPION) == v3


def test_champion_from_another_split_or_normalisation_is_re_evaluated(client):
    v1, _ = _new(client, {"0": 0.1, "1": 0.1}, split="old")
    promote(client, "m", PromotionConfig())
    v2, _ = _new(client, {"0": 0.5, "1": 0.5}, split="new")
    calls = []

    def evaluate(uri, view, tasks, units_of):
        calls.append((uri, view, tasks, units_of))
        return _result({"0": 0.7, "1": 0.8})  # on the new split, the old champion does worse

    d = promote(client, "m", PromotionConfig(), evaluate=evaluate)
    assert calls == [(f"models:/m/{v1}", "s3://b/p/data/views/eval-a", [0, 1], f"models:/m/{v2}")]
    assert d["promoted"] and "re-evaluated" in d["reason"] and _alias(client, CHAMPION) == v2
    _new(client, {"0": 0.4, "1": 0.4}, split="new", norm="other-units")
    with pytest.raises(ValueError, match="re-evaluation is needed"):
        promote(client, "m", PromotionConfig())


def test_promote_without_challenger_says_how_to_get_one(client):
    with pytest.raises(ValueError, match="no @challenger version; run `b1k-train pipeline`"):
        promote(client, "m", PromotionConfig())


def test_an_export_missing_from_its_run_is_uploaded_whole(client, tmp_path):
    """A stage killed after writing its export but before uploading it: the pipeline copies the export (files and
    sub-directories) into the run so the registered source is runs:/<id>/export."""
    from trainer.pipeline import _upload_export_to_run

    export = tmp_path / "ft" / "export"
    (export / "fast").mkdir(parents=True)
    (export / "state.json").write_text('{"global_step": 3}')
    (export / "fast" / "vocab.json").write_text("{}")
    run_id = client.create_run(client.get_experiment_by_name("e").experiment_id).info.run_id
    assert client.list_artifacts(run_id, "export") == []
    _upload_export_to_run(client, run_id, str(export))
    assert sorted(a.path for a in client.list_artifacts(run_id, "export")) == ["export/fast", "export/state.json"]
    assert [a.path for a in client.list_artifacts(run_id, "export/fast")] == ["export/fast/vocab.json"]
