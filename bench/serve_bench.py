"""Policy server overhead and batching throughput (tiny model, loopback).

Latency: the same observation sequence is answered (a) in-process (parse -> control session -> model, the
baseline) and (b) by `b1k-train serve` in its own process over a websocket, from a client that behaves as the
evaluator does. Reported per step (most steps come from the planned chunk) and per inference step
(`chunking=false`: every step runs the model). Overhead = server p50 - in-process p50.

Throughput: 1, 4 and 16 concurrent clients, every step an inference (chunking off), with batching on
(window 2 ms, max batch 16) and off (`--no-batching`). Ratio = steps/s batching on / off.

    .venv/bin/python bench/serve_bench.py     # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving.control.session import ControlSession  # noqa: E402
from serving.observation import parse_observation  # noqa: E402
from serving.policy import ServingPolicy  # noqa: E402
from serving.wire import pack  # noqa: E402
from tests.evaluator_client import EvaluatorClient  # noqa: E402
from tests.serving_support import make_artifacts, observation  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(xs, 50)), 3), "p99": round(float(np.percentile(xs, 99)), 3)}


def in_process(export: str, observations: list[dict], overrides: list[str]) -> list[float]:
    """ms per step for the policy called directly: decode is skipped, everything after it is the same."""
    policy = ServingPolicy.load(export, overrides=overrides)
    session, out = ControlSession(), []
    for obs in observations:
        t0 = time.perf_counter()
        parsed = parse_observation(obs, num_tasks=50)
        session.begin(parsed.task, policy.info(parsed.task))
        if session.needs_inference():
            session.accept(parsed.state, policy.infer([session.request(parsed.images, parsed.state)])[0])
        session.next_action()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


class Server:
    def __init__(self, export: str, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "trainer", "serve", "--model", export, "--port",
                                      str(self.port), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def over_websocket(export: str, observations: list[dict], overrides: list[str]) -> list[float]:
    srv = Server(export, *[a for o in overrides for a in ("--set", o)])
    try:
        client, out = EvaluatorClient("127.0.0.1", srv.port), []
        frames = [pack(o) for o in observations]  # encoding is the client's cost, not the server's
        for frame in frames:
            t0 = time.perf_counter()
            client.ws.send(frame)
            client.ws.recv(timeout=60)
            out.append((time.perf_counter() - t0) * 1e3)
        client.close()
    finally:
        srv.stop()
    return out


def throughput(export: str, clients: int, batching: bool, seconds: float) -> dict:
    srv = Server(export, "--set", "chunking=false", *([] if batching else ["--no-batching"]))
    frames = [pack(observation(t, seed=i)) for i, t in enumerate((0, 1, 40) * 4)]
    counts = [0] * clients
    stop = threading.Event()

    def run(i: int) -> None:
        c = EvaluatorClient("127.0.0.1", srv.port)
        c.act(observation(0))  # warm
        start.wait()
        n = 0
        while not stop.is_set():
            c.ws.send(frames[(i + n) % len(frames)])
            c.ws.recv(timeout=120)
            n += 1
        counts[i] = n
        c.close()

    start = threading.Event()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    try:
        for t in threads:
            t.start()
        time.sleep(2.0)
        start.set()
        t0 = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        elapsed = time.perf_counter() - t0
    finally:
        srv.stop()
    return {"clients": clients, "batching": batching, "steps_per_s": round(sum(counts) / elapsed, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="b1k-serve-bench-") as root:
        export = make_artifacts(Path(root))["a"]
        obs = [observation(0, seed=i) for i in range(args.steps)]
        result: dict = {"latency_ms": {}, "throughput": []}
        for label, overrides, steps in (("chunked", [], obs), ("every_step_inference", ["chunking=false"],
                                                                obs[: args.steps // 4])):
            base = in_process(export, steps, overrides)
            ws = over_websocket(export, steps, overrides)
            result["latency_ms"][label] = {
                "in_process": pct(base), "server": pct(ws),
                "overhead_p50_ms": round(float(np.percentile(ws, 50) - np.percentile(base, 50)), 3)}
        for clients in (1, 4, 16):
            on = throughput(export, clients, True, args.seconds)
            off = throughput(export, clients, False, args.seconds)
            result["throughput"].append({"clients": clients, "batching_on": on["steps_per_s"],
                                         "batching_off": off["steps_per_s"],
                                         "ratio_on_over_off": round(on["steps_per_s"] / off["steps_per_s"], 2)})
    print(json.dumps(result, indent=1))
    lat = result["latency_ms"]["chunked"]
    print(f"server overhead p50 {lat['overhead_p50_ms']:.2f} ms per step (server {lat['server']['p50']:.2f} ms vs "
          f"in-process {lat['in_process']['p50']:.2f} ms); batching ratio at 16 clients "
          f"{result['throughput'][-1]['ratio_on_over_off']:.2f}x")


if __name__ == "__main__":
    main()
