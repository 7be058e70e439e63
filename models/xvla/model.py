"""X-VLA BEHAVIOR variant (xvla.md §1, §3.2): Florence-2 encoder, soft-prompted transformer with additive task
and skill prompts, and a skill classifier on the pooled VLM features.

Flow matching predicts the clean chunk (X-VLA's formulation, §1.6): x_t = t * eps + (1 - t) * a, the network
returns a-hat, the loss is 100 * MSE on the real action dims ("auto" mode). Sampling re-noises the current
estimate with the same eps for `steps` steps. Images are uint8 (B, V, H, W, 3) and normalised here with the
ImageNet statistics, so training and serving share the exact transform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.xvla.config import XVLAConfig
from models.xvla.florence import FlorenceEncoder
from models.xvla.transformer import SoftPromptedTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
T_MAX = 1.0 - 1e-5  # training times live in [0, T_MAX)


class XVLA(nn.Module):
    def __init__(self, cfg: XVLAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vlm = FlorenceEncoder(cfg)
        self.transformer = SoftPromptedTransformer(cfg)
        self.skill_classifier = nn.Linear(cfg.text.d_model, cfg.num_skills)
        # Class weights of the skill cross-entropy (∝ 1/sqrt(frequency), mean 1; data stats set them).
        self.register_buffer("skill_class_weights", torch.ones(cfg.num_skills), persistent=False)
        # 1 for the skill-table rows the training data uses, 0 for the others: masked out of the classifier's
        # loss and argmax. Persistent, so an export predicts only the skills its data had.
        self.register_buffer("skill_row_mask", torch.ones(cfg.num_skills))
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)

    # --- setup -------------------------------------------------------------------------------------------------

    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer, e.g. after a meta-device build and `to_empty`."""
        self.vlm.reset_parameters()
        self.transformer.reset_parameters()
        nn.init.xavier_uniform_(self.skill_classifier.weight)
        nn.init.zeros_(self.skill_classifier.bias)
        with torch.no_grad():
            self.skill_class_weights.fill_(1.0)
            self.skill_row_mask.fill_(1.0)
            self.pixel_mean.copy_(torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1))
            self.pixel_std.copy_(torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1))
            # Florence-2's fixed cosine temporal table (a persistent buffer: empty after a meta-device build).
            temporal = self.vlm.multi_modal_projector.visual_temporal_embed
            sine, cosine = temporal.get_sinusoid_embeddings(*temporal.pos_idx_to_embed.shape)
            temporal.pos_idx_to_embed[:, 0::2] = sine
            temporal.pos_idx_to_embed[:, 1::2] = cosine

    def set_skill_class_weights(self, weights: torch.Tensor) -> None:
        if tuple(weights.shape) != (self.cfg.num_skills,) or not bool(torch.all(weights > 0)):
            raise ValueError(f"skill class weights must be {self.cfg.num_skills} positive numbers")
        self.skill_class_weights.copy_(weights.to(self.skill_class_weights))

    def set_skill_rows_used(self, used: torch.Tensor) -> None:
        """`used` (num_skills,) bool: the rows the training data labels; the others can never be predicted."""
        if tuple(used.shape) != (self.cfg.num_skills,) or not bool(used.any()):
            raise ValueError(f"skill rows used must be {self.cfg.num_skills} booleans with at least one true")
        self.skill_row_mask.copy_(used.to(self.skill_row_mask))

    def skill_logits(self, vlm_features: torch.Tensor) -> torch.Tensor:
        """Classifier logits on the mean VLM feature; unused rows get the dtype's minimum (never chosen, ~0
        probability in the cross-entropy)."""
        logits = self.skill_classifier(vlm_features.mean(dim=1))
        unused = self.skill_row_mask.to(logits.device) < 0.5
        return logits.masked_fill(unused, torch.finfo(logits.dtype).min)

    def transformer_blocks(self) -> list[nn.Module]:
        """Repeated blocks (DaViT stages' blocks, BART layers, action transformer): FSDP and checkpointing units."""
        davit = [blk for stage in self.vlm.vision_tower.blocks for blk in stage]
        return [*davit, *self.vlm.language_model.encoder.layers, *self.transformer.blocks]

    # --- encoding ----------------------------------------------------------------------------------------------

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, V, H, W, 3) -> ImageNet-normalised float (B, V, 3, H, W); float input passes through."""
        if images.dtype != torch.uint8:
            return images
        x = images.permute(0, 1, 4, 2, 3).float() / 255.0
        return (x - self.pixel_mean) / self.pixel_std

    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> vlm_features (B, S, D), aux_visual (B, (V-1)*tokens, D), skill logits (B, num_skills)."""
        images = self.pixels(batch["images"])
        b, v = images.shape[:2]
        if v != self.cfg.num_views:
            raise ValueError(f"expected {self.cfg.num_views} views (head first, then the wrists), got {v}")
        mask = batch.get("image_mask")
        if mask is None:
            mask = torch.ones(b, v, dtype=torch.bool, device=images.device)
        vlm, aux = self.vlm(images, mask, batch["input_ids"])
        return vlm, aux, self.skill_logits(vlm)

    def _denoise(self, x_t, t, proprio, vlm, aux, task, skill) -> torch.Tensor:
        domain = torch.full_like(task, self.cfg.domain_id)
        return self.transformer(x_t=x_t, proprio=proprio, t=t, vlm_features=vlm, aux_visual=aux, domain=domain,
                                task=task, skill=skill)

    def _pad(self, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """Zero-pad the last dim to `width` (default max_action_dim), as X-VLA's auto mode and LeRobot do."""
        width = self.cfg.max_action_dim if width is None else width
        if x.shape[-1] > width:
            raise ValueError(f"input of width {x.shape[-1]} exceeds the model's {width}")
        return F.pad(x.float(), (0, width - x.shape[-1]))

    # --- training ----------------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Losses of one batch: images, input_ids, proprio (B, A), actions (B, T, A), action_mask (B, T),
        task (B,), skill (B,) class index or -1 when the frame has no annotated skill.

        Returns (loss, detached metrics {"loss", "action_loss", "skill_loss", "skill_acc"}), the contract of every
        model the trainer drives; the prompt uses the labelled skill (the
        classifier only supplies it at inference), and unlabelled frames use skill 0's prompt row.
        """
        cfg = self.cfg
        vlm, aux, logits = self.encode(batch)
        actions = self._pad(batch["actions"])
        b, dev = actions.shape[0], actions.device
        # Stratified times: one uniform draw shifted by i/B, so every batch covers [0, 1) evenly.
        u = torch.rand((), generator=generator, device=dev)
        t = torch.remainder(u + torch.arange(b, device=dev) / b, T_MAX)
        eps = torch.randn(actions.shape, generator=generator, device=dev)
        x_t = t[:, None, None] * eps + (1.0 - t[:, None, None]) * actions
        skill = batch["skill"].long()
        proprio = self._pad(batch["proprio"], cfg.max_state_dim)
        pred = self._denoise(x_t, t, proprio, vlm, aux, batch["task"].long(), skill.clamp(min=0))
        err = (pred[..., : cfg.real_action_dim].float() - actions[..., : cfg.real_action_dim]) ** 2
        mask = batch.get("action_mask")
        step_w = torch.ones(err.shape[:2], device=dev) if mask is None else mask.float()
        action_loss = cfg.action_loss_scale * (err.mean(-1) * step_w).sum() / step_w.sum().clamp(min=1.0)
        labelled = skill >= 0
        if bool(labelled.any()):
            skill_loss = F.cross_entropy(logits[labelled].float(), skill[labelled],
                                         weight=self.skill_class_weights.float())
            skill_acc = (logits[labelled].argmax(-1) == skill[labelled]).float().mean()
        else:
            skill_loss = logits.sum() * 0.0  # keeps the graph (and every rank's collectives) identical
            skill_acc = torch.zeros((), device=dev)
        loss = action_loss + cfg.skill_loss_weight * skill_loss
        return loss, {"loss": loss.detach(), "action_loss": action_loss.detach(), "skill_loss": skill_loss.detach(),
                      "skill_acc": skill_acc.detach()}

    # --- inference ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_actions(self, images: torch.Tensor, input_ids: torch.Tensor, task_id: torch.Tensor, *,
                         proprio: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                         skill_id: torch.Tensor | None = None, steps: int | None = None,
                         generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                         return_skill: bool = False):
        """Absolute actions (B, T, real_action_dim); the skill comes from the classifier unless `skill_id`.

        `noise` (B, T, max_action_dim) fixes eps (default: drawn from `generator`). With `return_skill`, returns
        (actions, skill ids used). Sampling (§1.6): a-hat = 0, then for i = S..1:
        t = i/S, a-hat = f(t * eps + (1 - t) * a-hat, t) with the same eps every step.
        """
        cfg = self.cfg
        batch = {"images": images, "input_ids": input_ids, "image_mask": image_mask}
        vlm, aux, logits = self.encode(batch)
        b, dev = vlm.shape[0], vlm.device
        task = task_id.reshape(b).long().to(dev)
        skill = logits.argmax(-1) if skill_id is None else skill_id.reshape(b).long().to(dev)
        state = (torch.zeros(b, cfg.max_state_dim, device=dev) if proprio is None
                 else self._pad(proprio.to(dev), cfg.max_state_dim))
        eps = (torch.randn((b, cfg.num_actions, cfg.max_action_dim), generator=generator, device=dev)
               if noise is None else noise.to(dev, torch.float32))
        a_hat = torch.zeros_like(eps)
        n = steps or cfg.num_sampling_steps
        for i in range(n, 0, -1):
            t = torch.full((b,), i / n, device=dev)
            a_hat = self._denoise(t[:, None, None] * eps + (1.0 - t[:, None, None]) * a_hat, t, state, vlm, aux,
                                  task, skill).float()
        actions = a_hat[..., : cfg.real_action_dim]
        return (actions, skill) if return_skill else actions

    # --- checkpoints (the published layout, models/xvla/checkpoint.py) --------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str, *, device: str = "cpu", allow_reinit: tuple[str, ...] = (),
                        reinit_whole_layers: bool = True, **overrides) -> XVLA:
        """A checkpoint directory, local or s3://: ours (`save_pretrained`, the trainer's export), X-VLA's
        published layout (2toINF/X-VLA-*) or LeRobot's (`XVLAPolicy.save_pretrained`). `overrides` replace
        XVLAConfig fields read from the directory (e.g. domain_id=3); `allow_reinit` names the prompt/classifier
        modules that may be re-initialised when missing; `model.load_report` lists every tensor."""
        from models.xvla.checkpoint import load_checkpoint

        return load_checkpoint(path, device=device, allow_reinit=allow_reinit,
                               reinit_whole_layers=reinit_whole_layers, **overrides)[0]

    def save_pretrained(self, path: str, *, tokenizer=None, optimizer=None, optimizer_state=None,
                        global_step: int = 0) -> str:
        """The published X-VLA BEHAVIOR layout (models/xvla/checkpoint.py), optimizer.pt from `optimizer`."""
        from models.xvla.checkpoint import save_checkpoint

        return save_checkpoint(self, path, tokenizer=tokenizer, optimizer=optimizer, optimizer_state=optimizer_state,
                               global_step=global_step)
