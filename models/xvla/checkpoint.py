"""X-VLA checkpoint directories in the seed's layout (xvla.md §4.1):

    model.safetensors   weights (our module names; vendored X-VLA-Pt files are read by models/xvla/weights.py)
    config.json         model_type "xvla", the X-VLA fields (action_mode "auto", real/max_action_dim, hidden_size,
                        depth, ...), num_tasks, num_skills, florence_config, and "b1k": the full XVLAConfig
    optimizer.pt        optimizer state (optional; for resuming)
    state.json          {"global_step": N}, written last: present = complete
    tokenizer files     the BART tokenizer (tokenizer.json, tokenizer_config.json, ...)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.xvla.config import FlorenceTextConfig, FlorenceVisionConfig, XVLAConfig

MODEL_FILE, CONFIG_FILE, STATE_FILE, OPTIMIZER_FILE = "model.safetensors", "config.json", "state.json", "optimizer.pt"


def config_to_json(cfg: XVLAConfig) -> dict[str, Any]:
    """config.json: the X-VLA field names readers of X-VLA checkpoints expect, plus our full config."""
    return {
        "model_type": "xvla", "architectures": ["XVLA"], "action_mode": "auto",
        "real_action_dim": cfg.real_action_dim, "max_action_dim": cfg.max_action_dim, "num_actions": cfg.num_actions,
        "use_proprio": True, "hidden_size": cfg.hidden_size, "depth": cfg.depth, "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio, "num_domains": cfg.num_domains, "len_soft_prompts": cfg.len_soft_prompts,
        "dim_time": cfg.dim_time, "max_len_seq": cfg.max_len_seq, "use_hetero_proj": False,
        "num_tasks": cfg.num_tasks, "num_skills": cfg.num_skills,
        "florence_config": cfg.florence2_config().to_dict(),
        "b1k": dataclasses.asdict(cfg),
    }


def config_from_json(doc: dict[str, Any], *, where: str = CONFIG_FILE) -> XVLAConfig:
    """Our config from a config.json we wrote (the "b1k" block); ValueError naming the problem otherwise."""
    if doc.get("model_type") != "xvla":
        raise ValueError(f"{where}: model_type is {doc.get('model_type')!r}, not 'xvla'")
    b1k = doc.get("b1k")
    if b1k is None:
        raise ValueError(f"{where} is a published X-VLA config (no 'b1k' block): load it with "
                         f"models.xvla.weights.load_xvla_pretrained, which converts it")
    fields = dict(b1k)
    fields["vision"] = FlorenceVisionConfig(**{k: tuple(v) if isinstance(v, list) else v
                                               for k, v in fields["vision"].items()})
    fields["text"] = FlorenceTextConfig(**fields["text"])
    try:
        return XVLAConfig(**fields)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from e


def save_checkpoint(model: torch.nn.Module, out_dir: str, *, tokenizer: Any | None = None,
                    optimizer_state: dict[str, Any] | None = None, global_step: int = 0) -> str:
    """Write the directory; state.json goes last, so a reader that sees it sees a complete checkpoint."""
    os.makedirs(out_dir, exist_ok=True)
    state_path = os.path.join(out_dir, STATE_FILE)
    if os.path.exists(state_path):
        os.remove(state_path)  # overwriting: the directory is incomplete until the new state.json lands
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(out_dir, MODEL_FILE))
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config_to_json(model.cfg), f, indent=2, sort_keys=True)
    if optimizer_state is not None:
        torch.save(optimizer_state, os.path.join(out_dir, OPTIMIZER_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    tmp = state_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"global_step": int(global_step)}, f)
    os.replace(tmp, state_path)
    return out_dir


def load_checkpoint(path: str, *, device: str = "cpu"):
    """(XVLA, state.json contents) from a directory written by save_checkpoint, or from a published X-VLA
    directory (X-VLA-Pt layout: converted by models/xvla/weights.py, which logs what it re-initialized)."""
    from models.xvla.model import XVLA

    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; is it an X-VLA checkpoint directory?")
    with open(config_path) as f:
        doc = json.load(f)
    if doc.get("model_type") == "xvla" and "b1k" not in doc:
        from models.xvla.weights import config_from_published, load_xvla_pretrained

        model = XVLA(config_from_published(doc))
        model.init_weights()
        model.load_report = load_xvla_pretrained(model, path)
        state_path = os.path.join(path, STATE_FILE)
        state = json.load(open(state_path)) if os.path.exists(state_path) else {"global_step": 0}
        return model.to(device).eval(), state
    if not os.path.exists(os.path.join(path, STATE_FILE)):
        raise FileNotFoundError(f"{path} is not a complete X-VLA checkpoint (no {STATE_FILE})")
    cfg = config_from_json(doc, where=config_path)
    model = XVLA(cfg)
    missing, unexpected = model.load_state_dict(load_file(os.path.join(path, MODEL_FILE)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match config.json: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    return model.to(device).eval(), state
