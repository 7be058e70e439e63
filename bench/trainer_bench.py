"""Trainer overhead: a 1-worker `b1k-train fit` vs. a bare single-process PyTorch loop on the same tiny model,
data, batch and optimizer; plus the data-wait share of the fit's step time.

Targets: fit time per sample <= 1.15x the bare loop's; data wait < 5% of step time.

    .venv/bin/python bench/trainer_bench.py [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from data_loaders.norm_stats import NormStats  # noqa: E402
from data_loaders.stream import StreamConfig, StreamLoader  # noqa: E402
from models.pi_behavior.config import tiny  # noqa: E402
from models.pi_behavior.fast import FastTokenizer  # noqa: E402
from models.pi_behavior.model import PiBehavior  # noqa: E402
from trainer import optim  # noqa: E402
from trainer.data_prep import prepare_data  # noqa: E402
from trainer.launch import fit  # noqa: E402
from trainer.overrides import apply_overrides  # noqa: E402
from trainer.recipes import get_recipe  # noqa: E402

WARMUP = 10


def bare_loop(cfg, data, steps: int) -> float:
    """Seconds per sample of a plain loop: next(batch) -> forward/backward (accumulated) -> clip -> AdamW."""
    torch.manual_seed(0)
    norm, fast = NormStats.load(data.norm_stats), FastTokenizer.load(data.fast_tokenizer)
    model = PiBehavior(tiny())
    model.set_action_correlation(torch.tensor(norm.action_correlation_cholesky))
    groups = optim.build_param_groups(model, cfg.optim)
    opt = optim.build_optimizer(groups, cfg.optim)
    loader = StreamLoader(data.shards, StreamConfig(batch_size=cfg.micro_batch_size, num_workers=cfg.data.num_workers,
                                                    shards_per_group=cfg.data.shards_per_group),
                          norm_stats=norm, fast_tokenizer=fast, max_fast_tokens=tiny().max_fast_tokens)
    accum = cfg.grad_accum_steps(1)
    it = iter(loader)
    times = []
    for step in range(WARMUP + steps):
        t0 = time.perf_counter()
        for micro in range(accum):
            loss, _ = model(next(it), generator=torch.Generator().manual_seed(step * accum + micro))
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
        optim.apply_lrs(opt, optim.group_lrs(step, groups, cfg.optim))
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[WARMUP:]) / cfg.global_batch_size


def fit_run(cfg, workdir: str, steps: int, overrides: list[str]) -> tuple[float, float]:
    """(seconds per sample, data-wait share) of a 1-worker fit, from its logged step-time windows."""
    from mlflow import MlflowClient

    from checkpoints.manager import read_train_state

    cfg = apply_overrides(cfg, [f"num_steps={WARMUP + steps}", "log_every=5", f"save_every={WARMUP + steps}",
                                *overrides])
    summary = fit(cfg, run_name="bench", storage_url=workdir, num_workers=1)
    run_id = read_train_state(summary["checkpoint"])["tracking_run_id"]
    client = MlflowClient(f"sqlite:///{summary['run_dir']}/mlflow/mlflow.db")

    def series(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
                if m.step > WARMUP]

    return statistics.median(series("time/step_s")) / cfg.global_batch_size, statistics.median(
        series("data_wait_share"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the fit run only, e.g. cpu_threads=2")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="b1k-trainer-bench-")
    cfg = get_recipe("pi_behavior_debug")
    data = prepare_data(cfg, os.path.join(workdir, "data-run"))
    cfg = apply_overrides(cfg, [f"data.shards={data.shards}"])
    bare = bare_loop(cfg, data, args.steps)
    fitted, wait_share = fit_run(cfg, workdir, args.steps, args.set)
    print(f"\nmachine: {os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"bare loop:         {1000 * bare:.2f} ms/sample ({1 / bare:.1f} samples/s)")
    print(f"b1k-train fit (1): {1000 * fitted:.2f} ms/sample ({1 / fitted:.1f} samples/s)")
    print(f"fit / bare time per sample: {fitted / bare:.3f}x (target <= 1.15x); "
          f"data wait {100 * wait_share:.1f}% of step time (target < 5%)")


if __name__ == "__main__":
    main()
