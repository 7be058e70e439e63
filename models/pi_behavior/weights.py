"""Pretrained weights for PiBehavior: a Hugging Face PaliGemma directory or an openpi / LeRobot pi0.5 checkpoint.

- `load_paligemma(model, dir)`: SigLIP, projector, token embedding and Gemma-2B VLM from a HF PaliGemma export
  (`config.json` + `model.safetensors`, or shards + `model.safetensors.index.json`). Both key layouts are read:
  old (`vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`,
  `language_model.lm_head.weight`; the Hub files and what transformers' `save_pretrained` writes) and new
  (`model.vision_tower.*`, `model.language_model.*`, `lm_head.weight`; in-memory names since transformers 4.52).
  The `vision_model.` level under `vision_tower.` is optional (transformers 5 dropped it). config.json is
  checked against our config first.
- `load_pi05(model, path)`: everything pi0.5 has (the above plus the adaRMS action expert, `action_in/out_proj`
  and the time MLP) from an openpi PyTorch (`paligemma_with_expert.*`) or LeRobot (`model.paligemma_with_expert.*`)
  `model.safetensors`. The pi-behavior additions (task/stage fusion, stage head, FAST head, KV transform) keep
  their initialisation (pi_behavior.md §1.1 "Init").

Both validate the whole checkpoint (names and shapes, read from the safetensors headers) before touching the
model, so a failed load leaves the model unchanged and raises one `WeightLoadError` listing every missing,
unexpected, wrongly-shaped and conflicting key. Tensors are read one at a time and cast to the dtype (and device)
of the parameter they fill.

Load into a materialised, unsharded model (after `to_empty(...)` + `init_weights()` if it was built on the meta
device, and before FSDP wraps it); meta parameters are refused because copying into them would silently do
nothing. Sharded (DTensor) parameters are not handled here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from contextlib import ExitStack
from typing import Any, Callable

import torch
from safetensors import safe_open
from torch import nn

from models.pi_behavior.config import PiBehaviorConfig
from models.pi_behavior.model import PiBehavior

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Our parameter-name prefixes filled by each loader; everything else is "kept at init".
PALIGEMMA_PREFIXES = ("vision_tower.", "multi_modal_projector.", "embed_tokens.", "vlm_layers.", "vlm_norm.")
PI05_PREFIXES = PALIGEMMA_PREFIXES + (
    "expert_layers.", "expert_norm.", "action_in_proj.", "action_out_proj.", "time_embedding.")

_EMBED = "embed_tokens.weight"
_TAKE_AS_EMBED = "lm_head->embed_tokens"  # marker: a tied LM head, used as the embedding if that key is absent


class WeightLoadError(ValueError):
    """A checkpoint does not fit the model; the message lists every problem and names the file."""


@dataclasses.dataclass
class LoadReport:
    source: str
    loaded: list[str]  # our state_dict names filled from the checkpoint
    ignored: dict[str, str]  # checkpoint key -> why it was skipped on purpose
    kept_at_init: list[str]  # our state_dict names left untouched
    notes: list[str]  # vocab slicing, dtype casts, tied-embedding use

    @property
    def num_loaded(self) -> int:
        return len(self.loaded)

    @property
    def num_ignored(self) -> int:
        return len(self.ignored)

    @property
    def num_kept_at_init(self) -> int:
        return len(self.kept_at_init)

    def summary(self) -> str:
        lines = [f"{self.source}: loaded {self.num_loaded} tensors, ignored {self.num_ignored} checkpoint keys, "
                 f"kept {self.num_kept_at_init} at init"]
        if self.kept_at_init:
            lines.append("  kept at init (modules): " + ", ".join(_module_groups(self.kept_at_init)))
        lines += [f"  ignored {k}: {why}" for k, why in sorted(self.ignored.items())]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# --- key renaming --------------------------------------------------------------------------------------------
# A rename function maps a checkpoint key to ("load", our name), ("ignore", reason), (_TAKE_AS_EMBED, reason)
# or None (unexpected).

Action = tuple[str, str] | None


def _vision_key(rest: str) -> Action:
    """Key below SigLIP's `vision_tower.[vision_model.]`."""
    if rest.startswith("vision_model."):
        rest = rest[len("vision_model."):]
    if rest.startswith("head."):
        return "ignore", "SigLIP attention-pooling head (PaliGemma uses every patch token)"
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", rest)
    if m:
        return "load", f"vision_tower.layers.{m[1]}.{m[2]}"
    if rest.startswith(("embeddings.", "post_layernorm.")):
        return "load", f"vision_tower.{rest}"
    return None


