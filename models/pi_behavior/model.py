"""pi-behavior: the 1st-place BEHAVIOR 2025 policy (a Pi0.5 variant), architecture only.

Legend: B batch, C cameras, N flow samples, H action horizon (30), A padded action dim (32), P prefix tokens,
L layers, K kv heads, E head dim, D width.

Forward structure (pi_behavior.md §1-§4):
1. Prefix pass through the VLM (SigLIP image tokens, base task token, 4 fused task+stage tokens, 32 state
   tokens, and while training the teacher-forced FAST tokens), block-masked (masks.py). It yields the stage
   logits (base task token), FAST logits and every layer's post-RoPE keys/values.
2. KV transform: expert layer j reads K'_j = sum_i Wk[j, i] K_i + bk[j] (same for V) over the VLM layers,
   identity-initialised; FAST keys are dropped first.
3. Expert pass: action tokens (all N flow samples side by side, block-diagonal among samples) attend to
   [K'_j; own keys] with adaRMS conditioned on the flow time.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.common.gemma import AdaRMSNorm, GemmaBlock, RMSNorm, rope_cos_sin
from models.common.siglip import SiglipVisionTower
from models.pi_behavior import masks
from models.pi_behavior.config import PiBehaviorConfig
from models.pi_behavior.embeddings import (
    TaskStageFusion,
    TimeEmbedding,
    flax_embedding,
    flax_linear,
    state_to_bins,
)
from models.pi_behavior.flow import CorrelatedNoise, Inpainter, flow_targets, sample_loop, sample_time


class KVTransform(nn.Module):
    """Learned mixing of all VLM layers' keys/values for each expert layer (§1.6); identity at init."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.k_coeffs = nn.Parameter(torch.eye(num_layers))
        self.v_coeffs = nn.Parameter(torch.eye(num_layers))
        self.k_bias = nn.Parameter(torch.zeros(num_layers, num_kv_heads, head_dim))
        self.v_bias = nn.Parameter(torch.zeros(num_layers, num_kv_heads, head_dim))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.k_coeffs.copy_(torch.eye(self.k_coeffs.shape[0]))
            self.v_coeffs.copy_(torch.eye(self.v_coeffs.shape[0]))
            self.k_bias.zero_()
            self.v_bias.zero_()

    def forward(self, ks_LBKPE: torch.Tensor, vs_LBKPE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed keys/values in the cache's dtype; the mixing itself runs in fp32 (also under autocast), as the
        reference's fp32 coefficients do."""
        def mix(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            with torch.autocast(x.device.type, enabled=False):
                out = torch.einsum("ji,ibkpe->jbkpe", w.float(), x.float()) + b.float()[:, None, :, None, :]
            return out.to(x.dtype)

        return mix(ks_LBKPE, self.k_coeffs, self.k_bias), mix(vs_LBKPE, self.v_coeffs, self.v_bias)


class PiBehavior(nn.Module):
    def __init__(self, cfg: PiBehaviorConfig):
        super().__init__()
        self.cfg = cfg
        v, d, x = cfg.vision, cfg.vlm, cfg.expert
        self.vision_tower = SiglipVisionTower(v)
        self.multi_modal_projector = nn.Linear(v.width, d.width)
        self.embed_tokens = nn.Embedding(d.vocab_size, d.width)
        self.vlm_layers = nn.ModuleList(GemmaBlock(d) for _ in range(d.depth))
        self.vlm_norm = RMSNorm(d.width, d.rms_eps)
        self.expert_layers = nn.ModuleList(GemmaBlock(x, cond_dim=x.width) for _ in range(x.depth))
        self.expert_norm = AdaRMSNorm(x.width, x.width, x.rms_eps)
        self.task_stage = TaskStageFusion(width=d.width, stage_dim=cfg.stage_dim,
                                          task_num_stages=cfg.task_num_stages)
        self.stage_head = flax_linear(d.width, cfg.max_num_stages)
        if cfg.use_fast_auxiliary:
            self.fast_token_embedding = flax_embedding(cfg.fast_vocab_size, d.width)
            self.fast_token_proj = flax_linear(d.width, cfg.fast_vocab_size)
        self.kv_transform = KVTransform(d.depth, d.num_kv_heads, d.head_dim)
        self.action_in_proj = flax_linear(cfg.action_dim, x.width)
        self.action_out_proj = flax_linear(x.width, cfg.action_dim)
        self.time_embedding = TimeEmbedding(x.width, cfg.time_min_period, cfg.time_max_period)
        self.noise = CorrelatedNoise.identity(cfg.action_horizon, cfg.action_dim)

    # --- setup -------------------------------------------------------------------------------------------------

    def set_action_correlation(self, cholesky: torch.Tensor) -> None:
        """Use N(0, beta*Sigma + (1-beta)*I) noise with Sigma = L L^T from norm_stats.json (§1.9)."""
        device = next(self.parameters()).device
        self.noise = CorrelatedNoise(torch.as_tensor(cholesky), beta=self.cfg.correlation_beta,
                                     dim=self.cfg.action_dim).to(device)
        self._inpainters = {}

    def _inpainter(self, per_sample_guard: bool) -> Inpainter:
        # Cached per noise: its conditional map M costs a 128x128 solve per k, paid once instead of per chunk.
        cache = self.__dict__.setdefault("_inpainters", {})
        if per_sample_guard not in cache:
            cache[per_sample_guard] = Inpainter.for_noise(self.noise, threshold=self.cfg.inpaint_time_threshold,
                                                          per_sample_guard=per_sample_guard)
        return cache[per_sample_guard]

    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer, e.g. after materialising a model built on the meta device."""
        for module in reversed(list(self.modules())):  # children first, so parents can override them
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.noise.reset_buffers()

    def transformer_blocks(self) -> list[nn.Module]:
        """Every repeated block (vision, VLM, expert): the units for FSDP sharding and activation checkpointing."""
        return [*self.vision_tower.layers, *self.vlm_layers, *self.expert_layers]

    def fp32_modules(self) -> list[nn.Module]:
        """Modules whose parameters stay fp32 under mixed precision (the trainer's FSDP/ZeRO policy), as in the
        reference: its plain nnx.Linear/Embed heads keep fp32 parameters and compute in fp32 (a bf16-stored
        mixing coefficient of 0.999 would read 1.0). They compute in fp32 under autocast by themselves."""
        names = ("task_stage", "stage_head", "fast_token_embedding", "fast_token_proj", "kv_transform",
                 "action_in_proj", "action_out_proj", "time_embedding")
        return [getattr(self, n) for n in names if hasattr(self, n)]

    # --- prefix --------------------------------------------------------------------------------------------------

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W, 3) uint8 or (B, C, 3, H, W) float in [-1, 1] -> (B, C*tokens, D) image tokens."""
        if images.dtype == torch.uint8:
            images = images.permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0
        b, c = images.shape[:2]
        if c != self.cfg.num_cameras:
            raise ValueError(f"expected {self.cfg.num_cameras} cameras (head, left wrist, right wrist), got {c}")
        feats = self.vision_tower(images.flatten(0, 1))
        return self.multi_modal_projector(feats).reshape(b, c * feats.shape[1], -1)

    def embed_token_ids(self, ids_BS: torch.Tensor) -> torch.Tensor:
        """Gemma vocabulary ids -> embeddings times sqrt(width), as PaliGemma embeds text (here: the state bins)."""
        return self.embed_tokens(ids_BS) * (self.cfg.vlm.width ** 0.5)

    def embed_prefix(self, batch: dict[str, torch.Tensor], *, with_fast: bool):
        """-> tokens (B, P, D), valid (B, P), ar flags (P,), number of FAST tokens."""
        cfg = self.cfg
        img = self.embed_images(batch["images"])
        b, device = img.shape[0], img.device
        stage_tokens = self.task_stage(batch["task"], batch["stage"]).to(img.dtype)
        state = batch["state"]
        if state.shape[-1] != cfg.action_dim:
            raise ValueError(f"state must be normalised and padded to {cfg.action_dim}, got {tuple(state.shape)}")
        state_tokens = self.embed_token_ids(state_to_bins(state, cfg.state_bins))
        parts = [img, stage_tokens, state_tokens.to(img.dtype)]
        valid = [torch.ones(b, img.shape[1] + 5 + cfg.action_dim, dtype=torch.bool, device=device)]
        num_fast = 0
        if with_fast:
            tokens, tmask = batch["fast_tokens"], batch["fast_mask"].bool()
            # Teacher forcing: input [BOS=0, tok_0 .. tok_{F-2}], the mask shifted the same way (§1.8).
            inp = F.pad(tokens[:, :-1], (1, 0), value=0)
            inp_mask = F.pad(tmask[:, :-1], (1, 0), value=True)
            parts.append(self.fast_token_embedding(inp).to(img.dtype))
            valid.append(inp_mask)
            num_fast = tokens.shape[1]
        ar = masks.prefix_ar_mask(img.shape[1], cfg.action_dim, num_fast, device)
        return torch.cat(parts, dim=1), torch.cat(valid, dim=1), ar, num_fast

    def run_vlm(self, tokens_BPD: torch.Tensor, valid_BP: torch.Tensor, ar_P: torch.Tensor):
        """Prefix pass -> (final-normed hidden (B, P, D), keys (L, B, K, P, E), values (L, B, K, P, E))."""
        b = tokens_BPD.shape[0]
        mask = masks.ensure_nonempty_rows(masks.make_attn_mask(valid_BP, ar_P[None].expand(b, -1)))
        cos, sin = rope_cos_sin(masks.positions_from_mask(valid_BP), self.cfg.vlm.head_dim, self.cfg.vlm.rope_base)
        h, ks, vs = tokens_BPD, [], []
        for layer in self.vlm_layers:
            h, k, v = layer(h, cos, sin, mask)
            ks.append(k)
            vs.append(v)
        return self.vlm_norm(h)[0], torch.stack(ks), torch.stack(vs)

    def stage_logits(self, prefix_out_BPD: torch.Tensor, task_B: torch.Tensor) -> torch.Tensor:
        """Stage head on the base task token; stages >= the task's stage count get -inf (§1.5)."""
        logits = self.stage_head(prefix_out_BPD[:, self.cfg.task_token_index]).float()
        n = self.task_stage.num_stages[task_B]
        allowed = torch.arange(self.cfg.max_num_stages, device=logits.device)[None] < n[:, None]
        return logits.masked_fill(~allowed, float("-inf"))

    # --- expert --------------------------------------------------------------------------------------------------

    def run_expert(self, x_t_BNHA: torch.Tensor, t_BN: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor,
                   prefix_valid_BP: torch.Tensor) -> torch.Tensor:
        """Velocity (B, N, H, A) for N noisy chunks sharing one (already transformed, FAST-free) prefix cache."""
        b, n, h, a = x_t_BNHA.shape
        # action_in_proj and the time MLP are fp32 (embeddings.py); the expert runs in the cache's dtype.
        tokens = self.action_in_proj(x_t_BNHA.reshape(b, n * h, a)).to(ks.dtype)
        cond = self.time_embedding(t_BN.reshape(-1)).reshape(b, n, -1)  # one condition per flow sample
        start = prefix_valid_BP.long().sum(dim=1, keepdim=True)  # positions continue after the prefix (§1.2)
        positions = (start + torch.arange(h, device=tokens.device)[None]).repeat(1, n)
        cos, sin = rope_cos_sin(positions, self.cfg.expert.head_dim, self.cfg.expert.rope_base)
        x = tokens
        for j, layer in enumerate(self.expert_layers):
            # Each flow sample's H tokens see the prefix and each other (masks.suffix_mask), computed per group.
            x, _, _ = layer(x, cos, sin, prefix_valid_BP, cond=cond.to(x.dtype), extra_k=ks[j], extra_v=vs[j],
                            group=h)
        x = self.expert_norm(x, cond.to(x.dtype))[0]
        return self.action_out_proj(x).float().reshape(b, n, h, a)

    def prefix_cache(self, batch: dict[str, torch.Tensor], *, with_fast: bool):
        tokens, valid, ar, num_fast = self.embed_prefix(batch, with_fast=with_fast)
        out, ks, vs = self.run_vlm(tokens, valid, ar)
        p = out.shape[1] - num_fast
        ks, vs = self.kv_transform(ks[..., :p, :], vs[..., :p, :])
        return out, ks, vs, valid[:, :p], num_fast

    # --- training ------------------------------------------------------------------------------------------------

    def flow_loss(self, actions_BHA: torch.Tensor, noise_BNHA: torch.Tensor, t_BN: torch.Tensor,
                  ks: torch.Tensor, vs: torch.Tensor, prefix_valid_BP: torch.Tensor) -> torch.Tensor:
        """Elementwise flow-matching loss (v - u)^2, (B, N, H, A), for N (noise, time) pairs per sample."""
        x_t, u = flow_targets(actions_BHA.float()[:, None].expand_as(noise_BNHA), noise_BNHA, t_BN)
        return (self.run_expert(x_t, t_BN, ks, vs, prefix_valid_BP) - u).pow(2)

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        """Training loss (§3): flow MSE over all A dims averaged over N samples + 0.1 stage CE + 0.05 FAST CE.

        Returns (loss scalar, metrics dict of detached scalars).
        """
        cfg = self.cfg
        with_fast = cfg.use_fast_auxiliary and "fast_tokens" in batch
        out, ks, vs, valid, num_fast = self.prefix_cache(batch, with_fast=with_fast)
        actions = batch["actions"].float()
        b = actions.shape[0]
        n = cfg.num_flow_samples
        noise = self.noise.sample((b, n), generator=generator)
        t = sample_time((b, n), generator, device=actions.device)
        action_loss = self.flow_loss(actions, noise, t, ks, vs, valid).mean(dim=(1, 2, 3)).mean()
        logits = self.stage_logits(out, batch["task"])
        stage_loss = F.cross_entropy(logits, batch["stage"])
        loss = action_loss + cfg.stage_loss_weight * stage_loss
        metrics = {"action_loss": action_loss.detach(), "stage_loss": stage_loss.detach(),
                   "stage_acc": (logits.argmax(-1) == batch["stage"]).float().mean().detach()}
        if with_fast:
            fast_logits = self.fast_token_proj(out[:, out.shape[1] - num_fast:]).float()
            tokens, tmask = batch["fast_tokens"], batch["fast_mask"].float()
            ce = F.cross_entropy(fast_logits.transpose(1, 2), tokens, reduction="none")
            per_sample = (ce * tmask).sum(1) / tmask.sum(1).clamp(min=1.0)
            fast_loss = per_sample.mean()
            loss = loss + cfg.fast_loss_weight * fast_loss
            correct = ((fast_logits.argmax(-1) == tokens).float() * tmask).sum() / tmask.sum().clamp(min=1.0)
            metrics.update(fast_loss=fast_loss.detach(), fast_acc=correct.detach())
        metrics["loss"] = loss.detach()
        return loss, metrics

    # --- inference -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def expected_actions(self, batch: dict[str, torch.Tensor], *, generator: torch.Generator | None = None
                         ) -> torch.Tensor:
        """One-step estimate of E[actions | observation] (B, H, A), normalised.

        At t = 1 the input is pure noise z, and the trained velocity is E[z - a | obs, z] = z - E[a | obs], so
        z - v(z, 1) is the conditional mean: a cheap, sampling-free quantity for offline evaluation.
        """
        _, ks, vs, valid, _ = self.prefix_cache(batch, with_fast=False)
        b = ks.shape[1]
        z = self.noise.sample((b,), generator=generator)
        v = self.run_expert(z[:, None], torch.ones(b, 1, device=z.device), ks, vs, valid)[:, 0]
        return z - v

    @torch.no_grad()
    def sample_actions(self, batch: dict[str, torch.Tensor], *, num_steps: int | None = None,
                       initial_actions: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       noise: torch.Tensor | None = None, per_sample_guard: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised action chunk (B, H, A) and stage logits (B, stages) from one prefix pass + Euler steps.

        `initial_actions` (B, k, A): normalised kept actions for soft, correlation-aware inpainting (§4.1).
        `noise` (B, H, A): the x at t = 1 (default: drawn from self.noise with `generator`).
        `per_sample_guard`: the inpainting's max-correction skip is decided per row (see Inpainter).
        """
        out, ks, vs, valid, _ = self.prefix_cache(batch, with_fast=False)
        logits = self.stage_logits(out, batch["task"])
        b = out.shape[0]
        z = self.noise.sample((b,), generator=generator) if noise is None else noise.to(out.device, torch.float32)
        inpaint = None
        if initial_actions is not None:
            inpainter = self._inpainter(per_sample_guard)
            state = inpainter.start(initial_actions.float(), z)

            def inpaint(x: torch.Tensor, t_new: float) -> torch.Tensor:
                return inpainter.apply(x, t_new, state)

        x = self.denoise(z, ks, vs, valid, num_steps=num_steps or self.cfg.num_inference_steps, inpaint=inpaint)
        return x, logits

    def denoise(self, noise_BHA: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, prefix_valid_BP: torch.Tensor,
                *, num_steps: int, inpaint: Callable[[torch.Tensor, float], torch.Tensor] | None = None
                ) -> torch.Tensor:
        """Euler integration from x = noise at t = 1 to t ~ 0 over a (transformed) prefix cache (flow.sample_loop)."""

        def velocity(x_BHA: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
            return self.run_expert(x_BHA[:, None], t_B[:, None], ks, vs, prefix_valid_BP)[:, 0]

        return sample_loop(velocity, noise_BHA, num_steps=num_steps, inpaint=inpaint)
