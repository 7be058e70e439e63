"""The README's main job (`b1k-train demo`) runs end to end and reports what it promises."""

import re
import subprocess
import sys


def test_demo_runs_and_reports_shapes_and_rate(tmp_path):
    out = subprocess.run([sys.executable, "-m", "trainer", "demo", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert re.search(r"images\s+\(16, 3, 224, 224, 3\)\s+torch.uint8", text)
    assert re.search(r"actions\s+\(16, 30, 32\)\s+torch.float32", text)
    rate = float(re.search(r"loader rate after warm-up: ([0-9.]+) samples/s", text).group(1))
    assert rate > 0
    assert (tmp_path / "shards" / "manifest.json").exists()
    assert (tmp_path / "shards" / "norm_stats.json").exists()
    # A second run reuses every finished stage.
    again = subprocess.run([sys.executable, "-m", "trainer", "demo", "--workdir", str(tmp_path)],
                           capture_output=True, text=True, timeout=400)
    assert again.returncode == 0 and "dataset already present" in again.stdout
