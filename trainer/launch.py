"""`b1k-train fit`: prepare data on the driver, then run the training loop on a Ray Train worker group.

Connects to the Ray cluster in RAY_ADDRESS or starts a local one. The run lives at <storage>/<run-name>;
re-running the same name and storage resumes from its latest committed checkpoint (Ray restores the
controller's checkpoint snapshot from storage).
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
import uuid
from typing import Any

import torch

from checkpoints.retention import KeepPeriodCallback, committed_checkpoints, sweep_orphans
from data_loaders import storage
from trainer.config import TrainConfig
from trainer.data_prep import prepare_data
from trainer.supervisor import check_worker_range, parse_workers, supervise
from trainer.user_paths import absolute_config_paths, absolute_url, check_local_storage

log = logging.getLogger(__name__)


def ray_storage(url: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray's RunConfig from a local path, file:// or s3:// URL."""
    fs, path = storage.resolve(url)
    if storage.is_local(fs):
        os.makedirs(path, exist_ok=True)
        return os.path.abspath(path), None
    import pyarrow.fs as pafs

    # Ray writes through a pyarrow filesystem; wrapping fsspec keeps AWS_ENDPOINT_URL / credentials handling.
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def check_storage_writable(url: str) -> None:
    """Fail early, with the fix, when the run's storage cannot be written."""
    check_local_storage(url)
    local = storage.is_local(storage.resolve(url)[0])
    # A name of its own per check: concurrent fits under one storage root (the pipeline's fine-tunes) would
    # otherwise delete each other's probe and report a writable store as unwritable.
    fs, path = storage.resolve(storage.join(url, f".b1k-write-check-{os.getpid()}-{uuid.uuid4().hex[:12]}"))
    try:
        storage.write_bytes_atomic(fs, path, b"ok")
        fs.rm(path)
    except Exception as e:  # noqa: BLE001 - any backend error means the same thing to the user
        fix = ("pass a directory you can write to" if local else
               "check the URL, the bucket's existence and your credentials (AWS_* variables, AWS_ENDPOINT_URL)")
        raise PermissionError(f"cannot write to --storage {url} ({type(e).__name__}: {e}); {fix}") from e


# Worker environment of the one-machine clusters we start (the driver's own values win):
LOCAL_CLUSTER_ENV = {
    # Tearing down a failed group waits this long for destroy_process_group on ranks that may be stuck in a
    # collective or dead (Ray's default: 30 s per failure); a restart needs no graceful goodbye.
    "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": os.environ.get("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", "5"),
    # gloo pairs bind to the loopback interface, not to whatever the hostname resolves to.
    "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
}

