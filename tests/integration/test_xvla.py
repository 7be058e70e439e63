"""X-VLA BEHAVIOR variant end to end: `fit` on synthetic data (local Ray, 1 gloo worker), the export in the
seed's layout loaded with `XVLA.from_pretrained`, held-in evaluation against the mean-action baseline and the
skill classifier, then `b1k-train serve` of the export answering an evaluator-style client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_loaders.manifest import load_manifest
from data_loaders.stream import StreamConfig, StreamLoader
from data_loaders.xvla_transform import XVLASampleTransform
from models.modeling_xvla import XVLA
from models.xvla.tokenizer import load_tokenizer
from tests.evaluator_client import EvaluatorClient
from tests.integration.conftest import free_port
from tests.serving_support import first_action, observation
from trainer.launch import fit
from trainer.overrides import apply_overrides
from trainer.recipes import get_recipe

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = apply_overrides(get_recipe("xvla_debug"), [
        "num_steps=200", "save_every=100", "optim.peak_lr=1e-3", "optim.final_lr=1e-4", "optim.decay_steps=200",
        "data.synth_tasks=0,1", "data.synth_episodes_per_task=2", "data.synth_frames=90"])
    return fit(cfg, run_name="xvla", storage_url=str(tmp_path_factory.mktemp("xvla")), num_workers=1)


def test_fit_learns_actions_and_skills(trained):
    export = os.path.join(trained["run_dir"], "export")
    files = set(os.listdir(export))
    assert {"model.safetensors", "config.json", "state.json", "tokenizer.json", "norm_stats.json", "serving.json",
            "instructions.json"} <= files
    assert json.loads(open(os.path.join(export, "state.json")).read())["global_step"] == 200
    model = XVLA.from_pretrained(export)
    shards = os.path.join(trained["run_dir"], "data", "shards")
    # Task-only instructions, as the server sends them: the skill has to come from the classifier.
    transform = XVLASampleTransform(tokenizer=load_tokenizer(export), max_text_len=model.cfg.max_text_len,
                                    instructions=load_manifest(shards).tasks, enriched_fraction=0.0)
    batches = list(StreamLoader(shards, StreamConfig(batch_size=32, num_workers=0, train=False, num_epochs=1,
                                                     shards_per_group=2), transform=transform))
    actions = torch.cat([b["actions"] for b in batches])
    mean = actions.mean(0, keepdim=True)
    err = base = 0.0
    labels, preds = [], []
    for b in batches:
        pred, skill = model.generate_actions(images=b["images"], input_ids=b["input_ids"], task_id=b["task"],
                                             proprio=b["proprio"], generator=torch.Generator().manual_seed(0),
                                             return_skill=True)
        err += float(((pred - b["actions"]) ** 2).mean(dim=(1, 2)).sum())
        base += float(((mean - b["actions"]) ** 2).mean(dim=(1, 2)).sum())
        keep = b["skill"] >= 0
        labels += b["skill"][keep].tolist()
        preds += skill[keep].tolist()
    n = actions.shape[0]
    assert err / n < 0.85 * base / n, (err / n, base / n)  # sampled chunks beat the mean action clearly
    classes = sorted(set(labels))
    accuracy = float(np.mean(np.array(labels) == np.array(preds)))
    assert len(classes) >= 3 and accuracy > 1.0 / len(classes), (accuracy, classes)
    # In training (where half the instructions name the skill) the classifier beats the majority class.
    majority = max(labels.count(c) for c in classes) / len(labels)
    assert trained["metrics"]["skill_acc"] > majority, (trained["metrics"]["skill_acc"], majority)


def test_served_by_b1k_train_serve(trained):
    from serving.policy import ServingPolicy

    export = os.path.join(trained["run_dir"], "export")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "serve", "--model", export, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = EvaluatorClient("127.0.0.1", port)
        for _ in range(3):
            client.reset()
        first = client.act(observation(0))
        rest = [client.act(observation(1, seed=i)) for i in range(25)]  # a task switch, then a new chunk
        assert client.pending() is None
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert first.shape == (23,) and first.dtype == np.float32 and all(np.isfinite(a).all() for a in rest)
    np.testing.assert_allclose(first, first_action(ServingPolicy.load(export), observation(0)), atol=1e-5)
