"""What running the fine-tunes of `b1k-train pipeline` concurrently buys, and what an idempotent re-run costs.

The tiny two-stage pipeline (3 synthetic tasks, fine-tunes {0,1} and {40}, 1 worker each) runs twice on a local
Ray cluster and local files: once with the fine-tunes in sequence (finetune.max_concurrent=1, the baseline) and
once concurrently (as many as the cluster has room for). Then the concurrent one is re-run, which should train
nothing. Ratio = concurrent / sequential wall time of the fine-tune stage.

    .venv/bin/python bench/pipeline_bench.py     # ~4 min on 2 cores

`--demo` times `b1k-train demo` itself (a fresh work directory per run, as scripts/demo.sh runs it) with the
machine's load before and after and each stage's seconds from pipeline.json; `--baseline-tree DIR` (a checkout
of an older commit, e.g. `git worktree add /tmp/base <rev>`) runs that tree's demo alternately with this one, so
both see the same load, and prints the ratio of the medians:

    .venv/bin/python bench/pipeline_bench.py --demo --repeat 2 --baseline-tree /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_env() -> dict[str, str]:
    """The `export K=V` lines of scripts/env.sh: what scripts/demo.sh sets before `b1k-train demo`."""
    with open(os.path.join(REPO, "scripts", "env.sh")) as f:
        pairs = [line.split(None, 1)[1].strip().split("=", 1) for line in f if line.startswith("export ")]
    return dict(pairs)


def demo_once(tree: str, workdir: str) -> dict:
    """One `b1k-train demo` of the code in `tree` (its own modules first on the path, for the driver and the Ray
    workers it starts): wall seconds, load before/after, pipeline.json's stage timings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_URI", "RAY_ADDRESS"))}
    env.update(demo_env(), PYTHONPATH=tree)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "trainer", "demo", "--workdir", workdir], cwd=tree, env=env,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"demo of {tree} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    with open(os.path.join(workdir, "runs", "demo", "pipeline.json")) as f:
        timings = json.load(f).get("timings", {})
    return {"tree": tree, "seconds": round(seconds, 1), "load_before": round(load0, 2),
            "load_after": round(os.getloadavg()[0], 2),
            "stages": {k: v["seconds"] for k, v in timings.items()}}


def demo_main(repeat: int, baseline_tree: str | None) -> None:
    trees = [REPO] + ([os.path.abspath(baseline_tree)] if baseline_tree else [])
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="b1k-demo-bench-") as tmp:
        for i in range(repeat):
            for tree in (trees if i % 2 == 0 else trees[::-1]):  # alternate who goes first
                run = demo_once(tree, os.path.join(tmp, f"{len(runs)}"))
                runs.append(run)
                print(json.dumps(run), flush=True)
    median = {t: statistics.median(r["seconds"] for r in runs if r["tree"] == t) for t in trees}
    print(f"demo: this tree median {median[REPO]:.1f} s over {repeat} run(s)", end="")
    if baseline_tree:
        base = median[trees[1]]
        print(f"; baseline {trees[1]} {base:.1f} s -> ratio {median[REPO] / base:.2f}x", end="")
    print(f"; {os.cpu_count()} CPUs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--finetune-steps", type=int, default=16)
    p.add_argument("--demo", action="store_true", help="time `b1k-train demo` end to end instead")
    p.add_argument("--repeat", type=int, default=2, help="--demo: runs per tree")
    p.add_argument("--baseline-tree", help="--demo: a checkout of the code to compare against, run alternately")
    args = p.parse_args()
    if args.demo:
        demo_main(args.repeat, args.baseline_tree)
        return
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
