"""X-VLA checkpoints of other layouts (X-VLA's published one, LeRobot's) into the BEHAVIOR variant.

Three directory layouts are recognised (`detect_layout`), each by its config.json:

    b1k-train   the published layout below plus b1k.json (our full XVLAConfig and the project-only tensors),
                state.json; older b1k-train directories: config.json with a "b1k" block and native names
    published   model_type "xvla" (2toINF/X-VLA-*, the BEHAVIOR variant), model.safetensors[.index.json]
    LeRobot     "type": "xvla" (XVLAPolicy.save_pretrained), model.safetensors with a `model.` prefix

The published and LeRobot files vendor Florence-2 (`vlm.vision_tower.convs.N.proj`, `...conv1.fn.dw`,
`vlm.image_projection` as a raw [in, out] matrix, `vlm.language_model.model.encoder...`); our model uses
transformers' native Florence-2 modules, and `vendored_to_native` renames (and transposes) those keys.

Loading never guesses silently (`load_xvla_pretrained`): the report names every tensor kept, re-initialised
(with the reason), new or dropped. A layer with some tensors that do not fit is re-initialised whole by default
(a fresh `fc` next to an old `bias` is no layer at all). Only the action in/out layers may change shape on their
own (X-VLA-Pt is 20-d ee6d, BEHAVIOR 23-d); the prompt tables and the skill classifier must be in the file (or,
for a base X-VLA file without any variant tensor, start at zero / fresh, so the variant computes what the base
computes) unless `allow_reinit` names them. Files are read as safetensors and JSON only; nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any

import torch
from safetensors import safe_open

from models.xvla.config import FlorenceTextConfig, FlorenceVisionConfig, XVLAConfig

log = logging.getLogger(__name__)

_B = r"^vlm\.vision_tower\.blocks\.(\d+)\.(\d+)\.(spatial_block|channel_block)\."
_RULES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^vlm\.vision_tower\.convs\.(\d+)\.proj\.", r"vlm.vision_tower.convs.\1.conv."),
    (_B + r"conv([12])\.fn\.dw\.", r"vlm.vision_tower.blocks.\1.\2.\3.conv\4."),
    (_B + r"(window_attn|channel_attn)\.norm\.", r"vlm.vision_tower.blocks.\1.\2.\3.norm1."),
    (_B + r"(window_attn|channel_attn)\.fn\.", r"vlm.vision_tower.blocks.\1.\2.\3.\4."),
    (_B + r"ffn\.norm\.", r"vlm.vision_tower.blocks.\1.\2.\3.norm2."),
    (_B + r"ffn\.fn\.net\.", r"vlm.vision_tower.blocks.\1.\2.\3.ffn."),
    (r"^vlm\.image_proj_norm\.", "vlm.multi_modal_projector.image_proj_norm."),
    (r"^vlm\.image_pos_embed\.", "vlm.multi_modal_projector.image_position_embed."),
    (r"^vlm\.visual_temporal_embed\.", "vlm.multi_modal_projector.visual_temporal_embed."),
    (r"^vlm\.language_model\.model\.", "vlm.language_model."),
))
_DROP = re.compile(r"^vlm\.(language_model\.(final_logits_bias|lm_head\.|decoder\.|model\.decoder\.)"
                   r"|vision_tower\.(norms|head)\.)")
_EMBED = "vlm.language_model.encoder.embed_tokens.weight"
_PROJECTION = "vlm.multi_modal_projector.image_projection.weight"
# May change shape without being named: X-VLA-Pt's 20-d (ee6d) in/out layers cannot hold 23-d BEHAVIOR actions.
_ACTION_HEADS = ("transformer.action_encoder.", "transformer.action_decoder.")
# Must come from the file (issue: a random classifier would pick the skill prompt at inference).
_PROMPTS = ("transformer.soft_prompt_hub.",)
_VARIANT = ("transformer.task_prompt_hub.", "transformer.skill_prompt_hub.", "skill_classifier.")
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

LAYOUT_OURS, LAYOUT_PUBLISHED, LAYOUT_LEROBOT = "b1k-train", "published", "lerobot"
EXPECTED_LAYOUTS = ("config.json with model_type 'xvla' + b1k.json + model.safetensors + state.json "
                    "(b1k-train), config.json with model_type 'xvla' + model.safetensors[.index.json] (X-VLA "
                    "published), or config.json with type 'xvla' + model.safetensors (LeRobot)")


class XVLAWeightError(ValueError):
    """A checkpoint that does not fit the model, or a malformed file/field; the message names every problem."""


@dataclasses.dataclass
class LoadReport:
    kept: list[str]  # our tensor names copied from the file
    reinitialized: dict[str, str]  # our name -> why it kept its fresh initialisation although the file has it
    new: list[str]  # not in the file: fresh initialisation (zero task/skill prompts, fresh classifier)
    dropped: list[str]  # file keys the variant does not use (decoder, generation buffers, unknown names)
    partial_layers: dict[str, list[str]]  # layer -> its tensors that did not fit (the rest: see reinit_whole)

    @property
    def loaded(self) -> list[str]:
        return self.kept

    def summary(self) -> str:
        partial = "; ".join(f"{layer} (did not fit: {', '.join(t)})" for layer, t in self.partial_layers.items())
        return (f"kept {len(self.kept)} tensors; re-initialized {sorted(self.reinitialized) or 'none'}; "
                f"new {self.new or 'none'}; dropped {self.dropped or 'none'}"
                + (f"; partly mismatched layers: {partial}" if partial else ""))

    def format(self) -> str:
        """Every tensor by name, one per line: kept / reinit (why) / new / dropped."""
        lines = [f"kept     {n}" for n in self.kept]
        lines += [f"reinit   {n}  ({why})" for n, why in sorted(self.reinitialized.items())]
        lines += [f"new      {n}" for n in self.new]
        lines += [f"dropped  {n}" for n in self.dropped]
        return "\n".join(lines)


_B_NATIVE = r"^vlm\.vision_tower\.blocks\.(\d+)\.(\d+)\.(spatial_block|channel_block)\."
_NATIVE_RULES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^vlm\.vision_tower\.convs\.(\d+)\.conv\.", r"vlm.vision_tower.convs.\1.proj."),
    (_B_NATIVE + r"conv([12])\.", r"vlm.vision_tower.blocks.\1.\2.\3.conv\4.fn.dw."),
    (r"^vlm\.vision_tower\.blocks\.(\d+)\.(\d+)\.spatial_block\.norm1\.",
     r"vlm.vision_tower.blocks.\1.\2.spatial_block.window_attn.norm."),
    (r"^vlm\.vision_tower\.blocks\.(\d+)\.(\d+)\.channel_block\.norm1\.",
     r"vlm.vision_tower.blocks.\1.\2.channel_block.channel_attn.norm."),
    (_B_NATIVE + r"(window_attn|channel_attn)\.", r"vlm.vision_tower.blocks.\1.\2.\3.\4.fn."),
    (_B_NATIVE + r"norm2\.", r"vlm.vision_tower.blocks.\1.\2.\3.ffn.norm."),
    (_B_NATIVE + r"ffn\.", r"vlm.vision_tower.blocks.\1.\2.\3.ffn.fn.net."),
    (r"^vlm\.multi_modal_projector\.image_position_embed\.", "vlm.image_pos_embed."),
    (r"^vlm\.multi_modal_projector\.(image_proj_norm|visual_temporal_embed)\.", r"vlm.\1."),
    (r"^vlm\.language_model\.", "vlm.language_model.model."),
))
# The published file stores BART's tied token table once, as `shared` (HF drops encoder.embed_tokens on save).
_SHARED = "vlm.language_model.model.shared.weight"
_FINAL_LOGITS_BIAS = "vlm.language_model.final_logits_bias"  # a generation buffer of the upstream model: zeros
# Ours only; the published naming has no place for it (b1k.json holds it).
PROJECT_ONLY_TENSORS = ("skill_row_mask",)


def native_to_vendored(name: str) -> str:
    """The published (vendored Florence-2) key of one of our state-dict names; the inverse of
    `vendored_to_native` (image_projection is also transposed: see `to_published_tensors`)."""
    if name == _EMBED:
        return _SHARED
    if name == _PROJECTION:
        return "vlm.image_projection"
    for pattern, repl in _NATIVE_RULES:
        if pattern.match(name):
            return pattern.sub(repl, name, count=1)
    return name


def _vendored_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    return t.T.contiguous() if name == _PROJECTION else t.contiguous()


def to_published_tensors(state: dict[str, torch.Tensor], text_vocab_size: int) -> dict[str, torch.Tensor]:
    """Our state dict as the published model.safetensors holds it: vendored names, image_projection as the raw
    [in, out] matrix, the zero final_logits_bias of the upstream model; the project-only tensors left out."""
    out = {native_to_vendored(k): _vendored_tensor(k, v.detach().cpu())
           for k, v in state.items() if k not in PROJECT_ONLY_TENSORS}
    if len(out) != len([k for k in state if k not in PROJECT_ONLY_TENSORS]):
        raise XVLAWeightError("two state-dict names map to one published key")  # a broken renaming rule
    out[_FINAL_LOGITS_BIAS] = torch.zeros(1, text_vocab_size)
    return out


def from_published_tensors(tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor], *,
                           where: str) -> dict[str, torch.Tensor]:
    """Strict inverse of `to_published_tensors` for a model whose state dict is `own`: every published key of
    the model present with its exact shape and dtype, nothing else in the file (XVLAWeightError naming them)."""
    want = {native_to_vendored(k): k for k in own if k not in PROJECT_ONLY_TENSORS}
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want) - {_FINAL_LOGITS_BIAS})
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}" + (f" (+{len(missing) - 8})" if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}"
                        + (f" (+{len(unexpected) - 8})" if len(unexpected) > 8 else ""))
    out = {}
    for key, name in sorted(want.items()):
        if key not in tensors:
            continue
        t = tensors[key]
        t = t.T.contiguous() if name == _PROJECTION else t
        if tuple(t.shape) != tuple(own[name].shape) or t.dtype != own[name].dtype:
            problems.append(f"{key}: {t.dtype} {tuple(t.shape)} in the file, {own[name].dtype} "
                            f"{tuple(own[name].shape)} in the model")
        out[name] = t
    if problems:
        raise XVLAWeightError(f"{where}: does not match its b1k.json: " + "; ".join(problems[:10]))
    return out


def vendored_to_native(key: str) -> str | None:
    """Our name for a checkpoint key, or None for a key the variant does not use."""
    if key.startswith("model."):  # LeRobot files prefix everything
        key = key[len("model."):]
    if _DROP.match(key):
        return None
    if key in ("vlm.language_model.shared.weight", "vlm.language_model.model.shared.weight"):
        return _EMBED  # BART ties the encoder's token embedding to `shared`
    if key == "vlm.image_projection":
        return _PROJECTION
    for pattern, repl in _RULES:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


# --- directories and config.json ------------------------------------------------------------------------------

def read_json(path: str) -> Any:
    """A JSON file; XVLAWeightError naming the file when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise XVLAWeightError(f"{path}: not readable as JSON ({e})") from None


