"""The per-worker training loop (runs inside each Ray Train worker; also callable without Ray for tests).

build (data, model on meta -> parallelize -> materialize/load, optimizer) -> restore -> plain loop:
    lr for the step -> grad-accumulated forward/backward -> clip + step + EMA -> log -> checkpoint.
Randomness of a step (flow noise and times) comes from a generator keyed by (seed, step, rank, micro-step), so
a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from typing import Any

import torch

from checkpoints.manager import CheckpointManager
from data_loaders import storage
from data_loaders.norm_stats import NormStats
from data_loaders.stream import StreamConfig, StreamLoader
from models.pi_behavior.config import get_config
from models.pi_behavior.fast import FastTokenizer
from models.pi_behavior.flops import flops_per_sample
from models.pi_behavior.model import PiBehavior
from trainer import optim
from trainer.config import TrainConfig
from trainer.faults import FaultInjector
from trainer.overrides import flatten
from trainer.parallel import build_engine, select_device_and_backend, select_precision
from trainer.progress import ProgressLine
from trainer.resources import torch_threads
from trainer.steps import StepRunner
from trainer.tracking import make_tracker

log = logging.getLogger(__name__)


def step_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}/{micro}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def build_model_fn(cfg: TrainConfig):
    model_cfg = get_config(cfg.model)
    return lambda: PiBehavior(model_cfg)


def make_init_fn(cfg: TrainConfig, norm: NormStats, device: torch.device):
    def init(model: PiBehavior) -> None:
        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=device)
        model.init_weights()
        kind, _, path = cfg.init_from.partition(":")
        if kind in ("export", "openpi"):
            # A b1k-train serving artifact (e.g. the 50-task pretrain for a fine-tune): every module's weights.
            # Registry URIs (export:models:/NAME@champion) resolve to a cached local copy, openpi/1st-place
            # checkpoints (openpi:<dir>, or export:<dir> of one) to a cached import.
            if kind == "openpi":
                path = "openpi:" + path
            from checkpoints.export import MODEL_FILE
            from checkpoints.model_uri import resolve_model_url
            from trainer.parallel import load_full_state_dict

            path = resolve_model_url(path)

            load_full_state_dict(model, read_safetensors(storage.join(path, MODEL_FILE)))
            log.info("initialised from the export %s", path)
        elif kind:
            from models.pi_behavior import weights

            report = (weights.load_paligemma if kind == "paligemma" else weights.load_pi05)(model, path)
            log.info("initialised from %s: %s", cfg.init_from, report.summary())
        model.set_action_correlation(torch.tensor(norm.action_correlation_cholesky))
    return init


def read_safetensors(url: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_bytes

    fs, path = storage.resolve(url)
    return load_bytes(fs.cat_file(path))


def _quiet_ray_worker_logs() -> None:
    """Logs a person can read. Ray's worker-side "Checkpoint successfully created" comes before the checkpoint is
    committed (the controller says "committed" once it is: checkpoints/retention.py) and "Reporting training result"
    dumps every metric dict: both go to DEBUG. Ray Train also re-routes print() through the root logger while
    echoing it to a wrapped stdout (ours redacts secrets), which printed every progress line twice."""
    import builtins

    from ray.train.v2._internal.execution import context as ray_context
    from ray.train.v2._internal.logging import patch_print

    level = logging.DEBUG if os.environ.get("B1K_DEBUG") else logging.WARNING
    logging.getLogger("ray.train.v2._internal.execution").setLevel(level)
    logging.getLogger(ray_context.__file__).setLevel(level)  # that module names its logger by file path
    builtins.print = getattr(patch_print, "_original_print", builtins.print)


def train_tag(loop_config: dict[str, Any]) -> str:
    """What this run's own lines start with: "[train]", or "[train <stage>]" in a pipeline (loop_config "stage"),
    whose fine-tunes print at the same time."""
    stage = loop_config.get("stage")
    return f"[train {stage}]" if stage else "[train]"


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. loop_config: {"config": TrainConfig, "data": DataArtifacts, "run_dir": URL,
    "run_name": str, "tracking_dir": local dir for the default MLflow store}."""
    import ray.train

    from trainer import redact

    redact.install()  # this worker's logs and output: same protection as the driver's
    _quiet_ray_worker_logs()
    cfg: TrainConfig = loop_config["config"]
    data = loop_config["data"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    device, _ = select_device_and_backend()
    if device.type == "cpu":
        # Ranks sharing a host split its cores; default threading oversubscribes them several times over.
        torch.set_num_threads(torch_threads(requested=cfg.cpu_threads, cpu_count=os.cpu_count() or 1,
                                            local_world_size=ctx.get_local_world_size(),
                                            loader_workers=cfg.data.num_workers))
    precision = select_precision(cfg.precision, device)
    accum = cfg.grad_accum_steps(world)
    norm = NormStats.load(data.norm_stats)
    if cfg.family == "xvla":
        from trainer import family_xvla as fam

        model_cfg = fam.model_config(cfg)
        loader = fam.make_loader(cfg, data, rank, world)
        model_fn, init_fn = fam.build_model_fn(cfg), fam.make_init_fn(cfg, norm, device)
        flops = fam.flops_per_sample(model_cfg)
    else:
        model_cfg = get_config(cfg.model)
        fast = FastTokenizer.load(data.fast_tokenizer)
        loader = StreamLoader(data.shards, StreamConfig(
            batch_size=cfg.micro_batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers,
            shards_per_group=cfg.data.shards_per_group, train=cfg.data.augment), rank=rank, world_size=world,
            norm_stats=norm, fast_tokenizer=fast, max_fast_tokens=model_cfg.max_fast_tokens)
        model_fn, init_fn = build_model_fn(cfg), make_init_fn(cfg, norm, device)
        flops = flops_per_sample(model_cfg)["total"]
    groups_holder: dict[str, list[dict]] = {}

    def param_groups(model):
        groups_holder["groups"] = optim.build_param_groups(model, cfg.optim)
        return groups_holder["groups"]

    engine = build_engine(cfg.strategy, model_fn, init_fn=init_fn,
                          param_groups_fn=param_groups, optimizer_fn=lambda g: optim.build_optimizer(g, cfg.optim),
                          precision=precision, grad_accum_steps=accum, grad_clip_norm=cfg.optim.grad_clip_norm,
                          activation_checkpointing=cfg.activation_checkpointing, ema_decay=cfg.optim.ema_decay,
                          micro_batch_size=cfg.micro_batch_size)
    groups = groups_holder["groups"]
    # Goes into checkpoints, config.json, the export and MLflow params: never with a credential in it.
    config_dict = redact.REDACTOR.obj({k: (list(v) if isinstance(v, tuple) else v) for k, v in flatten(cfg).items()})
    faults = FaultInjector(cfg.fault, rank=rank, run_dir_url=loop_config["run_dir"], seed=cfg.seed)
    res = cfg.resilience
    manager = CheckpointManager(engine=engine, loader=loader, config_dict=config_dict, rank=rank, world_size=world,
                                run_dir_url=loop_config["run_dir"], workers_per_rank=max(1, cfg.data.num_workers),
                                async_upload=res.async_checkpoint, upload_retries=res.upload_retries,
                                upload_backoff_s=res.upload_backoff_s,
                                before_upload=faults.maybe_storage_error if cfg.fault.enabled else None)
    step = manager.restore(loop_config.get("restore_from"))
    tag = train_tag(loop_config)
    print(f"{tag} rank {rank}/{world}: starting at step {step} with {accum} micro-batches per step "
          f"(rendezvous {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})", flush=True)
    tracker = make_tracker(rank)
    manager.tracking_run_id = tracker.start(run_dir_uri=loop_config["run_dir"],
                                            experiment=loop_config.get("experiment", "b1k-train"),
                                            run_name=loop_config["run_name"],
                                            resume_run_id=manager.tracking_run_id,
                                            tracking_uri=loop_config.get("tracking_uri"),
                                            local_dir=loop_config["tracking_dir"])
    if step == 0:
        tracker.log_params({k: str(v) for k, v in config_dict.items()})
    progress = ProgressLine(total_steps=cfg.num_steps, start_step=step, enabled=rank == 0, tag=tag)
    try:
        if not loop_config.get("export_only"):
            run = StepRunner(cfg=cfg, engine=engine, loader=loader, manager=manager, tracker=tracker,
                             progress=progress, groups=groups, accum=accum, rank=rank, world=world, flops=flops,
                             device=device, faults=faults, run_dir=loop_config["run_dir"])
            run.run(step)
        _export(engine, cfg, model_cfg, config_dict, data, loop_config, rank, tracker,
                step=max(step, cfg.num_steps) if not loop_config.get("export_only") else step)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    progress.close()


def _export(engine, cfg, model_cfg, config_dict, data, loop_config, rank, tracker, *, step: int) -> None:
    """Collective: gather the EMA weights (raw weights without EMA) and write the serving artifact on rank 0."""
    from checkpoints.export import export_artifact

    state = engine.full_model_state_dict(ema=cfg.optim.ema_decay is not None)
    if rank != 0:
        return
    out = loop_config.get("export_to") or f"{loop_config['run_dir']}/export"
    with tempfile.TemporaryDirectory(prefix="b1k-export-") as tmp:
        extra = {"mlflow_run_id": tracker.run_id} if tracker.run_id else None
        if cfg.family == "xvla":
            from trainer import family_xvla

            family_xvla.export(state, cfg, data, out, step=step, extra_state=extra, keep_copy_in=tmp)
        else:
            export_artifact(out, state_dict=state, model_config_name=cfg.model, model_config=model_cfg,
                            train_config=config_dict, norm_stats_url=data.norm_stats,
                            fast_tokenizer_url=data.fast_tokenizer, step=step, keep_copy_in=tmp, extra_state=extra)
        log.info("exported the serving artifact of step %d to %s", step, out)
        print(f"{train_tag(loop_config)} exported step {step} to {out}", flush=True)
        if loop_config.get("export_only"):  # `b1k-train export` of some checkpoint: not the run's final model
            return
        tracker.log_dict({"export": out, "global_step": step}, "export.json")
        tracker.log_dict(config_dict, "config.json")
        tracker.log_artifact(os.path.join(tmp, "norm_stats.json"))
        if cfg.track_export:
            # The run then carries a loadable model (the registry registers runs:/<id>/export).
            tracker.log_artifact(tmp, "export")