def _gemma_vlm_key(rest: str) -> Action:
    """Key below PaliGemma's Gemma `GemmaModel` (`language_model.model.` / `model.language_model.`)."""
    if rest == "embed_tokens.weight":
        return "load", _EMBED
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", rest)
    if m:
        return "load", f"vlm_layers.{m[1]}.{m[2]}"
    if rest.startswith("norm."):
        return "load", "vlm_" + rest
    return None


def _paligemma_key(key: str) -> Action:
    """HF PaliGemmaForConditionalGeneration key, old or new layout."""
    m = re.match(r"(?:model\.)?vision_tower\.", key)
    if m:
        return _vision_key(key[m.end():])
    m = re.match(r"(?:model\.)?multi_modal_projector\.linear\.", key)
    if m:
        return "load", "multi_modal_projector." + key[m.end():]
    m = re.match(r"language_model\.model\.|model\.language_model\.", key)
    if m:
        return _gemma_vlm_key(key[m.end():])
    if key in ("lm_head.weight", "language_model.lm_head.weight"):
        return _TAKE_AS_EMBED, "PaliGemma LM head (tied to the token embedding)"
    return None


def _pi05_key(key: str) -> Action:
    """openpi PyTorch pi0.5 key, optionally with LeRobot's `model.` prefix."""
    if key.startswith("model."):
        key = key[len("model."):]
    if key.startswith("paligemma_with_expert.paligemma."):
        return _paligemma_key(key[len("paligemma_with_expert.paligemma."):])
    if key.startswith("paligemma_with_expert.gemma_expert."):
        rest = key[len("paligemma_with_expert.gemma_expert."):]
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", rest)
        if m:
            return "load", f"expert_layers.{m[1]}.{m[2]}"
        if rest.startswith("model.norm."):
            return "load", "expert_norm." + rest[len("model.norm."):]
        if rest == "lm_head.weight":
            return "ignore", "action-expert LM head (never used nor trained)"
        if rest == "model.embed_tokens.weight":
            return "ignore", "action-expert token embedding (the expert reads no tokens)"
        return None
    m = re.fullmatch(r"(action_in_proj|action_out_proj)\.(weight|bias)", key)
    if m:
        return "load", key
    m = re.fullmatch(r"(?:action_)?(time_mlp_in|time_mlp_out)\.(weight|bias)", key)
    if m:
        # LeRobot renames a legacy `action_time_mlp_*` to `time_mlp_*`; a pi0 `action_time_mlp_in` (2*width in)
        # still fails the shape check.
        return "load", f"time_embedding.{m[1]}.{m[2]}"
    return None


# --- checkpoint files ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Entry:
    file: str
    shape: tuple[int, ...]
    dtype: str


