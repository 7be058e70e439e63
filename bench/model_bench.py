"""pi-behavior on the CPU: training-step and sample_actions time (tiny config), the batched 15-sample expert
pass vs. a 15-iteration loop, and the full config's analytic FLOPs per sample.

    .venv/bin/python bench/model_bench.py [--batch 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.pi_behavior import config as pb_config  # noqa: E402
from models.pi_behavior.flops import flops_per_sample  # noqa: E402
from models.pi_behavior.model import PiBehavior  # noqa: E402


def make_batch(b: int, fast_len: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"images": torch.randint(0, 256, (b, 3, 224, 224, 3), dtype=torch.uint8, generator=g),
            "state": torch.randn(b, 32, generator=g) * 0.5, "actions": torch.randn(b, 30, 32, generator=g),
            "task": torch.arange(b) % 50, "stage": torch.zeros(b, dtype=torch.long),
            "fast_tokens": torch.randint(0, 1024, (b, fast_len), generator=g),
            "fast_mask": torch.ones(b, fast_len, dtype=torch.bool)}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = pb_config.tiny()
    model = PiBehavior(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = make_batch(args.batch, cfg.max_fast_tokens)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss, _ = model(batch, generator=torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()

    step_s = timed(train_step, args.repeats)
    infer = {k: v for k, v in batch.items() if not k.startswith("fast")}
    sample_s = timed(lambda: model.sample_actions(infer, generator=torch.Generator().manual_seed(0)), args.repeats)

    with torch.no_grad():
        _, ks, vs, valid, _ = model.prefix_cache(infer, with_fast=False)
    n = cfg.num_flow_samples
    x = torch.randn(args.batch, n, 30, 32)
    t = torch.rand(args.batch, n)

    def batched() -> torch.Tensor:
        return model.run_expert(x, t, ks, vs, valid).sum()

    def looped() -> torch.Tensor:
        return sum(model.run_expert(x[:, i:i + 1], t[:, i:i + 1], ks, vs, valid).sum() for i in range(n))

    with torch.no_grad():
        batched_s = timed(batched, args.repeats)
        looped_s = timed(looped, args.repeats)

    full = flops_per_sample(pb_config.full())
    inf = flops_per_sample(pb_config.full(), training=False)
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"tiny config, batch {args.batch}: training step {step_s * 1000:.0f} ms "
          f"({args.batch / step_s:.1f} samples/s), sample_actions ({cfg.num_inference_steps} Euler steps) "
          f"{sample_s * 1000:.0f} ms")
    print(f"expert pass over {n} flow samples: batched {batched_s * 1000:.1f} ms vs {n}-iteration loop "
          f"{looped_s * 1000:.1f} ms -> {looped_s / batched_s:.2f}x faster batched")
    print("full config FLOPs per training sample: " + ", ".join(f"{k} {v / 1e12:.2f} T" for k, v in full.items())
          + f"  (anchor: 14.0 T for pi0.5 with a 200-token prompt; ratio {full['total'] / 14.0e12:.3f})")
    print("full config FLOPs per inference chunk: " + ", ".join(f"{k} {v / 1e12:.2f} T" for k, v in inf.items()))


if __name__ == "__main__":
    main()
