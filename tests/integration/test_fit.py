"""`b1k-train fit` on a real local Ray cluster with 2 gloo workers: strategies learn and agree, stop/resume is
bitwise exact with storage on the S3 server, MLflow sees params/metrics on a real server, and bad input fails
with a clear message."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from checkpoints.export import MODEL_FILE, load_exported
from checkpoints.manager import read_train_state
from data_loaders.stream import StreamConfig, StreamLoader
from tests.fit_support import debug_config, prepare
from trainer.evaluate import action_mse_vs_mean_baseline
from trainer.launch import fit, latest_committed_checkpoint
from trainer.overrides import apply_overrides

pytestmark = [pytest.mark.slow, pytest.mark.integration]
STEPS = 120


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, s3_endpoint):
    """Shared data and a fixed initial model for every run. Depends on the S3 endpoint so AWS_ENDPOINT_URL is
    set before the (session-wide) local Ray cluster starts."""
    return prepare(tmp_path_factory.mktemp("fit"))


def config(prepared, *extra: str):
    return debug_config(prepared, *extra, steps=STEPS)


def first_step_loss(run_dir: str) -> float:
    from mlflow import MlflowClient

    state = read_train_state(latest_committed_checkpoint(run_dir))
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow/mlflow.db")
    return [m.value for m in client.get_metric_history(state["tracking_run_id"], "loss") if m.step == 1][0]


# Every strategy learns and agrees on the first loss in test_parallel (engine level, all four); ddp and zero2
# also go through fit in the tracking and fault tests. Here the full learning path (Ray, loader, export, held-out
# eval) once, on the strategy the GPU recipes use: more strategies would add a minute each to the suite.
@pytest.fixture(scope="module")
def learned(prepared, tmp_path_factory) -> dict:
    """The fsdp learning run (120 steps, 2 workers): its summary, shared by the learning and export tests."""
    storage = str(tmp_path_factory.mktemp("learn"))
    return fit(config(prepared, "strategy=fsdp"), run_name="learn-fsdp", storage_url=storage, num_workers=2)


def test_fit_learns_beats_the_mean_baseline_and_exports(prepared, learned):
    data, _ = prepared
    run_dir = learned["run_dir"]
    model, norm, _, exported = load_exported(f"{run_dir}/export")
    assert exported["train"]["strategy"] == "fsdp"
    batches = list(StreamLoader(data.shards, StreamConfig(batch_size=32, num_workers=0, train=False, num_epochs=1,
                                                          shards_per_group=2), norm_stats=norm))
    result = action_mse_vs_mean_baseline(model, batches)
    assert result["action_mse"] < result["baseline_mse"], result
    assert 0 < first_step_loss(run_dir) < 50  # tracked from step 1 on


# Bitwise resume of every strategy's engine state is tested in test_parallel; this adds the whole fit path (Ray,
# loader position and RNG, S3 checkpoints) for the sharded strategy GPU runs use.
@pytest.mark.parametrize("strategy", ["fsdp"])
def test_stop_and_resume_is_bitwise_identical_with_s3_storage(prepared, s3_bucket, strategy):
    straight = fit(config(prepared, f"strategy={strategy}", "num_steps=6", "save_every=3"),
                   run_name=f"straight-{strategy}", storage_url=s3_bucket, num_workers=2)
    fit(config(prepared, f"strategy={strategy}", "num_steps=3", "save_every=3"),
        run_name=f"resumed-{strategy}", storage_url=s3_bucket, num_workers=2)
    resumed = fit(config(prepared, f"strategy={strategy}", "num_steps=6", "save_every=3"),
                  run_name=f"resumed-{strategy}", storage_url=s3_bucket, num_workers=2)
    a = load_exported(f"{straight['run_dir']}/export")[0].state_dict()
    b = load_exported(f"{resumed['run_dir']}/export")[0].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert read_train_state(resumed["checkpoint"])["step"] == 6


def test_mlflow_server_sees_params_and_a_resumed_run_appends(prepared, tmp_path, mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = config(prepared, "strategy=ddp", "num_steps=4", "save_every=2", "log_every=2", "keep_period=4",
                 "keep_last=1")
    first = fit(cfg, run_name="tracked", storage_url=str(tmp_path), num_workers=2)
    run_id = read_train_state(first["checkpoint"])["tracking_run_id"]
    second = fit(apply_overrides(cfg, ["num_steps=6"]), run_name="tracked", storage_url=str(tmp_path),
                 num_workers=2)
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.data.params["strategy"] == "ddp" and run.data.params["optim.peak_lr"] == "0.003"
    steps = sorted({m.step for m in client.get_metric_history(run_id, "loss")})
    assert steps == [2, 4, 6]
    for key in ("action_loss", "grad_norm", "samples_per_s", "mfu", "time/data_wait_s"):
        assert client.get_metric_history(run_id, key), key
    # The final export travels with the run: the same bytes as the export in the run directory.
    exported = {a.path for a in client.list_artifacts(run_id, "export")}
    assert {"export/model.safetensors", "export/config.json", "export/norm_stats.json", "export/state.json",
            "export/fast_tokenizer"} <= exported
    local = client.download_artifacts(run_id, "export/state.json", str(tmp_path / "dl"))
    # The export names its step and the run it came from (the registry uses that run id as the model's source).
    assert json.load(open(local)) == {"global_step": 6, "mlflow_run_id": run_id}
    # Retention: keep_last=1 committed checkpoint, plus every keep_period multiple copied to kept/.
    run_dir = second["run_dir"]
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_0")) == ["checkpoint_000000006"]
    assert os.listdir(os.path.join(run_dir, "kept")) == ["step_000000004"]
    assert read_train_state(os.path.join(run_dir, "kept", "step_000000004"))["step"] == 4


def test_storage_without_permission_is_a_clear_error(prepared, s3_endpoint):
    with pytest.raises(PermissionError, match="cannot write to --storage"):
        fit(config(prepared), run_name="x", storage_url="s3://no-such-bucket-b1k/runs", num_workers=1)


def test_export_command_rebuilds_the_same_artifact(prepared, learned, tmp_path):
    from trainer.launch import export

    summary = learned  # the learning run's final checkpoint (no second fit: a minute of suite time)
    storage = os.path.dirname(summary["run_dir"])
    out = export(config(prepared, "strategy=fsdp"), run_name="learn-fsdp", storage_url=storage,
                 out=str(tmp_path / "again"))
    a, b = load_file(os.path.join(summary["run_dir"], "export", MODEL_FILE)), load_file(os.path.join(out, MODEL_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
