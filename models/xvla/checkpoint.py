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
    """Our config from a config.json we wrote (the "b1k" block); one-line ValueError naming the field otherwise."""
    if doc.get("model_type") != "xvla":
        raise ValueError(f"{where}: model_type is {doc.get('model_type')!r}, not 'xvla'")
    b1k = doc.get("b1k")
    if not isinstance(b1k, dict):
        raise ValueError(f"{where}: field 'b1k' must be an object (our XVLAConfig); a published X-VLA config "
                         f"has none and is converted by models/xvla/weights.py")
    fields = dict(b1k)
    try:
        fields["vision"] = FlorenceVisionConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                   for k, v in dict(fields["vision"]).items()})
        fields["text"] = FlorenceTextConfig(**dict(fields["text"]))
        return XVLAConfig(**fields)
    except KeyError as e:
        raise ValueError(f"{where}: field 'b1k.{e.args[0]}' is missing") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: field 'b1k': {e}") from None


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


# Files a loader may need; optimizer.pt is never read here (and never unpickled from an untrusted place).
_LOCALIZED = ("config.json", "model.safetensors", "model.safetensors.index.json", "state.json", "tokenizer.json",
              "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
              "norm_stats.json", "serving.json", "instructions.json", "preprocessor_config.json")
_local_copies: dict[str, str] = {}


def localize(url: str) -> str:
    """A local directory with the checkpoint's files: `url` itself when local, else a copy of the files a loader
    reads (downloaded once per process; removed at exit)."""
    import atexit
    import shutil
    import tempfile

    from data_loaders import storage

    fs, path = storage.resolve(url)
    if storage.is_local(fs):
        return path
    if url in _local_copies:
        return _local_copies[url]
    local = tempfile.mkdtemp(prefix="b1k-xvla-")
    atexit.register(shutil.rmtree, local, True)
    names = [n for n in _LOCALIZED if fs.exists(storage.join(path, n))]
    if "model.safetensors.index.json" in names:
        fs.get(storage.join(path, "model.safetensors.index.json"), os.path.join(local, "model.safetensors.index.json"))
        from models.xvla.weights import _tensor_files  # validates the shard names before anything is fetched

        names += [os.path.basename(f) for f in _tensor_files(local)]
    for name in names:
        fs.get(storage.join(path, name), os.path.join(local, name))
    _local_copies[url] = local
    return local


def load_checkpoint(path: str, *, device: str = "cpu", allow_reinit: tuple[str, ...] = (),
                    reinit_whole_layers: bool = True, **overrides):
    """(XVLA in eval mode, state.json contents) from a directory, local or s3://, of any of the three layouts
    (models/xvla/weights.py): ours as written, X-VLA's published and LeRobot's converted into the variant (the
    load report is `model.load_report`). `overrides` replace config fields (e.g. domain_id=3 for a LeRobot
    model whose domain came with each batch). A directory of no known layout, a malformed file or field: one
    line naming it (XVLAWeightError, a ValueError)."""
    from models.xvla.model import XVLA
    from models.xvla.weights import (
        LAYOUT_LEROBOT,
        LAYOUT_OURS,
        config_from_lerobot,
        config_from_published,
        detect_layout,
        load_xvla_pretrained,
        read_json,
    )

    local = localize(path)
    layout, doc = detect_layout(local)
    where = f"{path}/{CONFIG_FILE}"
    state_path = os.path.join(local, STATE_FILE)
    state = read_json(state_path) if os.path.exists(state_path) else {"global_step": 0}
    if not isinstance(state, dict) or not isinstance(state.get("global_step", 0), int):
        raise ValueError(f"{path}/{STATE_FILE}: field 'global_step' must be an integer")
    if layout == LAYOUT_OURS:
        cfg = config_from_json(doc, where=where)
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        model = XVLA(cfg)
        model.init_weights()
        tensors = load_file(os.path.join(local, MODEL_FILE))
        tensors.setdefault("skill_row_mask", model.skill_row_mask.clone())  # exports from before the mask
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match config.json: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}")
        return model.to(device).eval(), state
    build = config_from_lerobot if layout == LAYOUT_LEROBOT else config_from_published
    model = XVLA(build(doc, where=where, path=path, **overrides))
    model.init_weights()
    model.load_report = load_xvla_pretrained(model, local, allow_reinit=tuple(allow_reinit),
                                             reinit_whole_layers=reinit_whole_layers,
                                             variant_file=None if layout == LAYOUT_LEROBOT else
                                             ("num_tasks" in doc or "num_skills" in doc or None))
    return model.to(device).eval(), state
