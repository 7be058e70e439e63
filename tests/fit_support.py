"""Shared pieces of the training integration tests: fixed data and initial weights, and the debug config."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from checkpoints.export import MODEL_FILE
from models.pi_behavior.config import tiny
from models.pi_behavior.model import PiBehavior
from trainer.data_prep import prepare_data
from trainer.overrides import apply_overrides
from trainer.recipes import get_recipe


def prepare(root) -> tuple:
    """(DataArtifacts, init export dir): synthetic dataset -> shards -> stats -> FAST, and seeded weights."""
    data = prepare_data(get_recipe("pi_behavior_debug"), str(root / "data-run"))
    torch.manual_seed(1234)
    init = root / "init"
    init.mkdir()
    save_file({k: v.contiguous() for k, v in PiBehavior(tiny()).state_dict().items()}, str(init / MODEL_FILE))
    return data, str(init)


def debug_config(prepared, *extra: str, steps: int = 120):
    data, init = prepared
    return apply_overrides(get_recipe("pi_behavior_debug"), [
        f"data.shards={data.shards}", f"init_from=export:{init}", f"num_steps={steps}", "save_every=50",
        "log_every=1", *extra])


def exported_weights(run_dir: str) -> dict[str, torch.Tensor]:
    return load_file(f"{run_dir}/export/{MODEL_FILE}")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]
