"""Rank 0's progress line: step, loss, throughput, MFU, data-wait share and ETA, at every log step."""

from __future__ import annotations

import sys
import time


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressLine:
    def __init__(self, *, total_steps: int, start_step: int, enabled: bool, stream=None, tag: str = "[train]"):
        """`tag` starts every line: "[train]", or "[train <stage>]" for a pipeline stage, so that the lines of
        fine-tunes running at once can be told apart."""
        self.total, self.enabled, self.tag = total_steps, enabled, tag
        self.stream = stream or sys.stdout
        self.t0, self.s0 = time.perf_counter(), start_step

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.s0) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        print(f"{self.tag} step {step}/{self.total} ({100.0 * step / self.total:.1f}%) "
              f"loss {metrics.get('loss', float('nan')):.4f} "
              f"action {metrics.get('action_loss', float('nan')):.4f} "
              f"{metrics.get('samples_per_s', 0.0):.1f} samples/s "
              f"mfu {100.0 * metrics.get('mfu', 0.0):.2f}% "
              f"data-wait {100.0 * metrics.get('data_wait_share', 0.0):.1f}% "
              f"eta {_fmt_duration(eta) if eta != float('inf') else '?'}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(f"{self.tag} done in {_fmt_duration(time.perf_counter() - self.t0)}", file=self.stream, flush=True)
