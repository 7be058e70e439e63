"""Analytic FLOPs per training sample (for MFU) and parameter counts per component.

Counting rule (as performance_anchors.md §4): a matmul with N weights applied to T tokens costs 2*N*T FLOPs;
attention costs 4*S*T*(H*E) per layer (QK^T and AV) for S queries over T keys, computed densely whatever the
mask; a training step is 3x the forward pass. Norms, softmax, RoPE and element-wise ops are ignored.
"""

from __future__ import annotations

from models.common.gemma import GemmaConfig
from models.common.siglip import SiglipConfig
from models.pi_behavior.config import PiBehaviorConfig


def siglip_layer_weights(v: SiglipConfig) -> int:
    return 4 * v.width * v.width + 2 * v.width * v.mlp_dim


def gemma_layer_weights(g: GemmaConfig) -> int:
    attn = g.width * g.num_heads * g.head_dim * 2 + 2 * g.width * g.num_kv_heads * g.head_dim
    return attn + 3 * g.width * g.mlp_dim


def adarms_weights(g: GemmaConfig) -> int:
    """The two per-block modulation Dense layers (cond -> 3 * width) of the action expert."""
    return 2 * g.width * 3 * g.width


def flops_per_sample(cfg: PiBehaviorConfig, *, training: bool = True) -> dict[str, float]:
    """FLOPs of one sample: per component and 'total'. Training includes the FAST tokens, N flow samples and
    the backward pass (x3); inference (training=False) is one prefix pass plus `num_inference_steps` expert
    passes over one chunk."""
    v, d, x = cfg.vision, cfg.vlm, cfg.expert
    p_img = v.num_patches
    patch = 2 * (3 * v.patch_size**2 * v.width) * p_img
    vision_layer = 2 * siglip_layer_weights(v) * p_img + 4 * p_img * p_img * v.width
    vision = cfg.num_cameras * (patch + v.depth * vision_layer)
    projector = 2 * v.width * d.width * cfg.num_image_tokens

    t_vlm = cfg.prefix_len + (cfg.max_fast_tokens if (training and cfg.use_fast_auxiliary) else 0)
    vlm = d.depth * (2 * gemma_layer_weights(d) * t_vlm + 4 * t_vlm * t_vlm * d.num_heads * d.head_dim)
    fast_head = 2 * d.width * cfg.fast_vocab_size * cfg.max_fast_tokens if training and cfg.use_fast_auxiliary \
        else 0

    n = cfg.num_flow_samples if training else 1
    s = n * cfg.action_horizon
    keys = cfg.prefix_len + s
    expert_pass = x.depth * (2 * gemma_layer_weights(x) * s + 4 * s * keys * x.num_heads * x.head_dim
                             + 2 * adarms_weights(x) * n)
    expert_pass += 2 * 2 * cfg.action_dim * x.width * s + 2 * 2 * x.width * x.width * n  # in/out proj, time MLP
    kv_mix = 2 * 2 * d.depth * d.depth * cfg.prefix_len * d.num_kv_heads * d.head_dim
    steps = 1 if training else cfg.num_inference_steps
    expert = steps * expert_pass

    parts = {"vision": float(vision + projector), "vlm": float(vlm + fast_head), "kv_transform": float(kv_mix),
             "expert": float(expert)}
    if training:
        parts = {k: 3.0 * val for k, val in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def parameter_counts(model) -> dict[str, int]:
    """Parameters per component of a PiBehavior (works on the meta device: only shapes are read)."""
    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    expert_mod = sum(count(layer.input_layernorm) + count(layer.post_attention_layernorm)
                     for layer in model.expert_layers) + count(model.expert_norm)
    counts = {
        "vision_tower": count(model.vision_tower),
        "projector": count(model.multi_modal_projector),
        "vlm_embedding": count(model.embed_tokens),
        "vlm_blocks": count(model.vlm_layers) + count(model.vlm_norm),
        "expert_blocks": count(model.expert_layers) + count(model.expert_norm) - expert_mod,
        "expert_adarms": expert_mod,
        "new_modules": sum(count(m) for m in (model.task_stage, model.stage_head, model.kv_transform)
                           ) + sum(count(getattr(model, n)) for n in ("fast_token_embedding", "fast_token_proj")
                                   if hasattr(model, n)),
        "action_io": sum(count(m) for m in (model.action_in_proj, model.action_out_proj, model.time_embedding)),
    }
    counts["total"] = count(model)
    return counts