def detect_layout(path: str) -> tuple[str, dict[str, Any]]:
    """(layout, config.json) of a local directory; one-line XVLAWeightError when it is none of the three."""
    config_path = os.path.join(path, "config.json")
    doc = read_json(config_path) if os.path.isfile(config_path) else None
    has_weights = any(os.path.isfile(os.path.join(path, f))
                      for f in ("model.safetensors", "model.safetensors.index.json"))
    if isinstance(doc, dict) and has_weights:
        if doc.get("model_type") == "xvla" and ("b1k" in doc or os.path.isfile(os.path.join(path, "b1k.json"))):
            if not os.path.isfile(os.path.join(path, "state.json")):
                raise XVLAWeightError(f"{path}: an incomplete b1k-train X-VLA checkpoint (no state.json, which is "
                                      f"written last)")
            return LAYOUT_OURS, doc
        elif doc.get("model_type") == "xvla":
            return LAYOUT_PUBLISHED, doc
        elif doc.get("type") == "xvla" and "model_type" not in doc:
            return LAYOUT_LEROBOT, doc
    found = sorted(os.listdir(path)) if os.path.isdir(path) else None
    what = (f"found {found[:8]}" if found else "the directory is empty" if found is not None
            else "it is not a directory")
    if isinstance(doc, dict):
        what += f"; config.json has model_type={doc.get('model_type')!r}, type={doc.get('type')!r}"
    raise XVLAWeightError(f"{path}: not an X-VLA checkpoint directory: expected {EXPECTED_LAYOUTS}; {what}")


