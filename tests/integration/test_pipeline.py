"""`b1k-train pipeline` end to end on real parts: local Ray, the moto S3 server, an MLflow tracking server.

One pipeline lives through the life a real one has: killed (SIGKILL of the whole process group) during its
fine-tunes, re-run to completion (finished stages skipped, the fine-tunes resumed from their checkpoints), re-run
again (no training at all), then promoted, and a worse challenger refused.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from checkpoints.export import MODEL_FILE, load_exported
from checkpoints.retention import committed_checkpoints
from tests.processes import kill_process_tree
from trainer.evaluate import evaluate_export
from trainer.registry import eval_tags, git_commit, register

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PREFIX = "itest-pipe"
MODELS = [f"{PREFIX}-pretrain", f"{PREFIX}-ckpt1", f"{PREFIX}-ckpt4"]
_RAY_NAMES = ("ray::", "raylet", "gcs_server", "pt_data_worker", "dashboard", "log_monitor")


def _pipeline_cmd(storage_url: str) -> list[str]:
    return [sys.executable, "-m", "trainer", "pipeline", "pi_behavior_debug_2stage", "--run-name", "p", "--storage",
            storage_url, "--set", "finetune.num_steps=12", "--set", f"model_prefix={PREFIX}"]


def _wait_for_ray_exit(before: set[int], timeout_s: float = 90.0) -> None:
    """Processes of a SIGKILLed cluster notice their dead raylet within seconds; wait until none is left."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in psutil.process_iter(["name"]) if p.pid not in before
                and (p.info["name"] or "").startswith(_RAY_NAMES)]
        if not left:
            return
        time.sleep(1.0)
    raise AssertionError(f"processes of the killed pipeline still run after {timeout_s} s: {left}")