def _resolve_files(path: str) -> tuple[str, list[str]]:
    """(description for messages, safetensors files) for a file, a single-file dir or a sharded dir."""
    if os.path.isfile(path):
        return path, [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return index, [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return single, [single]
    raise FileNotFoundError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _read_headers(files: list[str]) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                entries[key] = _Entry(path, tuple(sl.get_shape()), sl.get_dtype())
    return entries


# --- planning (validation) and loading -----------------------------------------------------------------------

@dataclasses.dataclass
class _Plan:
    assign: dict[str, str]  # our name -> checkpoint key
    ignored: dict[str, str]
    notes: list[str]


def _plan(entries: dict[str, _Entry], rename: Callable[[str], Action], targets: dict[str, torch.Tensor],
          covered: list[str], source: str) -> _Plan:
    assign: dict[str, str] = {}
    ignored: dict[str, str] = {}
    notes: list[str] = []
    unexpected: list[str] = []
    conflicts: list[str] = []
    tied_head: str | None = None
    for key in sorted(entries):
        action = rename(key)
        if action is None:
            unexpected.append(f"{key} {entries[key].shape}")
            continue
        kind, value = action
        if kind == "ignore":
            ignored[key] = value
        elif kind == _TAKE_AS_EMBED:
            if tied_head is not None:
                conflicts.append(f"tied LM head <- both {tied_head} and {key}")
            tied_head = key
        elif value not in targets:
            unexpected.append(f"{key} {entries[key].shape} (would be {value}, which the model does not have)")
        elif value in assign:
            conflicts.append(f"{value} <- both {assign[value]} and {key}")
        else:
            assign[value] = key
    if tied_head is not None:
        if _EMBED in assign:
            ignored[tied_head] = "tied LM head; the token embedding is loaded from its own key"
        else:
            assign[_EMBED] = tied_head
            notes.append(f"{_EMBED} taken from the tied {tied_head} (the file stores no separate embedding)")

    wrong_shape: list[str] = []
    for name, key in assign.items():
        want, got = tuple(targets[name].shape), entries[key].shape
        if name == _EMBED and len(got) == 2 and got[1] == want[1] and got[0] > want[0]:
            notes.append(f"{_EMBED}: using the first {want[0]} of {got[0]} vocabulary rows of {key} "
                         f"(the extra rows are unused by the model)")
        elif got != want:
            wrong_shape.append(f"{name}: checkpoint {got} ({key}), model {want}")
    missing = [f"{name} {tuple(targets[name].shape)}" for name in covered if name not in assign]
    if missing or unexpected or wrong_shape or conflicts:
        raise WeightLoadError(_problems_message(source, missing, unexpected, wrong_shape, conflicts, entries))
    src_dtypes = ", ".join(sorted({entries[k].dtype for k in assign.values()}))
    dst_dtypes = ", ".join(sorted({str(targets[n].dtype).removeprefix("torch.") for n in assign}))
    notes.append(f"checkpoint dtype(s) {src_dtypes} -> model dtype(s) {dst_dtypes}")
    return _Plan(assign, ignored, notes)


def _problems_message(source: str, missing: list[str], unexpected: list[str], wrong_shape: list[str],
                      conflicts: list[str], entries: dict[str, _Entry]) -> str:
    head = (f"cannot load {source} into PiBehavior: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong_shape)} wrongly shaped, {len(conflicts)} conflicting key(s)")
    parts = [head]
    for title, items in (("missing (in the model, not in the checkpoint)", missing),
                         ("unexpected (in the checkpoint, not used by the model)", unexpected),
                         ("wrong shape", wrong_shape),
                         ("conflicting (two checkpoint keys for one parameter)", conflicts)):
        if items:
            parts.append(f"  {title}:")
            parts += [f"    {item}" for item in items]
    if any(".input_layernorm.weight" in k and "gemma_expert" in k for k in entries) or any(
            re.match(r"(model\.)?state_proj\.", k) for k in entries):
        parts.append("  hint: plain expert norms / state_proj mean a pi0 (not pi0.5) checkpoint")
    return "\n".join(parts)


def _apply(plan: _Plan, entries: dict[str, _Entry], targets: dict[str, torch.Tensor]) -> None:
    with ExitStack() as stack, torch.no_grad():
        handles: dict[str, Any] = {}
        for name, key in plan.assign.items():
            entry = entries[key]
            if entry.file not in handles:
                handles[entry.file] = stack.enter_context(safe_open(entry.file, framework="pt"))
            dst = targets[name]
            if entry.shape != tuple(dst.shape):  # vocabulary rows beyond ours (checked in _plan)
                src = handles[entry.file].get_slice(key)[: dst.shape[0]]
            else:
                src = handles[entry.file].get_tensor(key)
            dst.copy_(src)


def _load(model: nn.Module, source: str, files: list[str], rename: Callable[[str], Action],
          prefixes: tuple[str, ...]) -> LoadReport:
    targets = model.state_dict(keep_vars=True)
    meta = [name for name, t in targets.items() if t.is_meta]
    if meta:
        raise ValueError(f"{len(meta)} parameters (e.g. {meta[0]}) are on the meta device; materialise the model "
                         f"first (model.to_empty(device=...); model.init_weights()) and then load {source}")
    covered = [name for name in targets if name.startswith(prefixes)]
    entries = _read_headers(files)
    plan = _plan(entries, rename, targets, covered, source)
    _apply(plan, entries, targets)
    for note in plan.notes:
        logger.info("%s: %s", source, note)
    loaded = sorted(plan.assign)
    kept = [name for name in targets if name not in plan.assign]
    return LoadReport(source=source, loaded=loaded, ignored=plan.ignored, kept_at_init=kept, notes=plan.notes)


def _module_groups(names: list[str]) -> list[str]:
    """Collapse parameter names into their top-level modules, in first-seen order."""
    return list(dict.fromkeys(name.split(".")[0] for name in names))


# --- config.json check ---------------------------------------------------------------------------------------

# Defaults of transformers' GemmaConfig / SiglipVisionConfig for fields a PaliGemma config.json may omit
# (the Hub's paligemma-3b-pt-224 omits head_dim, rms_norm_eps, rope_theta, image_size, layer_norm_eps).
_TEXT_DEFAULTS = {"head_dim": 256, "rms_norm_eps": 1e-6, "rope_theta": 10_000.0, "num_key_value_heads": 16}
_VISION_DEFAULTS = {"image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6}
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new")


def check_paligemma_config(hf_config: dict[str, Any], model_cfg: PiBehaviorConfig, *,
                           source: str = "config.json") -> None:
    """Raise WeightLoadError naming every field of a HF PaliGemma config.json that differs from our config."""
    text = hf_config.get("text_config", {})
    vision = hf_config.get("vision_config", {})
    v, d = model_cfg.vision, model_cfg.vlm

    def text_get(name: str) -> Any:
        if name == "rope_theta" and "rope_theta" not in text:
            return (text.get("rope_parameters") or {}).get("rope_theta", _TEXT_DEFAULTS["rope_theta"])
        return text.get(name, _TEXT_DEFAULTS.get(name))

    checks = [
        ("vision_config.hidden_size", vision.get("hidden_size"), "vision.width", v.width),
        ("vision_config.num_hidden_layers", vision.get("num_hidden_layers"), "vision.depth", v.depth),
        ("vision_config.intermediate_size", vision.get("intermediate_size"), "vision.mlp_dim", v.mlp_dim),
        ("vision_config.num_attention_heads", vision.get("num_attention_heads"), "vision.num_heads", v.num_heads),
        ("vision_config.image_size", vision.get("image_size", _VISION_DEFAULTS["image_size"]),
         "vision.image_size", v.image_size),
        ("vision_config.patch_size", vision.get("patch_size", _VISION_DEFAULTS["patch_size"]),
         "vision.patch_size", v.patch_size),
        ("vision_config.layer_norm_eps", vision.get("layer_norm_eps", _VISION_DEFAULTS["layer_norm_eps"]),
         "vision.layer_norm_eps", v.layer_norm_eps),
        ("projection_dim", hf_config.get("projection_dim", vision.get("projection_dim")), "vlm.width", d.width),
        ("text_config.hidden_size", text.get("hidden_size"), "vlm.width", d.width),
        ("text_config.num_hidden_layers", text.get("num_hidden_layers"), "vlm.depth", d.depth),
        ("text_config.intermediate_size", text.get("intermediate_size"), "vlm.mlp_dim", d.mlp_dim),
        ("text_config.num_attention_heads", text.get("num_attention_heads"), "vlm.num_heads", d.num_heads),
        ("text_config.num_key_value_heads", text_get("num_key_value_heads"), "vlm.num_kv_heads", d.num_kv_heads),
        ("text_config.head_dim", text_get("head_dim"), "vlm.head_dim", d.head_dim),
        ("text_config.rms_norm_eps", text_get("rms_norm_eps"), "vlm.rms_eps", d.rms_eps),
        ("text_config.rope_theta", text_get("rope_theta"), "vlm.rope_base", d.rope_base),
    ]
    problems = []
    for hf_name, hf_value, our_name, our_value in checks:
        if hf_value is None:
            problems.append(f"{hf_name} is missing (ours: {our_name} = {our_value})")
        elif isinstance(our_value, float) and not math.isclose(float(hf_value), our_value, rel_tol=1e-6):
            problems.append(f"{hf_name} = {hf_value}, but our {our_name} = {our_value}")
        elif not isinstance(our_value, float) and hf_value != our_value:
            problems.append(f"{hf_name} = {hf_value}, but our {our_name} = {our_value}")
    vocab = text.get("vocab_size", hf_config.get("vocab_size"))
    if vocab is not None and vocab < d.vocab_size:
        problems.append(f"text_config.vocab_size = {vocab} is smaller than our vlm.vocab_size = {d.vocab_size}")
    for section, cfg_dict, keys in (("text_config", text, ("hidden_activation", "hidden_act")),
                                    ("vision_config", vision, ("hidden_act",))):
        act = next((cfg_dict[k] for k in keys if cfg_dict.get(k) is not None), "gelu_pytorch_tanh")
        if act not in _TANH_GELU:
            problems.append(f"{section} activation {act!r}: our blocks use tanh-approximated GELU")
    if problems:
        raise WeightLoadError(f"{source} does not match our PiBehaviorConfig:\n" +
                              "\n".join(f"  {p}" for p in problems))


# --- public API ----------------------------------------------------------------------------------------------

def load_paligemma(model: PiBehavior, checkpoint_dir: str) -> LoadReport:
    """Fill SigLIP, projector, token embedding, VLM blocks and final norm from a HF PaliGemma directory."""
    config_path = os.path.join(checkpoint_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{checkpoint_dir} is not a Hugging Face PaliGemma directory: no config.json")
    with open(config_path) as f:
        check_paligemma_config(json.load(f), model.cfg, source=config_path)
    source, files = _resolve_files(checkpoint_dir)
    return _load(model, source, files, _paligemma_key, PALIGEMMA_PREFIXES)


def load_pi05(model: PiBehavior, path: str) -> LoadReport:
    """Fill everything pi0.5 has from an openpi-PyTorch or LeRobot pi0.5 `model.safetensors` (file or dir)."""
    source, files = _resolve_files(path)
    return _load(model, source, files, _pi05_key, PI05_PREFIXES)