# Driver environment of the one-machine clusters we start, read by Ray Train on the driver and handed to its
# controller (the user's values win). Ray Train's preemption watcher polls for the node being drained, which an
# autoscaler does to spot nodes and which never happens to this machine: an actor process per fit (a ~1 s import on
# 2 cores, and an error line on every run) for nothing.
LOCAL_DRIVER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def _loopback_only() -> None:
    """Keep a one-machine cluster on 127.0.0.1. Ray replaces a loopback node address with the LAN address
    unless it runs in single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when ray is imported,
    hence also set on the already-imported constant); the processes ray.init starts inherit the variable."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _session_auth_token() -> None:
    """Token auth for the local cluster without writing ~/.ray/auth_token.

    A new local `ray.init()` in Ray 2.60 turns token auth on and, lacking a token, saves one to ~/.ray/auth_token;
    from then on every later `ray start`/`ray job submit` of the user's switches token auth on too. A token in
    RAY_AUTH_TOKEN instead lives only in this process and the cluster processes it starts. A user's own choice
    (RAY_AUTH_MODE, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) is left as it is."""
    if any(os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        return
    from trainer.redact import REDACTOR

    token = secrets.token_hex(32)
    REDACTOR.add(token)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = token
    # ray caches its config and token at import: refresh both, as Ray's own _enable_token_auth does.
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def init_ray(num_workers: int) -> None:
    """Connect to RAY_ADDRESS, or start a one-machine cluster with room for `num_workers` training workers."""
    from trainer import ray_logs

    ray_logs.configure_env()  # also when called from Python, not the CLI (bench/, tests)
    import ray

    ray_logs.plain_ray_driver_log()
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # A fresh local cluster; "local" never attaches to a stale one left by a killed head. Its workers get the
        # driver's storage/tracking endpoints (a remote cluster has its own runtime environment instead).
        passthrough = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "MLFLOW_"))}
        passthrough.update(LOCAL_CLUSTER_ENV)
        for key, value in LOCAL_DRIVER_ENV.items():
            os.environ.setdefault(key, value)
        _loopback_only()
        _session_auth_token()
        # Everything binds to loopback: a one-machine cluster has no reason to listen on other interfaces.
        ray.init(address="local", num_cpus=max(num_workers + 1, os.cpu_count() or 2), dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", log_to_driver=True, runtime_env={"env_vars": passthrough})
    ray_logs.install_filter()


def fit(cfg: TrainConfig, *, run_name: str, storage_url: str, num_workers: int | str | tuple[int, int],
        loop_extra: dict[str, Any] | None = None, data_run_dir: str | None = None) -> dict[str, Any]:
    """Train (or resume) run `run_name` under `storage_url` on `num_workers` Ray workers (N, "MIN:MAX" or
    (MIN, MAX) for elastic) through failures (trainer/supervisor.py); returns a summary."""
    # Workers run in a Ray session directory: every path must be absolute before it reaches them.
    storage_url = absolute_url(storage_url)
    data_run_dir = absolute_url(data_run_dir)
    cfg = absolute_config_paths(cfg)
    lo, hi = num_workers if isinstance(num_workers, tuple) else parse_workers(num_workers)
    check_worker_range(cfg, lo, hi)  # raises if the global batch cannot be split over some worker count
    cfg.fault.check()
    check_storage_writable(storage_url)
    run_dir = storage.join(storage_url, run_name)
    data = prepare_data(cfg, data_run_dir or run_dir)
    init_ray(hi)
    use_gpu = _workers_use_gpu()
    loop_config = {"config": cfg, "data": data, "run_dir": run_dir, "run_name": run_name,
                   "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI"), **(loop_extra or {})}

    def attempt(_: int):
        return _fit_attempt(cfg, loop_config, run_name=run_name, storage_url=storage_url, workers=(lo, hi),
                            use_gpu=use_gpu)

    result = supervise(attempt, run_dir_url=run_dir, resilience=cfg.resilience,
                       before_attempt=lambda: sweep_orphans(run_dir))
    # Ray reports paths inside its filesystem (no scheme for S3); hand back URLs the rest of the CLI accepts.
    checkpoint = storage.join(run_dir, os.path.basename(result.checkpoint.path)) if result.checkpoint else None
    summary = {"run_dir": run_dir, "checkpoint": checkpoint,
               "metrics": dict(result.metrics or {})}
    log.info("run %s finished: %s", run_name, summary)
    return summary


def _workers_use_gpu() -> bool:
    import ray

    from trainer.resources import USE_GPU_ENV, workers_use_gpu

    return workers_use_gpu(env_value=os.environ.get(USE_GPU_ENV), driver_has_cuda=torch.cuda.is_available(),
                           cluster_gpus=float(ray.cluster_resources().get("GPU", 0)))


def _fit_attempt(cfg: TrainConfig, loop_config: dict[str, Any], *, run_name: str, storage_url: str,
                 workers: tuple[int, int], use_gpu: bool) -> Any:
    """One Ray Train fit with Ray's own retries off: failures go back to the supervisor."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainer.loop import train_loop
    from trainer.parallel import nccl_env
    from trainer.ray_backend import NodeAddressTorchConfig

    storage_path, storage_fs = ray_storage(storage_url)
    TorchTrainer = _without_unused_dataset_actor(TorchTrainer)  # noqa: N806 - a class
    tracking_dir = os.path.join(tempfile.gettempdir(), "b1k-train-mlflow", run_name) \
        if not storage.is_local(storage.resolve(storage_url)[0]) else os.path.join(storage_path, run_name, "mlflow")
    lo, hi = workers
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={**loop_config, "tracking_dir": tracking_dir},
        torch_config=NodeAddressTorchConfig(backend="nccl" if use_gpu else "gloo",
                                            timeout_s=int(cfg.resilience.collective_timeout_s)),
        scaling_config=ScalingConfig(num_workers=hi if lo == hi else (lo, hi), use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1} if not use_gpu else None,
                                     elastic_resize_monitor_interval_s=cfg.resilience.elastic_resize_interval_s),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=0),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_last),
                             callbacks=[KeepPeriodCallback(loop_config["run_dir"], cfg.keep_period)],
                             worker_runtime_env={"env_vars": nccl_env(use_gpu=use_gpu)} if use_gpu else None),
    )
    return trainer.fit()


def _without_unused_dataset_actor(trainer_cls: type) -> type:
    """`trainer_cls` minus Ray Train's DatasetsCallback when the trainer is given no Ray Datasets (ours read
    shards themselves): that callback starts a DatasetManager actor for every fit regardless, one more process
    importing ray.data (~3 s of CPU on 2 cores, at the same time as the training worker starts)."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    class Trainer(trainer_cls):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    Trainer.__name__ = Trainer.__qualname__ = trainer_cls.__name__
    return Trainer


def latest_committed_checkpoint(run_dir_url: str) -> str:
    """URL of the newest checkpoint Ray committed for the run (from its checkpoint manager snapshot)."""
    names = committed_checkpoints(run_dir_url)
    if not names:
        raise FileNotFoundError(f"{run_dir_url} has no committed checkpoint yet")
    return storage.join(run_dir_url, names[-1])


def export(cfg: TrainConfig, *, run_name: str, storage_url: str, checkpoint: str | None = None,
           out: str | None = None) -> str:
    """Write the serving artifact of a checkpoint (default: the run's latest) with a worker group of the size
    that trained it, restoring through the same engine code as training; returns the artifact URL."""
    from checkpoints.manager import read_train_state

    storage_url, checkpoint, out = absolute_url(storage_url), absolute_url(checkpoint), absolute_url(out)
    run_dir = storage.join(storage_url, run_name)
    ckpt = checkpoint or latest_committed_checkpoint(run_dir)
    state = read_train_state(ckpt)
    out = out or storage.join(run_dir, "exports", f"step_{state['step']:09d}")
    scratch = tempfile.mkdtemp(prefix="b1k-export-run-")
    fit(cfg, run_name=f"export-{run_name}-{state['step']}", storage_url=scratch,
        num_workers=int(state["world_size"]), data_run_dir=run_dir,
        loop_extra={"export_only": True, "restore_from": ckpt, "export_to": out})
    return out