def _run(cmd: list[str], env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_pipeline_killed_resumed_rerun_registered_and_promoted(s3_bucket, s3fs_client, mlflow_server, tmp_path,
                                                               monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # for models:/ URIs resolved in this process
    monkeypatch.setenv("B1K_MODEL_CACHE", str(tmp_path / "cache"))
    store = f"{s3_bucket}/pipes"
    root = f"{store}/p"
    env = dict(os.environ)
    client = MlflowClient(mlflow_server)

    # 1. Start it and kill everything (driver, local Ray cluster, workers) once a fine-tune has a checkpoint.
    before = {p.pid for p in psutil.process_iter()}
    log1 = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_pipeline_cmd(store), stdout=log1, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    committed: list[str] = []
    while time.monotonic() < deadline and proc.poll() is None and not committed:
        if s3fs_client.exists(f"{root}/ft-ckpt1"):
            committed = committed_checkpoints(f"{root}/ft-ckpt1")
        time.sleep(0.3)
    # Everything the pipeline started dies at once: the driver's process group, and the local Ray cluster, whose
    # raylet and workers run in their own sessions (killing the group alone lets a worker finish its fine-tune).
    kill_process_tree(proc)
    log1.close()
    first = (tmp_path / "first.log").read_text()
    assert committed, f"no fine-tune checkpoint appeared before the pipeline ended:\n{first[-3000:]}"
    assert not s3fs_client.exists(f"{root}/ft-ckpt1/export/state.json"), "killed too late: the fine-tune finished"
    _wait_for_ray_exit(before)

    # 2. Re-run: the pretrain is not redone, the fine-tunes resume from their last committed checkpoints.
    second = _run(_pipeline_cmd(store), env)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    out = second.stdout + second.stderr
    stages = "\n".join(line for line in second.stdout.splitlines() if line.startswith("=="))
    assert "== pretrain: done (exported at step 10); skipped" in out, stages
    # The stage line; that it really resumed is what the "starting at step" lines below prove.
    assert re.search(r"== fine-tune ckpt1: (resuming|training) 12 steps on tasks \[0, 1\]", out), stages
    resumed_at = [int(s) for s in re.findall(r"starting at step (\d+)", out)]
    assert max(resumed_at) >= int(committed[0].rsplit("_", 1)[1]) > 0, resumed_at
    for stage in ("ft-ckpt1", "ft-ckpt4"):
        assert json.loads(s3fs_client.cat(f"{root}/{stage}/export/state.json"))["global_step"] == 12

    # Mapping: the seed's format, every task exactly once, paths to complete exports.
    mapping = json.loads(s3fs_client.cat(f"{root}/task_checkpoint_mapping.json"))
    tasks = sorted(t for entry in mapping["checkpoints"].values() for t in entry["tasks"])
    assert tasks == [0, 1, 40]
    assert mapping["checkpoints"]["ckpt1"]["tasks"] == [0, 1] and mapping["checkpoints"]["ckpt4"]["tasks"] == [40]
    for entry in mapping["checkpoints"].values():
        assert s3fs_client.exists(f"{entry['path']}/state.json")
    assert mapping["checkpoints"]["ckpt1"]["model_uri"] == f"models:/{PREFIX}-ckpt1/1"

    # Evaluation: per task, per horizon step and action group, stage accuracy, the baseline; heat-map logged.
    ev = json.loads(s3fs_client.cat(f"{root}/eval/ckpt1.json"))
    assert sorted(ev["tasks"]) == ["0", "1"]
    for r in ev["tasks"].values():
        assert len(r["action_mse_per_step"]) == 30 and r["num_samples"] > 0
        assert sorted(r["action_mse_per_group"]) == ["arms", "base", "grippers", "torso"]
        assert 0.0 <= r["stage_acc"] <= 1.0 and r["baseline"]["action_mse"] > 0
    assert s3fs_client.cat(f"{root}/eval/heatmap.png")[:8] == b"\x89PNG\r\n\x1a\n"
    pipeline_run = client.search_runs([client.get_experiment_by_name("b1k-train").experiment_id],
                                      filter_string=f"tags.`b1k.pipeline_root` = '{root}'")[0]
    logged = {a.path for a in client.list_artifacts(pipeline_run.info.run_id, "eval")}
    assert {"eval/heatmap.png", "eval/table.json"} <= logged

    # Registry: one version per model, @challenger, tagged with tasks, recipe, data manifest and commit.
    for name, stage_tasks in zip(MODELS, ([0, 1, 40], [0, 1], [40])):
        versions = client.search_model_versions(f"name='{name}'")
        assert [v.version for v in versions] == ["1"], name
        mv = client.get_model_version_by_alias(name, "challenger")
        assert json.loads(mv.tags["b1k.tasks"]) == stage_tasks
        assert mv.tags["b1k.recipe"] == "pi_behavior_debug_2stage"
        assert mv.tags["b1k.data_manifest"] == f"{root}/data/shards"
        assert mv.tags["b1k.git_commit"] == git_commit() != ""
        assert float(mv.tags["b1k.eval.action_mse"]) > 0 and mv.source == f"runs:/{mv.run_id}/export"
        assert client.get_run(mv.run_id).data.metrics["eval/action_mse"] > 0
    num_runs = len(client.search_runs([client.get_experiment_by_name("b1k-train").experiment_id],
                                      filter_string=f"tags.`b1k.run_dir` LIKE '{root}/%'"))
    assert num_runs == 3

    # 3. Re-run once more: nothing trains, nothing new is registered.
    third = _run(_pipeline_cmd(store), env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "[train" not in third.stdout + third.stderr  # "[train <stage>]" lines of a pipeline
    for line in ("pretrain: done", "fine-tune ckpt1: done", "fine-tune ckpt4: done", "already evaluated"):
        assert line in third.stdout
    assert all(len(client.search_model_versions(f"name='{n}'")) == 1 for n in MODELS)

    # 4. Promotion: the first challenger becomes champion; a worse one is refused and nothing changes.
    first_promote = _run([sys.executable, "-m", "trainer", "promote", f"{PREFIX}-ckpt1"], env)
    assert first_promote.returncode == 0 and "promoted: no @champion yet" in first_promote.stdout
    bad_dir = tmp_path / "bad-export"
    s3fs_client.get(f"{root}/ft-ckpt1/export", str(bad_dir), recursive=True)
    weights = load_bytes(s3fs_client.cat(f"{root}/ft-ckpt1/export/{MODEL_FILE}"))
    broken = {k: (v * 30 if k.startswith("action_out_proj") else v) for k, v in weights.items()}
    save_file(broken, str(bad_dir / MODEL_FILE))
    view = f"{root}/data/views/eval-ckpt1"
    bad_eval = evaluate_export(str(bad_dir), view, tasks=[0, 1], batch_size=8)
    run = client.create_run(client.get_experiment_by_name("b1k-train").experiment_id, run_name="bad")
    client.log_artifacts(run.info.run_id, str(bad_dir), "export")
    bad, created = register(client, name=f"{PREFIX}-ckpt1", run_id=run.info.run_id, export_url=str(bad_dir),
                            has_run_artifact=True, tags={"b1k.tasks": "[0, 1]", **eval_tags(bad_eval)})
    assert created and str(bad.version) == "2"
    refused = _run([sys.executable, "-m", "trainer", "promote", f"{PREFIX}-ckpt1"], env)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "not promoted: challenger v2" in refused.stdout and "does not beat champion v1" in refused.stdout
    assert client.get_model_version_by_alias(f"{PREFIX}-ckpt1", "champion").version == "1"

    # models:/NAME@champion loads wherever an export path does: Python, and `b1k-train eval`.
    model, _, _, config = load_exported(f"models:/{PREFIX}-ckpt1@champion")
    assert config["global_step"] == 12
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    # At the CLI's default batch size (32; the pipeline evaluated at 8): the numbers are its registry tags.
    cli_eval = _run([sys.executable, "-m", "trainer", "eval", f"models:/{PREFIX}-ckpt1@champion", "--data", view,
                     "--out", str(tmp_path / "eval.json")], env)
    assert cli_eval.returncode == 0, cli_eval.stderr[-3000:]
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["overall"]["action_mse"] == pytest.approx(ev["overall"]["action_mse"], rel=1e-6)
    tags = client.get_model_version_by_alias(f"{PREFIX}-ckpt1", "champion").tags
    assert again["overall"]["action_mse"] == pytest.approx(float(tags["b1k.eval.action_mse"]), rel=1e-5)
    assert {t: r["action_mse"] for t, r in again["tasks"].items()} == pytest.approx(
        json.loads(tags["b1k.eval.per_task_mse"]), rel=1e-5)
