"""X-VLA checkpoint directories, written in the published X-VLA BEHAVIOR layout (xvla.md §4.1) so that the
upstream `XVLA.from_pretrained` reads them:

    model.safetensors   weights under the published names (vendored Florence-2: `vlm.vision_tower.convs.N.proj`,
                        `vlm.image_projection` as the raw [in, out] matrix, `vlm.language_model.model.shared`, the
                        zero `final_logits_bias`; transformer.*, the task/skill prompt tables, skill_classifier)
    config.json         the published fields only: model_type "xvla", action_mode "auto", real/max_action_dim,
                        hidden_size, depth, ..., num_tasks, num_skills, florence_config
    b1k.json            ours (the upstream loader never opens it): the full XVLAConfig and the project-only
                        tensors (skill_row_mask); its presence marks a b1k-train directory
    optimizer.pt        the optimizer state in published form (`published_optimizer_state`): torch's
                        Optimizer.state_dict() (int-indexed "state", "param_groups" with "params") plus each
                        group's "param_names" under the published names, moments in the published orientation;
                        tensors and plain containers only, read back only through checkpoints/safe_load.py
    state.json          {"global_step": N}, written last: present = complete
    tokenizer files     the BART tokenizer (tokenizer.json, tokenizer_config.json, ...)

Reading one back (`load_checkpoint`) is strict: the key set must be exactly the published names of the model
b1k.json describes, shapes and dtypes exact. Directories of the older b1k-train layout (native names, a "b1k"
block in config.json) still load.
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
B1K_FILE = "b1k.json"
B1K_FORMAT = 1


def config_to_json(cfg: XVLAConfig) -> dict[str, Any]:
    """config.json: the fields of the published X-VLA BEHAVIOR config (xvla.md §4.2), nothing of ours."""
    return {
        "model_type": "xvla", "architectures": ["XVLA"], "action_mode": "auto",
        "real_action_dim": cfg.real_action_dim, "max_action_dim": cfg.max_action_dim, "num_actions": cfg.num_actions,
        "use_proprio": True, "hidden_size": cfg.hidden_size, "depth": cfg.depth, "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio, "num_domains": cfg.num_domains, "len_soft_prompts": cfg.len_soft_prompts,
        "soft_prompt_length": cfg.len_soft_prompts, "dim_time": cfg.dim_time, "max_len_seq": cfg.max_len_seq,
        "use_hetero_proj": False, "torch_dtype": "float32",
        "num_tasks": cfg.num_tasks, "num_skills": cfg.num_skills,
        "florence_config": cfg.florence2_config().to_dict(),
    }


def b1k_to_json(cfg: XVLAConfig, extras: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """b1k.json: our full config and the project-only tensors (as float lists; exact for float32)."""
    return {"format": B1K_FORMAT, "config": dataclasses.asdict(cfg),
            "tensors": {k: {"shape": list(v.shape), "values": v.detach().float().cpu().flatten().tolist()}
                        for k, v in sorted((extras or {}).items())}}


def _config_fields(b1k: Any, where: str, field: str) -> XVLAConfig:
    if not isinstance(b1k, dict):
        raise ValueError(f"{where}: field {field!r} must be an object (our XVLAConfig)")
    fields = dict(b1k)
    try:
        fields["vision"] = FlorenceVisionConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                   for k, v in dict(fields["vision"]).items()})
        fields["text"] = FlorenceTextConfig(**dict(fields["text"]))
        return XVLAConfig(**fields)
    except KeyError as e:
        raise ValueError(f"{where}: field '{field}.{e.args[0]}' is missing") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: field {field!r}: {e}") from None


def config_from_json(doc: dict[str, Any], *, where: str = CONFIG_FILE) -> XVLAConfig:
    """Our config from an older b1k-train config.json (its "b1k" block); one-line ValueError otherwise."""
    if doc.get("model_type") != "xvla":
        raise ValueError(f"{where}: model_type is {doc.get('model_type')!r}, not 'xvla'")
    if not isinstance(doc.get("b1k"), dict):
        raise ValueError(f"{where}: field 'b1k' must be an object (our XVLAConfig); a published X-VLA config "
                         f"has none and is converted by models/xvla/weights.py")
    return _config_fields(doc["b1k"], where, "b1k")


def b1k_from_json(doc: Any, *, where: str = B1K_FILE) -> tuple[XVLAConfig, dict[str, torch.Tensor]]:
    """(config, project-only tensors) from b1k.json; one-line ValueError naming the field otherwise."""
    if not isinstance(doc, dict) or doc.get("format") != B1K_FORMAT:
        raise ValueError(f"{where}: field 'format' must be {B1K_FORMAT}")
    cfg = _config_fields(doc.get("config"), where, "config")
    tensors = {}
    raw = doc.get("tensors", {})
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: field 'tensors' must be an object")
    for name, t in raw.items():
        try:
            shape, values = [int(d) for d in t["shape"]], [float(v) for v in t["values"]]
            tensors[name] = torch.tensor(values, dtype=torch.float32).reshape(shape)
        except (KeyError, TypeError, ValueError, RuntimeError):
            raise ValueError(f"{where}: field 'tensors.{name}' must be {{'shape': [ints], 'values': [numbers]}} "
                             f"of matching size") from None
    return cfg, tensors


# --- optimizer.pt -----------------------------------------------------------------------------------------------

def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def published_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                              state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The optimizer state in published form: torch's Optimizer.state_dict() layout (int-indexed "state",
    "param_groups" with int "params") with each group's "param_names" under the published key names and every
    per-parameter tensor shaped like the published parameter (image_projection's moments transposed).

    Pass the `optimizer` (its parameters are named through `model`), or a `state` dict from
    `optimizer.state_dict()` whose groups carry "param_names" (ours) or, without them, index the model's
    parameters in `named_parameters()` order."""
    from models.xvla.weights import _PROJECTION, native_to_vendored

    if optimizer is not None:
        state = optimizer.state_dict()
        names_of = _param_names(model)
        ordered = [names_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    elif state is not None:
        groups = state.get("param_groups", [])
        if all("param_names" in g for g in groups):
            ordered = [n for g in groups for n in g["param_names"]]
        else:
            ordered = [n for n, _ in model.named_parameters()]
    else:
        raise ValueError("published_optimizer_state needs an optimizer or its state_dict()")
    by_index: dict[int, str] = {}
    for g in state["param_groups"]:
        for i in g["params"]:
            if not isinstance(i, int) or not 0 <= i < len(ordered):
                raise ValueError(f"optimizer state: parameter index {i!r} does not name a parameter of the model")
            by_index[i] = ordered[i]
    own = set(_param_names(model).values())
    strays = sorted({n for n in by_index.values() if n not in own})
    if strays:
        raise ValueError(f"optimizer state: parameters {strays[:5]} are not parameters of the model")
    out_state = {}
    for i, s in state["state"].items():
        name = by_index[int(i)]
        out_state[int(i)] = {k: (v.detach().cpu().T.contiguous() if name == _PROJECTION and torch.is_tensor(v)
                                 and v.dim() == 2 else v.detach().cpu().clone() if torch.is_tensor(v) else v)
                             for k, v in s.items()}
    groups = []
    for g in state["param_groups"]:
        g = {k: v for k, v in g.items() if k != "param_names"}
        g["param_names"] = [native_to_vendored(by_index[i]) for i in g["params"]]
        groups.append(g)
    return {"state": out_state, "param_groups": groups}


_PLAIN = (int, float, bool, str, type(None))


def _check_plain(obj: Any, where: str) -> None:
    """Only tensors, numbers, strings, None and lists/tuples/dicts of them (the weights-only loader already
    refused anything else; this also rejects tensor subclasses and odd keys)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (int, str)):
                raise ValueError(f"{where}: key {k!r} is neither an int nor a string")
            _check_plain(v, where)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_plain(v, where)
    elif not (isinstance(obj, _PLAIN) or type(obj) is torch.Tensor):
        raise ValueError(f"{where}: holds a {type(obj).__name__}; only tensors and plain containers are allowed")


def load_optimizer_state(path: str, model: torch.nn.Module) -> dict[str, Any]:
    """optimizer.pt of a directory (published form) as our optimizer.state_dict(): "params" index the model's
    parameters in the order of the groups, "param_names" are our names, moments in our orientation. Read with
    checkpoints/safe_load.load_torch_state only: a pickled object is refused (UnsafeCheckpointError, one line,
    nothing executed); a malformed state or a name the model lacks: one-line ValueError."""
    from checkpoints.safe_load import load_torch_state
    from models.xvla.weights import _PROJECTION, vendored_to_native

    file = os.path.join(path, OPTIMIZER_FILE) if os.path.isdir(path) else path
    doc = load_torch_state(file)
    _check_plain(doc, file)
    if not (isinstance(doc, dict) and isinstance(doc.get("state"), dict)
            and isinstance(doc.get("param_groups"), list) and all(isinstance(g, dict) for g in doc["param_groups"])):
        raise ValueError(f"{file}: not an optimizer state ({{'state': {{...}}, 'param_groups': [...]}})")
    params = dict(model.named_parameters())
    by_index: dict[int, str] = {}
    groups = []
    for n, g in enumerate(doc["param_groups"]):
        ids, names = g.get("params"), g.get("param_names")
        if not (isinstance(ids, list) and isinstance(names, list) and len(ids) == len(names)):
            raise ValueError(f"{file}: param_groups[{n}] needs 'params' and 'param_names' of equal length")
        ours = []
        for i, key in zip(ids, names):
            name = vendored_to_native(key) if isinstance(key, str) else None
            if name not in params or not isinstance(i, int) or i in by_index:
                raise ValueError(f"{file}: param_groups[{n}]: {key!r} (index {i!r}) is no parameter of the model "
                                 f"(or repeats one)")
            by_index[i] = name
            ours.append(name)
        groups.append({**g, "param_names": ours})
    state = {}
    for i, s in doc["state"].items():
        if i not in by_index or not isinstance(s, dict):
            raise ValueError(f"{file}: state entry {i!r} belongs to no parameter group")
        name, want = by_index[i], tuple(params[by_index[i]].shape)
        entry = {}
        for k, v in s.items():
            if torch.is_tensor(v) and v.dim() > 0:
                v = v.T.contiguous() if name == _PROJECTION and v.dim() == 2 else v
                if tuple(v.shape) != want:
                    raise ValueError(f"{file}: state of {name} ({k}) has shape {tuple(v.shape)}, the parameter "
                                     f"{want}")
            entry[k] = v
        state[i] = entry
    return {"state": state, "param_groups": groups}


# --- the directory -------------------------------------------------------------------------------------------------

def write_published_files(out_dir: str, state: dict[str, torch.Tensor], cfg: XVLAConfig, *,
                          config_extra: dict[str, Any] | None = None) -> None:
    """model.safetensors (published names), config.json (published fields) and b1k.json of `state`."""
    from models.xvla.weights import PROJECT_ONLY_TENSORS, to_published_tensors

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    extras = {k: v for k, v in tensors.items() if k in PROJECT_ONLY_TENSORS}
    save_file(to_published_tensors(tensors, cfg.text.vocab_size), os.path.join(out_dir, MODEL_FILE),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config_to_json(cfg), f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, B1K_FILE), "w") as f:
        json.dump({**b1k_to_json(cfg, extras), **(config_extra or {})}, f, indent=1, sort_keys=True)


def save_checkpoint(model: torch.nn.Module, out_dir: str, *, tokenizer: Any | None = None,
                    optimizer: torch.optim.Optimizer | None = None, optimizer_state: dict[str, Any] | None = None,
                    global_step: int = 0) -> str:
    """Write the directory in the published layout; state.json goes last, so a reader that sees it sees a
    complete checkpoint. optimizer.pt from `optimizer` or `optimizer_state` (see `published_optimizer_state`)."""
    os.makedirs(out_dir, exist_ok=True)
    state_path = os.path.join(out_dir, STATE_FILE)
    if os.path.exists(state_path):
        os.remove(state_path)  # overwriting: the directory is incomplete until the new state.json lands
    write_published_files(out_dir, model.state_dict(), model.cfg)
    opt_path = os.path.join(out_dir, OPTIMIZER_FILE)
    if optimizer is not None or optimizer_state is not None:
        torch.save(published_optimizer_state(model, optimizer, optimizer_state), opt_path)
    elif os.path.exists(opt_path):
        os.remove(opt_path)  # a stale one would not belong to these weights
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    tmp = state_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"global_step": int(global_step)}, f)
    os.replace(tmp, state_path)
    return out_dir


# Files a loader may need; optimizer.pt is not among them (only load_optimizer_state reads it, weights-only).
_LOCALIZED = ("config.json", "b1k.json", "model.safetensors", "model.safetensors.index.json", "state.json",
              "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "norm_stats.json", "serving.json", "instructions.json", "preprocessor_config.json")
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
        b1k_path = os.path.join(local, B1K_FILE)
        if os.path.isfile(b1k_path):  # the published layout + b1k.json
            from models.xvla.weights import from_published_tensors, read_json

            cfg, extras = b1k_from_json(read_json(b1k_path), where=f"{path}/{B1K_FILE}")
        else:  # older b1k-train directories: native names, our config in config.json
            cfg, extras = config_from_json(doc, where=where), None
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        model = XVLA(cfg)
        model.init_weights()
        tensors = load_file(os.path.join(local, MODEL_FILE))
        if extras is not None:
            own = model.state_dict()
            tensors = {**from_published_tensors(tensors, own, where=f"{path}/{MODEL_FILE}"), **extras}
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
