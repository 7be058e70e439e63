"""The step loop of one training attempt: data -> forward/backward -> step -> log -> checkpoint, plus the
in-attempt recovery (non-finite steps, rollback), fault-injection hooks and the progress watchdog."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from trainer import optim
from trainer.recovery import NonFiniteGuard, SampleAudit, agreed_rollback_checkpoint
from trainer.watchdog import ProgressWatchdog

log = logging.getLogger(__name__)


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


@dataclasses.dataclass(kw_only=True)
class StepRunner:
    cfg: Any
    engine: Any
    loader: Any
    manager: Any
    tracker: Any
    progress: Any
    groups: list[dict]
    accum: int
    rank: int
    world: int
    flops: float
    device: torch.device
    faults: Any
    run_dir: str

    def run(self, step: int) -> None:
        """Train from `step` (the restored one) to cfg.num_steps."""
        from trainer.loop import step_generator

        cfg, engine = self.cfg, self.engine
        restored = self.manager.train_state or {}
        guard = NonFiniteGuard(cfg.resilience.nan_max_consecutive,
                               skipped=int(restored.get("nonfinite_skipped", 0)),
                               rollbacks=int(restored.get("nonfinite_rollbacks", 0)))
        audit = SampleAudit(self.run_dir, self.rank, enabled=cfg.data.audit)
        audit.rewind(step)
        watchdog = (ProgressWatchdog(cfg.resilience.watchdog_s, what=f"training on rank {self.rank}")
                    if cfg.resilience.watchdog_s else None)
        it = iter(self.loader)
        window: dict[str, float] = {}
        metrics: dict[str, float] = {}
        last_block_s = 0.0
        try:
            while step < cfg.num_steps:
                self.manager.check_uploads()
                self.faults.before_step(step + 1)
                poison = self.faults.nan_this_step(step + 1)
                engine.set_lrs(optim.group_lrs(step, self.groups, cfg.optim))
                t_start = time.perf_counter()
                data_wait = 0.0
                sums: dict[str, float] = {}
                batches = []
                for micro in range(self.accum):
                    t0 = time.perf_counter()
                    batch = next(it)
                    data_wait += time.perf_counter() - t0
                    batches.append(batch)
                    if poison:
                        batch = self.faults.poison(batch)
                    out = engine.forward_backward(batch, generator=step_generator(cfg.seed, step, self.rank, micro),
                                                  is_last_micro=micro == self.accum - 1)
                    for k, v in out.items():
                        sums[k] = sums.get(k, 0.0) + float(v) / self.accum
                t_fb = time.perf_counter()
                grad_norm = engine.step()  # a non-finite global norm has skipped the update on every rank
                t_end = time.perf_counter()
                if watchdog:
                    watchdog.beat()
                action = guard.observe(grad_norm)
                if action != "ok":
                    log.warning("step %d: non-finite gradient norm (%s); update skipped (%d in a row)", step + 1,
                                grad_norm, guard.consecutive or cfg.resilience.nan_max_consecutive)
                    if action == "rollback":
                        target = agreed_rollback_checkpoint(self.run_dir, _latest_path())
                        step = self.manager.restore(target, data=False)
                        print(f"[train] rank {self.rank}: {cfg.resilience.nan_max_consecutive} non-finite steps "
                              f"in a row; rolled back to step {step}, continuing with the next data", flush=True)
                    continue
                audit.record(step + 1, batches)
                step += 1
                for k, v in {**sums, "grad_norm": grad_norm, "time/data_wait_s": data_wait,
                             "time/forward_backward_s": t_fb - t_start - data_wait, "time/optimizer_s": t_end - t_fb,
                             "time/step_s": t_end - t_start}.items():
                    window[k] = window.get(k, 0.0) + float(v)
                window["_n"] = window.get("_n", 0.0) + 1
                if step % cfg.log_every == 0 or step == cfg.num_steps:
                    metrics = self._log(step, window, guard, last_block_s)
                    window = {}
                if step % cfg.save_every == 0 or step == cfg.num_steps:
                    self.manager.tracking_run_id = self.tracker.run_id  # may appear late if the server was down
                    last_block_s = self.manager.save(
                        step, {k: v for k, v in metrics.items() if not k.startswith("lr/")},
                        extra={"nonfinite_skipped": guard.skipped, "nonfinite_rollbacks": guard.rollbacks})
                    if watchdog:
                        watchdog.beat()
        finally:
            if watchdog:
                watchdog.stop()

    def _log(self, step: int, window: dict[str, float], guard: NonFiniteGuard, last_block_s: float
             ) -> dict[str, float]:
        cfg = self.cfg
        n = window.pop("_n")
        metrics = mean_across_ranks({k: v / n for k, v in window.items()}, self.device)
        step_s = metrics["time/step_s"]
        metrics["samples_per_s"] = cfg.global_batch_size / step_s
        metrics["mfu"] = self.flops * cfg.global_batch_size / step_s / (cfg.peak_tflops_per_worker * 1e12 * self.world)
        metrics["data_wait_share"] = metrics["time/data_wait_s"] / step_s
        metrics["world_size"] = float(self.world)
        metrics["time/checkpoint_block_s"] = last_block_s
        metrics["checkpoint/upload_retries"] = float(self.manager.upload_failures)
        metrics.update(guard.counters())
        for g, lr in zip(self.groups, optim.group_lrs(step - 1, self.groups, cfg.optim)):
            metrics[f"lr/{g['name']}"] = lr
        self.tracker.log_metrics(metrics, step=step)
        self.progress.update(step, metrics)
        return metrics


def _latest_path() -> str | None:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    return ckpt.path if ckpt is not None else None
