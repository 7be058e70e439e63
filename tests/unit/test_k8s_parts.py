"""Pure parts of trainer/k8s: stage overrides that rebuild the stage config, RayJob names, values files, the chart."""

from __future__ import annotations

import dataclasses

import pytest

from trainer.k8s.manifests import CHART_ENV, chart_dir, deep_merge, job_name, load_values, render_rayjob
from trainer.k8s.stages import override_text, stage_overrides
from trainer.overrides import apply_overrides
from trainer.recipes import get_pipeline, get_recipe


def test_stage_overrides_rebuild_the_exact_stage_config():
    train = get_pipeline("pi_behavior_debug_2stage").train
    stage = dataclasses.replace(
        train, num_steps=7, init_from="export:s3://b/p/pretrain/export",
        optim=dataclasses.replace(train.optim, peak_lr=3e-5, final_lr=3e-6, freeze_steps=0),
        data=dataclasses.replace(train.data, shards="s3://b/p/data/views/train-ckpt1", norm_stats="s3://b/n.json"))
    overrides = stage_overrides(stage)
    assert apply_overrides(get_recipe(stage.recipe), overrides) == stage
    assert "num_steps=7" in overrides and "optim.peak_lr=3e-05" in overrides
    assert not [o for o in overrides if o.startswith("strategy=")]  # unchanged fields are not repeated
    assert override_text((0, 1, 40)) == "[0,1,40]" and override_text(None) == "none"
    assert override_text(True) == "true"


def test_job_names_are_valid_rayjob_names_or_a_clear_error():
    assert job_name("kp", "ft-ckpt1") == "kp-ft-ckpt1"
    assert job_name("My_Run") == "my-run"
    with pytest.raises(ValueError, match="at most 44 lowercase letters"):
        job_name("x" * 45)
    with pytest.raises(ValueError, match="cannot name a RayJob"):
        job_name("1st")


def test_values_files_merge_in_order(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("training:\n  workers: {replicas: 4, gpusPerWorker: 8}\nstorage: {url: s3://x/runs}\n")
    b.write_text("training:\n  workers: {replicas: 2}\n")
    assert load_values(str(a), str(b)) == {"training": {"workers": {"replicas": 2, "gpusPerWorker": 8}},
                                           "storage": {"url": "s3://x/runs"}}
    assert deep_merge({"a": {"b": 1}}, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}
    with pytest.raises(FileNotFoundError, match="--values .*nope.yaml: no such file"):
        load_values(str(tmp_path / "nope.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="expected a YAML mapping"):
        load_values(str(tmp_path / "list.yaml"))


def test_rayjob_rendering_reports_bad_values_and_a_missing_chart(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="at '/training/workers/gpusPerWorker'"):
        render_rayjob({"training": {"workers": {"gpusPerWorker": -1}}}, name="x", command="fit",
                      recipe="pi_behavior_debug", run_name="x")
    body = render_rayjob({}, name="x", command="fit", recipe="pi_behavior_debug", run_name="x", train_workers="2:4",
                         extra_args=["--experiment=e"], namespace="ml")
    assert body["spec"]["entrypoint"].endswith("--workers 2:4 '--experiment=e'")
    monkeypatch.setenv(CHART_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"set {CHART_ENV} to the helm/b1k-train directory"):
        chart_dir()
