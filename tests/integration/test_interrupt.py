"""Ctrl-C during `b1k-train fit`, as a user does it: the driver says which step is committed and the command that
resumes, and no line ever calls a checkpoint saved before Ray has committed it. (That a re-run resumes from the
last committed checkpoint is proven by the fit and fault-tolerance tests.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from checkpoints.retention import committed_checkpoints
from tests.processes import kill_process_tree

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_ctrl_c_says_what_is_committed_and_the_rerun_resumes_there(tmp_path):
    storage = str(tmp_path / "runs")
    cmd = [sys.executable, "-m", "trainer", "fit", "pi_behavior_debug", "--run-name", "int", "--storage", storage,
           "--workers", "1", "--set", "num_steps=400", "--set", "save_every=2", "--set", "log_every=1"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if re.search(r"\[checkpoint\] step 4 committed", line):
                break
        assert any("[checkpoint] step 4 committed" in x for x in lines), "".join(lines[-40:])
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends to the foreground group
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_process_tree(proc)
    out = "".join(lines) + rest
    assert proc.returncode != 0
    run_dir = os.path.join(storage, "int")
    last = committed_checkpoints(run_dir)[-1]
    step = int(last.rsplit("_", 1)[-1])
    m = re.search(r"\[b1k-train\] interrupted: the last committed checkpoint, (checkpoint_\d{9}), is intact "
                  r"\(step (\d+)\); re-running (.+) resumes from it", out)
    assert m, out[-3000:]
    assert (m.group(1), int(m.group(2))) == (last, step)
    assert m.group(3).startswith("b1k-train fit pi_behavior_debug --run-name int --storage"), m.group(3)
    assert "Checkpoint successfully created" not in out and "Reporting training result" not in out, out[-3000:]
    # Every "committed" line names a checkpoint that Ray did commit.
    said = {int(s) for s in re.findall(r"\[checkpoint\] step (\d+) committed", out)}
    assert said and max(said) <= step, (said, step)