def _get(doc: dict, key: str, kind: type, where: str, default: Any = dataclasses.MISSING) -> Any:
    """doc[key] checked to be `kind` (int, float, bool, str, list); one-line XVLAWeightError naming the field."""
    if key not in doc or doc[key] is None:
        if default is dataclasses.MISSING:
            raise XVLAWeightError(f"{where}: field {key!r} is missing")
        return default
    value = doc[key]
    ok = (isinstance(value, bool) if kind is bool else isinstance(value, (int, float)) and not isinstance(
        value, bool) if kind is float else isinstance(value, int) and not isinstance(value, bool) if kind is int
        else isinstance(value, kind))
    if not ok or (kind in (int, float) and value < 0):
        raise XVLAWeightError(f"{where}: field {key!r} must be a non-negative {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def _ints(doc: dict, key: str, where: str, default: tuple[int, ...]) -> tuple[int, ...]:
    value = _get(doc, key, list, where, list(default))
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise XVLAWeightError(f"{where}: field {key!r} must be a list of positive integers, got {value!r}")
    return tuple(value)


def _require(doc: dict, key: str, expected: Any, where: str) -> None:
    """Fields our Florence-2 / transformer build hard-codes: the file must agree (or not say)."""
    if key in doc and doc[key] is not None and doc[key] != expected:
        raise XVLAWeightError(f"{where}: field {key!r} is {doc[key]!r}; this implementation supports only "
                              f"{expected!r}")


def _florence(doc: dict, where: str) -> tuple[FlorenceVisionConfig, FlorenceTextConfig]:
    fc = _get(doc, "florence_config", dict, where, {})
    vc = _get(fc, "vision_config", dict, f"{where} florence_config", {})
    tc = _get(fc, "text_config", dict, f"{where} florence_config", {})
    vw, tw = f"{where} florence_config.vision_config", f"{where} florence_config.text_config"
    for key, expected in (("patch_size", [7, 3, 3, 3]), ("patch_stride", [4, 2, 2, 2]),
                          ("patch_padding", [3, 1, 1, 1]), ("patch_prenorm", [False, True, True, True]),
                          ("image_feature_source", ["spatial_avg_pool", "temporal_avg_pool"])):
        _require(vc, key, expected, vw)
    _require(_get(vc, "image_pos_embed", dict, vw, {}), "type", "learned_abs_2d", f"{vw}.image_pos_embed")
    _require(_get(vc, "visual_temporal_embedding", dict, vw, {}), "type", "COSINE",
             f"{vw}.visual_temporal_embedding")
    _require(tc, "scale_embedding", False, tw)
    d = FlorenceVisionConfig
    embed_key = "dim_embed" if "dim_embed" in vc else "embed_dim"
    vision = FlorenceVisionConfig(
        embed_dim=_ints(vc, embed_key, vw, d.embed_dim), depths=_ints(vc, "depths", vw, d.depths),
        num_heads=_ints(vc, "num_heads", vw, d.num_heads), num_groups=_ints(vc, "num_groups", vw, d.num_groups),
        window_size=_get(vc, "window_size", int, vw, d.window_size),
        drop_path_rate=_get(vc, "drop_path_rate", float, vw, d.drop_path_rate),
        max_position_embeddings=_get(_get(vc, "image_pos_embed", dict, vw, {}), "max_pos_embeddings", int,
                                     f"{vw}.image_pos_embed",
                                     _get(vc, "max_position_embeddings", int, vw, d.max_position_embeddings)),
        max_temporal_embeddings=_get(_get(vc, "visual_temporal_embedding", dict, vw, {}), "max_temporal_embeddings",
                                     int, f"{vw}.visual_temporal_embedding",
                                     _get(vc, "max_temporal_embeddings", int, vw, d.max_temporal_embeddings)))
    t = FlorenceTextConfig
    dropout = _get(tc, "dropout", float, tw, t.dropout)
    text = FlorenceTextConfig(
        vocab_size=_get(tc, "vocab_size", int, tw, _get(fc, "vocab_size", int, f"{where} florence_config",
                                                        t.vocab_size)),
        d_model=_get(tc, "d_model", int, tw, t.d_model), layers=_get(tc, "encoder_layers", int, tw, t.layers),
        heads=_get(tc, "encoder_attention_heads", int, tw, t.heads),
        ffn_dim=_get(tc, "encoder_ffn_dim", int, tw, t.ffn_dim),
        max_position_embeddings=_get(tc, "max_position_embeddings", int, tw, t.max_position_embeddings),
        dropout=dropout, attention_dropout=_get(tc, "attention_dropout", float, tw, dropout),
        activation_dropout=_get(tc, "activation_dropout", float, tw, dropout))
    projection = _get(fc, "projection_dim", int, f"{where} florence_config",
                      _get(vc, "projection_dim", int, vw, text.d_model))
    if projection != text.d_model:
        raise XVLAWeightError(f"{where} florence_config: field 'projection_dim' is {projection}; this "
                              f"implementation projects images to the text width d_model={text.d_model}")
    return vision, text


def _transformer_fields(doc: dict, where: str) -> dict[str, Any]:
    _require(doc, "use_hetero_proj", False, where)
    out = {}
    for key in ("hidden_size", "depth", "num_heads", "num_domains", "len_soft_prompts", "dim_time", "max_len_seq"):
        if key in doc:
            out[key] = _get(doc, key, int, where)
    if "mlp_ratio" in doc:
        out["mlp_ratio"] = _get(doc, "mlp_ratio", float, where)
    return out


def _action_mode(doc: dict, where: str, path: str, default: str) -> str:
    mode = _get(doc, "action_mode", str, where, default).lower()
    if mode != "auto":
        raise XVLAWeightError(f"{where}: field 'action_mode' is {mode!r}; only 'auto' is implemented here. To "
                              f"start the 23-d BEHAVIOR variant from these weights use --set init_from=xvla:{path} "
                              f"(the action in/out layers are then re-initialised)")
    return mode


def config_from_published(doc: dict, *, where: str = "config.json", path: str = "DIR", **variant) -> XVLAConfig:
    """Our config for X-VLA's published config.json: its sizes and action space (auto mode: proprio as wide as
    the actions), 50 text tokens (X-VLA's processor), `variant` fields on top."""
    vision, text = _florence(doc, where)
    base: dict[str, Any] = {"vision": vision, "text": text, **_transformer_fields(doc, where), "max_text_len": 50}
    if "action_mode" not in variant:
        base["action_mode"] = _action_mode(doc, where, path, "auto")
        if "num_actions" in doc:
            base["num_actions"] = _get(doc, "num_actions", int, where)
        if "max_action_dim" in doc:
            base["max_action_dim"] = base["max_state_dim"] = _get(doc, "max_action_dim", int, where)
            base["real_action_dim"] = _get(doc, "real_action_dim", int, where, base["max_action_dim"])
    if _get(doc, "use_proprio", bool, where, True) is not True:
        raise XVLAWeightError(f"{where}: field 'use_proprio' is false; the variant always feeds the state")
    for key in ("num_tasks", "num_skills"):
        if key in doc:
            base[key] = _get(doc, key, int, where)
    return _build(base, variant, where)


def config_from_lerobot(doc: dict, *, where: str = "config.json", path: str = "DIR", **variant) -> XVLAConfig:
    """Our config for LeRobot's config.json ("type": "xvla"): chunk_size, max_action_dim / max_state_dim,
    action_mode, tokenizer_max_length, num_denoising_steps, the views and image size from input_features, the
    Florence-2 sizes and dropouts; `variant` fields on top (e.g. domain_id, which LeRobot takes per batch)."""
    vision, text = _florence(doc, where)
    base: dict[str, Any] = {"vision": vision, "text": text, **_transformer_fields(doc, where)}
    base["num_actions"] = _get(doc, "chunk_size", int, where, 32)
    base["max_text_len"] = _get(doc, "tokenizer_max_length", int, where, 64)
    base["num_sampling_steps"] = _get(doc, "num_denoising_steps", int, where, 10)
    if _get(doc, "use_proprio", bool, where, True) is not True:
        raise XVLAWeightError(f"{where}: field 'use_proprio' is false; the variant always feeds the state")
    if _get(doc, "dtype", str, where, "float32") not in ("float32", "bfloat16"):
        raise XVLAWeightError(f"{where}: field 'dtype' must be 'float32' or 'bfloat16', got {doc['dtype']!r}")
    features = _get(doc, "input_features", dict, where, {})
    views = []
    for name, feat in features.items():
        if not isinstance(feat, dict):
            raise XVLAWeightError(f"{where}: field 'input_features.{name}' must be an object")
        if feat.get("type") == "VISUAL":
            shape = feat.get("shape")
            if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) for s in shape)
                    and shape[1] == shape[2]):
                raise XVLAWeightError(f"{where}: field 'input_features.{name}.shape' must be [3, H, H], "
                                      f"got {shape!r}")
            views.append(shape[1])
    if views:
        base["image_size"] = views[0]
    num_views = _get(doc, "num_image_views", int, where, len(views) + _get(doc, "empty_cameras", int, where, 0))
    if num_views:
        base["num_views"] = num_views
    if "action_mode" not in variant:
        base["action_mode"] = _action_mode(doc, where, path, "ee6d")  # LeRobot's default
        base["max_action_dim"] = _get(doc, "max_action_dim", int, where, 20)
        base["max_state_dim"] = _get(doc, "max_state_dim", int, where, 32)
        action = _get(_get(doc, "output_features", dict, where, {}), "action", dict, f"{where} output_features", {})
        shape = action.get("shape", [base["max_action_dim"]])
        if not (isinstance(shape, list) and shape and isinstance(shape[-1], int)):
            raise XVLAWeightError(f"{where}: field 'output_features.action.shape' must be a list of ints")
        base["real_action_dim"] = shape[-1]  # LeRobot's auto mode: the dataset's action width
    return _build(base, variant, where)


