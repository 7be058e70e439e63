"""A serving export from storage someone else can write: every one of its files in turn is replaced by a pickle
that would create a marker file when unpickled. Loading it for evaluation or serving never runs it: each load
fails with one line naming the replaced file (exports are safetensors and JSON only)."""

from __future__ import annotations

import os
import shutil

import pytest

from checkpoints.export import load_exported
from serving.policy import ServingPolicy
from tests.hostile_files import plant_pickle
from tests.serving_support import make_artifacts

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> str:
    return make_artifacts(tmp_path_factory.mktemp("hostile-export"))["a"]


def test_a_pickle_planted_in_any_export_file_never_runs(export_dir, tmp_path):
    marker = tmp_path / "MARKER"
    files = sorted(os.path.relpath(os.path.join(d, n), export_dir) for d, _, ns in os.walk(export_dir) for n in ns)
    assert {"model.safetensors", "config.json", "norm_stats.json", "state.json"} <= set(files), files
    for rel in files:
        victim = tmp_path / rel.replace("/", "_")
        shutil.copytree(export_dir, victim)
        plant_pickle(str(victim / rel), str(marker))
        # Offline evaluation needs no serving settings; the policy server reads every file.
        loaders = (ServingPolicy.load,) if rel == "serving.json" else (load_exported, ServingPolicy.load)
        for load in loaders:
            with pytest.raises(Exception) as info:  # noqa: PT011 - what matters is the message and the marker
                load(str(victim))
            message = str(info.value)
            assert "\n" not in message.strip() and os.path.basename(rel) in message, (rel, load.__name__, message)
            assert not marker.exists(), (rel, load.__name__)
        shutil.rmtree(victim)
