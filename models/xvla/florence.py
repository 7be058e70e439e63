"""Florence-2 as X-VLA uses it (xvla.md §1.2-1.3): DaViT + projection for images, the BART encoder for view 0
with the instruction; the decoder and LM head are never built.

Built from transformers' native Florence-2 modules (`Florence2VisionBackbone`, `Florence2MultiModalProjector`,
`BartEncoder`), whose parameter names (`vision_tower.*`, `multi_modal_projector.*`, `language_model.encoder.*`)
are what `models/xvla/weights.py` maps the vendored X-VLA checkpoint layout onto.
"""

from __future__ import annotations

import torch
from torch import nn

from models.xvla.config import XVLAConfig


class _LanguageModel(nn.Module):
    """Holds the encoder under `language_model.encoder`, the key prefix of native Florence-2 checkpoints."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder


class FlorenceEncoder(nn.Module):
    def __init__(self, cfg: XVLAConfig) -> None:
        super().__init__()
        from transformers.models.bart.modeling_bart import BartEncoder
        from transformers.models.florence2.modeling_florence2 import (
            Florence2MultiModalProjector,
            Florence2VisionBackbone,
        )

        fcfg = cfg.florence2_config()
        fcfg.text_config._attn_implementation = "sdpa"
        fcfg.vision_config._attn_implementation = "sdpa"
        self.cfg = cfg
        self.vision_tower = Florence2VisionBackbone(fcfg.vision_config)
        self.multi_modal_projector = Florence2MultiModalProjector(fcfg)
        self.language_model = _LanguageModel(BartEncoder(fcfg.text_config))

    def reset_parameters(self) -> None:
        """Fresh Florence-2 initialisation (transformers' own init of each module)."""
        self.vision_tower.init_weights()
        self.language_model.encoder.init_weights()
        proj = self.multi_modal_projector
        nn.init.normal_(proj.image_projection.weight, std=0.02)
        proj.image_proj_norm.reset_parameters()
        for emb in (proj.image_position_embed.row_embeddings, proj.image_position_embed.column_embeddings):
            nn.init.normal_(emb.weight, std=0.02)

    def encode_images(self, pixels_N3HW: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) ImageNet-normalised images -> (N, 1 + (H/32)(W/32), D) projected tokens."""
        return self.multi_modal_projector(self.vision_tower(pixels_N3HW).last_hidden_state)

    def embed_text(self, input_ids_BL: torch.Tensor) -> torch.Tensor:
        return self.language_model.encoder.embed_tokens(input_ids_BL)

    def forward(self, images_BV3HW: torch.Tensor, image_mask_BV: torch.Tensor, input_ids_BL: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> vlm_features (B, tokens + L, D) of view 0 with the text, aux_visual (B, (V-1) * tokens, D).

        Every valid view goes through the shared vision tower in one batch; a masked view contributes zero
        tokens (it is not dropped, so sequence positions stay fixed). The encoder attends to every position,
        pad tokens included, as X-VLA does.
        """
        b, v = images_BV3HW.shape[:2]
        flat, valid = images_BV3HW.flatten(0, 1), image_mask_BV.flatten().bool()
        tokens = None
        if bool(valid.any()):
            enc = self.encode_images(flat[valid])
            tokens = enc.new_zeros((b * v, *enc.shape[1:]))
            tokens[valid] = enc
        else:  # nothing to look at: zero tokens of the right size
            side = images_BV3HW.shape[-1] // 32
            tokens = flat.new_zeros((b * v, 1 + side * side, self.cfg.text.d_model))
        tokens = tokens.view(b, v, *tokens.shape[1:])
        x = torch.cat([tokens[:, 0], self.embed_text(input_ids_BL).to(tokens.dtype)], dim=1)
        vlm = self.language_model.encoder(inputs_embeds=x).last_hidden_state
        return vlm, tokens[:, 1:].flatten(1, 2)