def _build(base: dict[str, Any], variant: dict[str, Any], where: str) -> XVLAConfig:
    try:
        return XVLAConfig(**{**base, **variant})
    except (TypeError, ValueError) as e:
        raise XVLAWeightError(f"{where}: {e}") from None


# --- tensors --------------------------------------------------------------------------------------------------

def _tensor_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        doc = read_json(index)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) and v == os.path.basename(v) and v.endswith(".safetensors") and v != ".."
                for v in weight_map.values()):
            raise XVLAWeightError(f"{index}: field 'weight_map' must map tensor names to .safetensors file names "
                                  f"in the same directory")
        return sorted({os.path.join(path, v) for v in weight_map.values()})
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise XVLAWeightError(f"{path}: no model.safetensors (or index); expected {EXPECTED_LAYOUTS}")
    return [single]


def _layer_of(model: torch.nn.Module, name: str) -> str:
    """The layer a tensor belongs to: its owning leaf module (a DomainAwareLinear counts as one layer; a
    parameter set directly on a composite module, like pos_emb, is a layer of its own)."""
    from models.xvla.transformer import DomainAwareLinear

    parts = name.split(".")
    owner, parent = ".".join(parts[:-1]), ".".join(parts[:-2])
    if parent and isinstance(model.get_submodule(parent), DomainAwareLinear):
        return parent
    module = model.get_submodule(owner) if owner else model
    return owner if owner and not any(True for _ in module.children()) else name


