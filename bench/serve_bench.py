"""Policy server overhead and batching throughput (tiny model, loopback).

Latency: the same observation sequence is answered (a) in-process (parse -> control session -> model, the
baseline) and (b) by `b1k-train serve` in its own process over a websocket, from a client that behaves as the
evaluator does. Reported per step (most steps come from the planned chunk) and per inference step
(`chunking=false`: every step runs the model). Overhead = server p50 - in-process p50.

Throughput: 1, 4 and 16 concurrent clients, every step an inference (chunking off), with batching on
(window 2 ms, max batch 16) and off (`--no-batching`). Ratio = steps/s batching on / off.

Heavy neighbours (issue 16): a 224-px evaluator's step latency alone (the baseline) and while 4 other clients,
each in its own process, send maximal frames back to back: three 1024x1024 RGBA cameras (--max-image-side) with
DefaultWrapper's depth and segmentation, 48 MiB each. Ratio = p95 with the heavy clients / p95 alone (target <= 2).

Transport floor (issue 21): a zero-action server with the same wire format (msgpack-numpy, metadata frame,
unanswered resets; like the BEHAVIOR repository's own server returning zeros) and ours, each in its own process,
driven by tests/evaluator_client.StockEvaluator (3 resets, then steps as eval.py sends them) at 224 px and at
720/480. Overhead = ours - floor, p50, on steps answered from the chunk (target <= 1 ms) and on inference steps
(target <= the model's infer_ms + 2 ms).

    .venv/bin/python bench/serve_bench.py                # all parts, ~6 min on 2 cores
    .venv/bin/python bench/serve_bench.py --only heavy   # the heavy-neighbour part, ~1 min
    .venv/bin/python bench/serve_bench.py --only floor   # ours against the transport floor, ~1 min
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
from tests.evaluator_client import EvaluatorClient, StockEvaluator, wait_healthy  # noqa: E402
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


def timed_steps(client: EvaluatorClient, frames: list[bytes]) -> list[float]:
    """ms from sending each (already encoded: that is the client's cost) frame to its reply."""
    out = []
    for frame in frames:
        t0 = time.perf_counter()
        client.ws.send(frame)
        client.ws.recv(timeout=120)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def over_websocket(export: str, observations: list[dict], overrides: list[str]) -> list[float]:
    srv = Server(export, *[a for o in overrides for a in ("--set", o)])
    try:
        client = EvaluatorClient("127.0.0.1", srv.port)
        out = timed_steps(client, [pack(o) for o in observations])
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


def maximal_frame(side: int = 1024) -> bytes:
    """The largest observation the default limits admit: DefaultWrapper's keys with every camera at
    --max-image-side (48 MiB)."""
    obs = observation(0, size=side)
    for key in [k for k in obs if k.endswith("::rgb")]:
        base = key[: -len("::rgb")]
        obs[f"{base}::depth_linear"] = np.ones((side, side), np.float32)
        obs[f"{base}::seg_semantic"] = np.zeros((side, side), np.uint32)
        obs[f"{base}::seg_instance_id"] = np.zeros((side, side), np.uint32)
    return pack(obs)


def heavy_client(port: int) -> None:
    """Runs in its own process: send maximal frames back to back, each after the previous reply, until killed."""
    frame = maximal_frame()
    client = EvaluatorClient("127.0.0.1", port)
    print(f"ready {len(frame)}", flush=True)
    while True:
        client.ws.send(frame)
        client.ws.recv(timeout=300)


def light_steps(port: int, steps: int) -> list[float]:
    client = EvaluatorClient("127.0.0.1", port)
    client.act(observation(0))  # warm
    client.reset()
    out = timed_steps(client, [pack(observation(0, seed=i)) for i in range(steps)])
    client.close()
    return out


def heavy_neighbours(export: str, steps: int, heavy: int = 4, rounds: int = 3) -> dict:
    """Alone and with the heavy clients, alternated `rounds` times (the heavy processes are stopped with SIGSTOP
    in between), so both see the same background load of the machine."""
    srv = Server(export)
    procs: list[subprocess.Popen] = []
    alone: list[float] = []
    loaded: list[float] = []
    try:
        light_steps(srv.port, 20)  # the server is up and warm
        procs = [subprocess.Popen([sys.executable, __file__, "--heavy-client", str(srv.port)], stdout=subprocess.PIPE,
                                  text=True) for _ in range(heavy)]
        sizes = [int(p.stdout.readline().split()[1]) for p in procs]
        for _ in range(rounds):
            for p in procs:
                p.send_signal(signal.SIGSTOP)
            time.sleep(1.0)  # what they had sent is answered
            alone += light_steps(srv.port, steps // rounds)
            for p in procs:
                p.send_signal(signal.SIGCONT)
            time.sleep(2.0)  # steady state
            loaded += light_steps(srv.port, steps // rounds)
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
        srv.stop()
    q = {name: {f"p{k}": round(float(np.percentile(xs, k)), 2) for k in (50, 95, 99)}
         for name, xs in (("alone", alone), ("with_heavy", loaded))}
    return {"heavy_clients": heavy, "heavy_frame_mib": round(sizes[0] / 2**20, 1), "light_steps": len(alone), **q,
            "p95_ratio": round(q["with_heavy"]["p95"] / q["alone"]["p95"], 2)}


def floor_server(port: int) -> None:
    """Runs in its own process: the transport floor, zeros for every observation."""
    import asyncio
    import http

    from websockets.asyncio.server import serve

    from serving.wire import unpack

    zeros = pack({"action": np.zeros(23, np.float32), "server_timing": {"infer_ms": 0.0}})

    async def handler(ws) -> None:
        await ws.send(pack({}))
        async for message in ws:
            if "reset" in unpack(message):
                continue
            await ws.send(zeros)

    def health(connection, request):
        return connection.respond(http.HTTPStatus.OK, "OK\n") if request.path == "/healthz" else None

    async def run() -> None:
        async with serve(handler, "127.0.0.1", port, compression=None, max_size=None, process_request=health):
            await asyncio.Future()

    asyncio.run(run())


def stock_steps(port: int, observations: list[dict]) -> tuple[list[float], list[float]]:
    """ms per act() of the stock client (pack, send, receive, unpack: what eval.py waits for) and the server's
    infer_ms of each step."""
    ev = StockEvaluator("127.0.0.1", port, poll_s=0.2)
    for _ in range(3):
        ev.reset()
    ms, infer = [], []
    for obs in observations:
        t0 = time.perf_counter()
        _, timing = ev.act(obs)
        ms.append((time.perf_counter() - t0) * 1e3)
        infer.append(float(timing.get("infer_ms", 0.0)))
    ev.close()
    return ms, infer


def against_floor(export: str, steps: int) -> dict:
    out = {}
    for label, size, n in (("224px", 224, steps), ("720_480", None, max(steps // 2, 40))):
        frames = [observation(0, size=size, seed=i) for i in range(10)]
        obs = [frames[i % 10] for i in range(n)]
        port = free_port()
        floor = subprocess.Popen([sys.executable, __file__, "--floor-server", str(port)])
        try:
            wait_healthy("127.0.0.1", port)
            stock_steps(port, obs[:20])  # warm
            floor_ms, _ = stock_steps(port, obs)
        finally:
            floor.kill()
            floor.wait(timeout=30)
        srv = Server(export)
        try:
            wait_healthy("127.0.0.1", srv.port, timeout_s=120)
            stock_steps(srv.port, obs[:20])
            ours_ms, infer = stock_steps(srv.port, obs)
        finally:
            srv.stop()
        cached = [m for m, i in zip(ours_ms, infer) if i == 0]
        inferring = [m for m, i in zip(ours_ms, infer) if i > 0]
        f50 = float(np.percentile(floor_ms, 50))
        infer_p50 = float(np.median([i for i in infer if i > 0]))
        out[label] = {"steps": n, "floor_p50": round(f50, 3), "cached_p50": round(float(np.percentile(cached, 50)), 3),
                      "inference_p50": round(float(np.percentile(inferring, 50)), 3),
                      "infer_ms_p50": round(infer_p50, 3),
                      "cached_overhead_p50_ms": round(float(np.percentile(cached, 50)) - f50, 3),
                      "inference_overhead_p50_ms": round(float(np.percentile(inferring, 50)) - f50 - infer_p50, 3)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--only", choices=["heavy", "floor"], default=None, help="run only that part")
    p.add_argument("--heavy-client", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--floor-server", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.heavy_client is not None:
        heavy_client(args.heavy_client)
        return
    if args.floor_server is not None:
        floor_server(args.floor_server)
        return
    with tempfile.TemporaryDirectory(prefix="b1k-serve-bench-") as root:
        export = make_artifacts(Path(root))["a"]
        if args.only == "heavy":
            print(json.dumps(heavy_neighbours(export, args.steps), indent=1))
            return
        if args.only == "floor":
            print(json.dumps(against_floor(export, args.steps), indent=1))
            return
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
        result["heavy_neighbours"] = heavy_neighbours(export, args.steps)
        result["transport_floor"] = against_floor(export, args.steps)
    print(json.dumps(result, indent=1))
    lat = result["latency_ms"]["chunked"]
    print(f"server overhead p50 {lat['overhead_p50_ms']:.2f} ms per step (server {lat['server']['p50']:.2f} ms vs "
          f"in-process {lat['in_process']['p50']:.2f} ms); batching ratio at 16 clients "
          f"{result['throughput'][-1]['ratio_on_over_off']:.2f}x; p95 with 4 heavy clients "
          f"{result['heavy_neighbours']['p95_ratio']:.2f}x alone")


if __name__ == "__main__":
    main()
