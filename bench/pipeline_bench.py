"""What running the fine-tunes of `b1k-train pipeline` concurrently buys, and what an idempotent re-run costs.

The tiny two-stage pipeline (3 synthetic tasks, fine-tunes {0,1} and {40}, 1 worker each) runs twice on a local
Ray cluster and local files: once with the fine-tunes in sequence (finetune.max_concurrent=1, the baseline) and
once concurrently (as many as the cluster has room for). Then the concurrent one is re-run, which should train
nothing. Ratio = concurrent / sequential wall time of the fine-tune stage.

    .venv/bin/python bench/pipeline_bench.py     # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # each pipeline gets its own local SQLite registry

from trainer.overrides import apply_overrides  # noqa: E402
from trainer.pipeline import Pipeline  # noqa: E402
from trainer.recipes import get_pipeline  # noqa: E402


def run(root: str, name: str, overrides: list[str]) -> tuple[dict, float]:
    cfg = apply_overrides(get_pipeline("pi_behavior_debug_2stage"), overrides)
    t0 = time.perf_counter()
    summary = Pipeline(cfg, run_name=name, storage_url=root, out=lambda line: None).run()
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the pipeline exported its own; the next one picks a new one
    return summary, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--finetune-steps", type=int, default=16)
    args = p.parse_args()
    common = ["train.num_steps=4", f"finetune.num_steps={args.finetune_steps}", "finetune.save_every=8",
              "eval.include_pretrain=false"]
    with tempfile.TemporaryDirectory(prefix="b1k-pipeline-bench-") as root:
        seq, seq_total = run(root, "sequential", [*common, "finetune.max_concurrent=1"])
        par, par_total = run(root, "concurrent", common)
        again, rerun_total = run(root, "concurrent", common)
    s, c = seq["timings"]["finetunes"], par["timings"]["finetunes"]
    result = {
        "finetune_steps": args.finetune_steps,
        "sequential_finetunes_s": s["seconds"], "concurrent_finetunes_s": c["seconds"],
        "concurrent_at_once": c["concurrent"],
        "ratio_concurrent_over_sequential": round(c["seconds"] / s["seconds"], 3),
        "pipeline_total_s": {"sequential": round(seq_total, 1), "concurrent": round(par_total, 1)},
        "rerun_s": round(rerun_total, 1), "rerun_trained": again["trained"],
    }
    print(json.dumps(result, indent=1))
    print(f"fine-tune stage: sequential {s['seconds']:.1f} s, concurrent ({c['concurrent']} at once) "
          f"{c['seconds']:.1f} s -> ratio {result['ratio_concurrent_over_sequential']:.2f}x; "
          f"idempotent re-run {rerun_total:.1f} s")


if __name__ == "__main__":
    main()