def _allowed(name: str, allow: tuple[str, ...]) -> bool:
    """`allow` entries name modules or tensors, fully ("transformer.skill_prompt_hub") or by a dotted part
    ("skill_prompt_hub", "skill_classifier"); "*" allows everything."""
    return any(a == "*" or f".{name}.".find(f".{a.strip('.')}.") >= 0 for a in allow)


def load_xvla_pretrained(model: torch.nn.Module, path: str, *, allow_reinit: tuple[str, ...] = (),
                         reinit_whole_layers: bool = True, variant_file: bool | None = None) -> LoadReport:
    """Fill `model` (an XVLA, freshly initialised) from the safetensors of a local checkpoint directory.

    Raises XVLAWeightError listing every problem before a single tensor is copied: a shape mismatch outside the
    action in/out layers, a non-float tensor, missing prompt/classifier tensors (below), an `allow_reinit` entry
    that names nothing. A layer of which only some tensors fit is re-initialised whole unless
    `reinit_whole_layers=False` (then its fitting tensors are kept, and the report says the layer is partial).

    Missing prompt tables and classifier: soft_prompt_hub must always be in the file; the task/skill tables and
    the classifier must be too when the file is a variant checkpoint (`variant_file`; by default: it has any of
    them). A base X-VLA file has none, and they start at zero / fresh. `allow_reinit` lifts both rules (and a
    shape mismatch) for the modules it names.
    """
    own = model.state_dict()
    plan: dict[str, tuple[str, str]] = {}  # our key -> (file, file key)
    dropped, problems = [], []
    mismatched: dict[str, str] = {}
    for file in _tensor_files(path):
        try:
            handle = safe_open(file, framework="pt")
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a malformed header
            raise XVLAWeightError(f"{file}: not a readable safetensors file ({e})") from None
        with handle as f:
            for key in f.keys():
                name = vendored_to_native(key)
                if name is None or name not in own:
                    dropped.append(key)
                    continue
                piece = f.get_slice(key)
                shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
                want = tuple(own[name].shape)
                if name == _PROJECTION and key.endswith("image_projection"):
                    shape = shape[::-1]  # the vendored raw matrix is used as x @ W; a Linear stores W^T
                if own[name].is_floating_point() and dtype not in _FLOAT_DTYPES:
                    problems.append(f"{key}: dtype {dtype}, expected a float tensor")
                elif shape != want:
                    why = f"shape {shape} in the file, {want} in the model"
                    if name.startswith(_ACTION_HEADS) or _allowed(name, allow_reinit):
                        mismatched[name] = why
                    else:
                        problems.append(f"{key}: {why}")
                else:
                    plan[name] = (file, key)
    names = set(own)
    unknown = [a for a in allow_reinit if a != "*" and not any(_allowed(n, (a,)) for n in names)]
    if unknown:
        problems.append(f"allow_reinit names no tensor of the model: {unknown}")
    # Layers of which only some tensors fit.
    reinit = dict(mismatched)
    by_layer: dict[str, list[str]] = {}
    for name in mismatched:
        by_layer.setdefault(_layer_of(model, name), []).append(name)
    partial: dict[str, list[str]] = {}  # layers of which some tensors fit and some do not
    for layer, bad in by_layer.items():
        fitting = [n for n in plan if _layer_of(model, n) == layer]
        if fitting:
            partial[layer] = bad
        for name in fitting if reinit_whole_layers else ():
            del plan[name]
            reinit[name] = f"fits, but re-initialised with the rest of layer {layer}"
    new = sorted(k for k in own if k not in plan and k not in reinit)
    is_variant = (any(n.startswith(_VARIANT) for n in [*plan, *reinit]) if variant_file is None
                  else variant_file)
    guarded = _PROMPTS + (_VARIANT if is_variant else ())
    missing = [k for k in new if k.startswith(guarded) and not _allowed(k, allow_reinit)]
    if missing:
        modules = sorted({".".join(k.split(".")[:-1]).removeprefix("transformer.") for k in missing})
        unused = [k for k in dropped if not _DROP.match(k.removeprefix("model."))]
        problems.append(f"missing prompt/classifier tensors {missing} (unused tensors in the file: "
                        f"{unused[:6] or 'none'}); to re-initialise them on purpose pass "
                        f"--set allow_reinit={','.join(modules)} (XVLA.from_pretrained(..., allow_reinit=...))")
    if problems:
        raise XVLAWeightError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems[:10]))
    with torch.no_grad():
        for file in sorted({f for f, _ in plan.values()}):
            with safe_open(file, framework="pt") as f:
                for name, (_, key) in ((n, v) for n, v in plan.items() if v[0] == file):
                    t = f.get_tensor(key)
                    if name == _PROJECTION and key.endswith("image_projection"):
                        t = t.T.contiguous()
                    own[name].copy_(t.to(own[name].dtype))
    report = LoadReport(kept=sorted(plan), reinitialized=dict(sorted(reinit.items())),
                        new=new, dropped=sorted(dropped),
                        partial_layers={k: sorted(v) for k, v in sorted(partial.items())})
    log.info("X-VLA weights from %s: %s", path, report.summary())
    return report
