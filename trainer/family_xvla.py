"""What the training loop does differently for the X-VLA family: model, initialisation, data transform, FLOPs
estimate and the export (the published X-VLA BEHAVIOR layout plus what the policy server needs)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any

import torch

from data_loaders import storage
from data_loaders.norm_stats import NormStats
from data_loaders.stream import StreamConfig, StreamLoader
from data_loaders.xvla_transform import XVLASampleTransform
from models.xvla.config import XVLAConfig, get_config
from trainer.config import TrainConfig

log = logging.getLogger(__name__)


def model_config(cfg: TrainConfig) -> XVLAConfig:
    return get_config(cfg.model)


def build_model_fn(cfg: TrainConfig):
    from models.xvla.model import XVLA

    model_cfg = model_config(cfg)
    return lambda: XVLA(model_cfg)


def tokenizer_dir(cfg: TrainConfig) -> str | None:
    """Where the BART tokenizer comes from: the init checkpoint (X-VLA-Pt ships it; an s3:// one is copied
    locally once), else none (byte-level)."""
    from models.xvla.checkpoint import localize

    kind, _, path = cfg.init_from.partition(":")
    if kind in ("xvla", "export") and path and not path.startswith("models:/"):
        return localize(path)
    return None


def load_tokenizer(cfg: TrainConfig):
    from models.xvla.tokenizer import BYTE_LEVEL_VOCAB_SIZE, load_tokenizer

    tok = load_tokenizer(tokenizer_dir(cfg))
    vocab = model_config(cfg).text.vocab_size
    if len(tok) > vocab:
        raise ValueError(f"the tokenizer has {len(tok)} ids but model {cfg.model} embeds {vocab}; the full model "
                         f"needs X-VLA-Pt's BART tokenizer: --set init_from=xvla:/path/to/X-VLA-Pt")
    if cfg.model == "full" and len(tok) <= BYTE_LEVEL_VOCAB_SIZE:
        raise ValueError("the full X-VLA needs its BART tokenizer (51289 ids): --set init_from=xvla:/path/to/X-VLA-Pt")
    return tok


def make_init_fn(cfg: TrainConfig, norm: NormStats, device: torch.device):
    def init(model) -> None:
        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=device)
        model.init_weights()
        kind, _, path = cfg.init_from.partition(":")
        if kind == "xvla":
            from models.xvla.checkpoint import localize
            from models.xvla.weights import detect_layout, load_xvla_pretrained

            local = localize(path)
            layout, doc = detect_layout(local)  # one line naming the expected files for anything else
            variant = True if "num_tasks" in doc or "num_skills" in doc or layout == "b1k-train" else None
            report = load_xvla_pretrained(model, local, allow_reinit=cfg.allow_reinit, variant_file=variant)
            log.info("initialised from %s (%s layout): %s\n%s", cfg.init_from, layout, report.summary(),
                     report.format())
        elif kind == "export":
            from checkpoints.model_uri import resolve_model_url
            from trainer.loop import read_safetensors
            from trainer.parallel import load_full_state_dict

            path = resolve_model_url(path)
            tensors = read_safetensors(storage.join(path, "model.safetensors"))
            if "vlm.image_projection" in tensors:  # the published layout (exports since issue 20)
                from models.xvla.checkpoint import B1K_FILE, b1k_from_json
                from models.xvla.weights import from_published_tensors

                fs, p = storage.resolve(storage.join(path, B1K_FILE))
                _, extras = b1k_from_json(json.loads(fs.cat_file(p)), where=f"{path}/{B1K_FILE}")
                own = {k: v for k, v in model.state_dict().items()}
                tensors = {**from_published_tensors(tensors, own, where=f"{path}/model.safetensors"), **extras}
            tensors.setdefault("skill_row_mask", torch.ones(model.cfg.num_skills))  # exports from before it
            load_full_state_dict(model, tensors)
            log.info("initialised from the export %s", path)
        try:
            weights = norm.skill_class_weights(model.cfg.num_skills)
            model.set_skill_class_weights(torch.tensor(weights, dtype=torch.float32))
        except ValueError as e:
            log.warning("skill cross-entropy unweighted: %s", e)
        if norm.skill_counts is not None and norm.skill_counts.any():
            from data_loaders.instructions import skill_rows_used

            # Rows this data never labels cannot be predicted (nor pull probability in the cross-entropy).
            model.set_skill_rows_used(torch.from_numpy(skill_rows_used(norm.skill_counts, model.cfg.num_skills)))
    return init


def make_loader(cfg: TrainConfig, data, rank: int, world: int) -> StreamLoader:
    from data_loaders.augment import AugmentConfig
    from data_loaders.instructions import (
        SKILL_TEMPLATES,
        required_text_len,
        task_sentence,
    )
    from data_loaders.manifest import load_manifest

    model_cfg = model_config(cfg)
    tokenizer, tasks = load_tokenizer(cfg), load_manifest(data.shards).tasks
    need = required_text_len(tokenizer, [task_sentence(t, tasks) for t in sorted(tasks)] or ["x"],
                             [t.format(*["coffee table"] * 3) for t in SKILL_TEMPLATES.values()])
    if need > model_cfg.max_text_len and rank == 0:
        log.warning("the longest enriched instruction needs %d tokens, max_text_len is %d: long task sentences "
                    "are shortened (skill phrases are kept whole)", need, model_cfg.max_text_len)
    transform = XVLASampleTransform(tokenizer=tokenizer, max_text_len=model_cfg.max_text_len, instructions=tasks,
                                    augment=AugmentConfig() if cfg.data.augment else None)
    return StreamLoader(data.shards, StreamConfig(
        batch_size=cfg.micro_batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers,
        shards_per_group=cfg.data.shards_per_group, train=cfg.data.augment), rank=rank, world_size=world,
        transform=transform)


def flops_per_sample(model_cfg: XVLAConfig) -> float:
    """Training FLOPs per sample, a rough count for MFU: 6 x parameters x tokens each part processes (DaViT's
    early stages see more positions than this counts, so it is a lower bound)."""
    from models.xvla.model import XVLA

    with torch.device("meta"):
        m = XVLA(model_cfg)
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    seq = model_cfg.sequence_length + model_cfg.len_soft_prompts
    vis = count(m.vlm.vision_tower) * model_cfg.num_views * (model_cfg.tokens_per_view - 1)
    text = count(m.vlm.language_model) * (model_cfg.tokens_per_view + model_cfg.max_text_len)
    core = count(m.transformer) * seq
    return 6.0 * (vis + text + core)


def export(state: dict[str, torch.Tensor], cfg: TrainConfig, data, out_url: str, *, step: int,
           extra_state: dict[str, Any] | None, keep_copy_in: str | None = None,
           optimizer_state: dict[str, Any] | None = None) -> str:
    """The published X-VLA BEHAVIOR layout (models/xvla/checkpoint.py: model.safetensors under the published
    names, config.json with the published fields only, b1k.json with ours, optimizer.pt, tokenizer files,
    state.json last) plus the policy server's norm_stats.json, instructions.json and serving.json (XVLA_SETTINGS:
    no stage head, no inpainting, none of pi-behavior's speed-up or correction rules).

    `optimizer_state`: the full optimizer state (torch's state_dict() layout, groups with our "param_names");
    written as optimizer.pt in published form. Without it there is no optimizer.pt."""
    from checkpoints.export import NORM_FILE, publish_staged
    from data_loaders.manifest import load_manifest
    from models.xvla.checkpoint import OPTIMIZER_FILE, published_optimizer_state, write_published_files
    from models.xvla.model import XVLA
    from serving.config import SERVING_FILE, XVLA_SETTINGS, ServingConfig
    from serving.policy_xvla import INSTRUCTIONS_FILE

    model_cfg = model_config(cfg)
    staging = keep_copy_in or tempfile.mkdtemp(prefix="b1k-xvla-export-")
    try:
        write_published_files(staging, {k: v.detach().float() for k, v in state.items()}, model_cfg,
                              config_extra={"train": {"recipe": cfg.recipe, "model": cfg.model}})
        if optimizer_state is not None:
            with torch.device("meta"):
                names = XVLA(model_cfg)  # parameter names only
            torch.save(published_optimizer_state(names, state=optimizer_state),
                       os.path.join(staging, OPTIMIZER_FILE))
        load_tokenizer(cfg).save_pretrained(staging)
        fs_n, p_n = storage.resolve(data.norm_stats)
        fs_n.get(p_n, os.path.join(staging, NORM_FILE))
        with open(os.path.join(staging, INSTRUCTIONS_FILE), "w") as f:
            json.dump({str(k): v for k, v in load_manifest(data.shards).tasks.items()}, f, indent=1)
        with open(os.path.join(staging, SERVING_FILE), "w") as f:
            f.write(ServingConfig(**XVLA_SETTINGS).to_json())
        publish_staged(staging, out_url, step=step, extra_state=extra_state, keep_state_copy=bool(keep_copy_in))
    finally:
        if not keep_copy_in:
            shutil.rmtree(staging, ignore_errors=True)
    return out_url
