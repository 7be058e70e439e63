"""Published X-VLA checkpoints (X-VLA-Pt and its fine-tunes; xvla.md §4) into the BEHAVIOR variant.

The published layout vendors Florence-2 (`vlm.vision_tower.convs.N.proj`, `...spatial_block.conv1.fn.dw`,
`vlm.image_projection` as a raw [2048, 1024] matrix, `vlm.language_model.model.encoder...`); our model uses
transformers' native Florence-2 modules. `vendored_to_native` renames (and transposes) those keys; LeRobot files
(`model.` prefix, native names) pass through after the prefix is stripped.

What the variant adds or changes is reported, never silent: the 20-d (ee6d) action in/out layers cannot hold
23-d BEHAVIOR actions and keep their fresh initialisation ("reinitialized"); the task and skill prompt tables and
the skill classifier do not exist in the base model and start at zero / fresh ("new"), so the loaded variant
computes what the base model computes until they are trained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

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


class XVLAWeightError(ValueError):
    """A checkpoint that does not fit the model; the message lists every problem."""


@dataclasses.dataclass
class LoadReport:
    loaded: list[str]
    reinitialized: list[str]  # in the file with another shape (kept our initialisation)
    new: list[str]  # not in the file (kept our initialisation: zero prompts, fresh classifier)
    dropped: list[str]  # in the file, not used by the variant (decoder, generation buffers)

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)} tensors; re-initialized {self.reinitialized or 'none'}; "
                f"new {self.new or 'none'}; dropped {len(self.dropped)}")


def vendored_to_native(key: str) -> str | None:
    """Our name for a checkpoint key, or None for a key the variant does not use."""
    if key.startswith("model."):  # LeRobot files prefix everything
        key = key[len("model."):]
    if _DROP.match(key):
        return None
    if key in ("vlm.language_model.shared.weight", "vlm.language_model.model.shared.weight"):
        return _EMBED  # BART ties the encoder's token embedding to `shared`
    if key == "vlm.image_projection":
        return "vlm.multi_modal_projector.image_projection.weight"
    for pattern, repl in _RULES:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


def _tensor_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path}: no model.safetensors (or index); is it an X-VLA checkpoint directory?")
    return [single]


def config_from_published(doc: dict, **variant) -> XVLAConfig:
    """Our config for a published X-VLA config.json: its sizes, the variant's action space and prompt tables."""
    fc = doc.get("florence_config") or {}
    vc, tc = fc.get("vision_config") or {}, fc.get("text_config") or {}
    vision = FlorenceVisionConfig(
        embed_dim=tuple(vc.get("dim_embed", vc.get("embed_dim", FlorenceVisionConfig.embed_dim))),
        depths=tuple(vc.get("depths", FlorenceVisionConfig.depths)),
        num_heads=tuple(vc.get("num_heads", FlorenceVisionConfig.num_heads)),
        num_groups=tuple(vc.get("num_groups", FlorenceVisionConfig.num_groups)),
        window_size=int(vc.get("window_size", FlorenceVisionConfig.window_size)),
        drop_path_rate=float(vc.get("drop_path_rate", FlorenceVisionConfig.drop_path_rate)),
        max_position_embeddings=int((vc.get("image_pos_embed") or {}).get(
            "max_pos_embeddings", vc.get("max_position_embeddings", FlorenceVisionConfig.max_position_embeddings))),
        max_temporal_embeddings=int((vc.get("visual_temporal_embedding") or {}).get(
            "max_temporal_embeddings", vc.get("max_temporal_embeddings",
                                              FlorenceVisionConfig.max_temporal_embeddings))))
    text = FlorenceTextConfig(
        vocab_size=int(tc.get("vocab_size", fc.get("vocab_size", FlorenceTextConfig.vocab_size))),
        d_model=int(tc.get("d_model", FlorenceTextConfig.d_model)),
        layers=int(tc.get("encoder_layers", FlorenceTextConfig.layers)),
        heads=int(tc.get("encoder_attention_heads", FlorenceTextConfig.heads)),
        ffn_dim=int(tc.get("encoder_ffn_dim", FlorenceTextConfig.ffn_dim)),
        max_position_embeddings=int(tc.get("max_position_embeddings", FlorenceTextConfig.max_position_embeddings)))
    base = {k: doc[k] for k in ("hidden_size", "depth", "num_heads", "mlp_ratio", "num_domains", "len_soft_prompts",
                                "dim_time", "max_len_seq", "num_actions") if k in doc}
    return XVLAConfig(vision=vision, text=text, **{**base, **variant})


def load_xvla_pretrained(model: torch.nn.Module, path: str) -> LoadReport:
    """Fill `model` (an XVLA) from a published checkpoint directory. Shapes that differ only in the action
    in/out layers are re-initialized; any other mismatch raises XVLAWeightError listing every problem, before a
    single tensor is copied."""
    own = model.state_dict()
    plan: dict[str, tuple[str, str]] = {}  # our key -> (file, file key)
    dropped, problems, reinit = [], [], []
    for file in _tensor_files(path):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                name = vendored_to_native(key)
                if name is None or name not in own:
                    dropped.append(key)
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                want = tuple(own[name].shape)
                if name == "vlm.multi_modal_projector.image_projection.weight" and key.endswith("image_projection"):
                    shape = shape[::-1]  # the vendored raw matrix is used as x @ W; a Linear stores W^T
                if shape != want:
                    if name.startswith(("transformer.action_encoder.", "transformer.action_decoder.")):
                        reinit.append(name)
                        continue
                    problems.append(f"{key}: shape {shape} in the file, {want} in the model")
                    continue
                plan[name] = (file, key)
    if problems:
        raise XVLAWeightError(f"{path}: {len(problems)} tensor(s) do not fit: " + "; ".join(problems[:10]))
    with torch.no_grad():
        for name, (file, key) in plan.items():
            with safe_open(file, framework="pt") as f:
                t = f.get_tensor(key)
            if key.endswith("image_projection"):
                t = t.T.contiguous()
            own[name].copy_(t.to(own[name].dtype))
    # Non-persistent or derived entries are not expected in files.
    new = sorted(k for k in own if k not in plan and k not in reinit
                 and not k.endswith("visual_temporal_embed.pos_idx_to_embed"))
    report = LoadReport(loaded=sorted(plan), reinitialized=sorted(set(reinit)), new=new, dropped=sorted(dropped))
    log.info("X-VLA weights from %s: %s", path, report.summary())
    return report
