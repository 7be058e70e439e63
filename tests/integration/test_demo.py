"""The README's main job (`b1k-train demo`): the two-stage pipeline on the embedded default, then promotion."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.integration.test_readme_fit import assert_readable_log

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_the_pipeline_registers_promotes_and_reports(tmp_path):
    cmd = [sys.executable, "-m", "trainer", "demo", "--workdir", str(tmp_path),
           "--set", "train.num_steps=4", "--set", "finetune.num_steps=2"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # embedded default: local SQLite
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    root = tmp_path / "runs" / "demo"
    # Models, aliases, the eval table and the mapping's location are printed.
    for model in ("pi-behavior-debug-ckpt1", "pi-behavior-debug-ckpt4"):
        assert re.search(rf"{model}\s+v1\s+aliases=challenger,champion", text), text[-3000:]
    assert re.search(r"pi-behavior-debug-pretrain\s+v1\s+aliases=challenger ", text)
    assert re.search(r"task\s+model\s+mse\s+mean_action_mse\s+mse_ratio\s+robot_base", text)
    assert "what the numbers mean: a tiny model trained 4 + 2 steps" in text
    assert f"task -> checkpoint mapping: {root}/task_checkpoint_mapping.json" in text
    mapping = json.loads((root / "task_checkpoint_mapping.json").read_text())
    assert sorted(t for c in mapping["checkpoints"].values() for t in c["tasks"]) == [0, 1, 40]
    assert (root / "eval" / "heatmap.png").stat().st_size > 1000
    assert f"export MLFLOW_TRACKING_URI=sqlite:///{root}/mlflow/mlflow.db" in text
    # Readable logs (issue 17 point 6): the two fine-tunes train at once; each one's lines carry its stage and
    # none is deduplicated away by Ray.
    log = out.stdout + out.stderr
    assert_readable_log(log)
    for stage, steps in (("pretrain", 4), ("ckpt1", 2), ("ckpt4", 2)):
        assert log.count(f"[train {stage}] step {steps}/{steps} ") == 1, stage
        assert log.count(f"[train {stage}] done in") == 1, stage
    # A second run reuses every finished stage and keeps the champions.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "pretrain: done" in again.stdout and "[train" not in again.stdout + again.stderr
    assert again.stdout.count("already is @champion") == 2
