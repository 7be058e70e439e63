"""Killing what a test started, all of it."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil


def kill_process_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` (started with start_new_session=True), its process group and every descendant, then reap it.
    A local Ray cluster's raylet and workers run in sessions of their own, so the group alone is not enough."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
