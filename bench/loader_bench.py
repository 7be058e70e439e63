"""Loader benchmark: webdataset shards on a local S3 server vs. LeRobot-style random access to the videos.

Everything runs in this one script on this machine:
1. synthesize a full-resolution BEHAVIOR-format dataset (720 head / 480 wrists, HEVC as in the 2025 data);
2. image-encoding study on its 224x224 frames (bytes/sample, decode time, PSNR) -> the shard image format;
3. shard it to a moto S3 server on 127.0.0.1 and stream model-ready batches (decode + normalize + augment +
   collate) with one DataLoader worker; rate per CPU core = samples / CPU-seconds of main + worker processes;
4. baseline: the same samples read the way LeRobot/BEHAVIOR loaders do -- per sample, seek and decode the three
   full-resolution videos from local disk (the kindest case for the baseline), resize to 224, gather the
   parquet rows (table held in memory, like a memory-mapped HF dataset), then the same transforms;
5. print the ratio, bytes/sample and the projection to the full 119,094,660-timestep dataset.

    .venv/bin/python bench/loader_bench.py [--episodes 2] [--frames 300] [--samples 150]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

FULL_DATASET_TIMESTEPS = 119_094_660


def cpu_seconds(proc: psutil.Process, children: bool) -> float:
    t = proc.cpu_times()
    total = t.user + t.system
    if children:
        for c in proc.children(recursive=True):
            try:
                ct = c.cpu_times()
                total += ct.user + ct.system
            except psutil.NoSuchProcess:
                pass
    return total


def encoding_study(source, episodes, n_frames: int) -> list[dict]:
    """Bytes/sample, decode ms/sample and PSNR for candidate shard image encodings on real decoded frames."""
    from data_loaders.sample_format import decode_image, encode_image

    frames = []
    for ep in episodes[:1]:
        for i, cams in enumerate(source.iter_rgb_frames(ep.episode_index, size=224)):
            frames.append([cams[c] for c in ("head", "left_wrist", "right_wrist")])
            if i + 1 == n_frames:
                break
    rows = []
    for fmt, q in (("jpeg", 90), ("jpeg", 95), ("webp", 90), ("png", 0)):
        enc = [[encode_image(img, fmt, q) for img in cams] for cams in frames]
        t0 = time.perf_counter()
        dec = [[decode_image(b) for b in cams] for cams in enc]
        dt = time.perf_counter() - t0
        mse = np.mean([np.mean((a.astype(np.float64) - b) ** 2) for fa, fb in zip(frames, dec) for a, b in zip(fa, fb)])
        psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
        rows.append({"format": fmt, "quality": q, "bytes_per_sample": float(np.mean([sum(map(len, c)) for c in enc])),
                     "decode_ms_per_sample": 1000 * dt / len(frames), "psnr_db": psnr})
    return rows


def bench_shards(shards_url: str, stats, *, num_batches: int, batch_size: int, num_workers: int) -> dict:
    from data_loaders.stream import StreamConfig, StreamLoader

    loader = StreamLoader(shards_url, StreamConfig(batch_size=batch_size, num_workers=num_workers, train=True,
                                                   num_epochs=None), norm_stats=stats)
    me = psutil.Process()
    it = iter(loader)
    next(it)  # warm-up: worker start, first group fetched
    cpu0, t0 = cpu_seconds(me, True), time.perf_counter()
    n = 0
    for i, batch in enumerate(it):
        n += batch["task"].shape[0]
        if i + 1 == num_batches:
            cpu1, t1 = cpu_seconds(me, True), time.perf_counter()
            break
    it.close()
    return {"samples": n, "wall_s": t1 - t0, "cpu_s": cpu1 - cpu0, "samples_per_s": n / (t1 - t0),
            "samples_per_cpu_s": n / (cpu1 - cpu0), "num_workers": num_workers}


def bench_lerobot_random_access(source, stats, sample_ids: list[tuple[int, int]]) -> dict:
    """Per sample: seek+decode 3 full-res videos, resize, gather 30 action rows, same transforms."""
    from PIL import Image

    from data_loaders.augment import AugmentConfig, augment_cameras
    from data_loaders.transforms import Normalizer
    from data_loaders.video_decode import decode_frame_at

    normalizer, aug = Normalizer.from_norm_stats(stats), AugmentConfig()
    tables = {ep: source.read_episode(ep) for ep in sorted({e for e, _ in sample_ids})}  # like a memmapped table
    rng = np.random.default_rng(0)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for ep, f in sample_ids:
        e = tables[ep]
        imgs = [decode_frame_at(source.rgb_video_url(ep, cam), f, source.fps, size=224)
                for cam in ("head", "left_wrist", "right_wrist")]
        idx = np.minimum(np.arange(f, f + 30), e.length - 1)
        normalizer.state(e.state[f])
        normalizer.actions(e.actions[idx], e.state[f])
        augment_cameras([Image.fromarray(i) for i in imgs], rng, aug)
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    n = len(sample_ids)
    return {"samples": n, "wall_s": t1 - t0, "cpu_s": cpu, "samples_per_s": n / (t1 - t0), "samples_per_cpu_s": n / cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=2, help="episodes of task 0 to synthesize")
    ap.add_argument("--frames", type=int, default=300, help="frames per episode")
    ap.add_argument("--samples", type=int, default=120, help="random samples for the baseline")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--formats", default="jpeg,webp", help="shard image formats to compare")
    args = ap.parse_args()

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log

    from data_loaders.lerobot_source import LeRobotSource
    from data_loaders.norm_stats import NormStats
    from data_loaders.sharder import shard_dataset
    from data_loaders.stats import compute_norm_stats
    from data_loaders.synth import synthesize

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    import s3fs

    s3fs.S3FileSystem().mkdir("bench")
    work = args.workdir or tempfile.mkdtemp(prefix="b1k-bench-")
    dataset = os.path.join(work, "dataset")
    results: dict = {"machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                                 "python": platform.python_version()}}
    t = time.perf_counter()
    if not os.path.exists(os.path.join(dataset, "meta", "info.json")):
        print(synthesize(dataset, tasks=[0], episodes_per_task=args.episodes, frames=args.frames, seed=0,
                         resolution="full"))
    print(f"[synth] {time.perf_counter() - t:.1f}s")
    source = LeRobotSource(dataset)
    episodes = source.episodes()

    results["encoding"] = encoding_study(source, episodes, n_frames=min(120, args.frames))
    print("\nimage encoding for 3 x 224x224 per sample (synthetic frames):")
    for r in results["encoding"]:
        print(f"  {r['format']:5s} q{r['quality']:<3d} {r['bytes_per_sample'] / 1024:7.1f} KiB/sample  "
              f"decode {r['decode_ms_per_sample']:5.2f} ms/sample  PSNR {r['psnr_db']:5.1f} dB")

    rng = np.random.default_rng(1)
    ids = [(int(ep.episode_index), int(rng.integers(0, ep.length))) for ep in
           (episodes[i] for i in rng.integers(0, len(episodes), size=args.samples))]
    stats = None
    for fmt in args.formats.split(","):
        shards = f"s3://bench/shards-{fmt}"
        t = time.perf_counter()
        manifest = shard_dataset(dataset, shards, workers=2, samples_per_shard=128, image_format=fmt, quality=90)
        shard_s = time.perf_counter() - t
        bps = sum(s["bytes"] for s in manifest["shards"]) / manifest["num_samples"]
        stats = stats or NormStats.load(compute_norm_stats(shards))
        results[fmt] = {
            "sharding": {"samples": manifest["num_samples"], "seconds": shard_s,
                         "samples_per_s": manifest["num_samples"] / shard_s, "bytes_per_sample": bps,
                         "projected_full_dataset_TB": bps * FULL_DATASET_TIMESTEPS / 1e12},
            "stream_1_worker": bench_shards(shards, stats, num_batches=args.batches, batch_size=args.batch_size,
                                            num_workers=1),
            "stream_2_workers": bench_shards(shards, stats, num_batches=args.batches, batch_size=args.batch_size,
                                             num_workers=2),
        }
    base = results["lerobot_random_access"] = bench_lerobot_random_access(source, stats, ids)
    server.stop()

    print(f"\nLeRobot-style random access (local disk, 1 process): {base['samples_per_s']:.1f} samples/s wall, "
          f"{base['samples_per_cpu_s']:.1f} samples per CPU-second")
    for fmt in args.formats.split(","):
        r = results[fmt]
        s1, s2, sh = r["stream_1_worker"], r["stream_2_workers"], r["sharding"]
        r["ratio_per_core"] = s1["samples_per_cpu_s"] / base["samples_per_cpu_s"]
        print(f"[{fmt}] shards: {sh['bytes_per_sample'] / 1024:.1f} KiB/sample -> "
              f"{sh['projected_full_dataset_TB']:.2f} TB for {FULL_DATASET_TIMESTEPS:,} timesteps; "
              f"conversion {sh['samples_per_s']:.1f} samples/s (2 workers)")
        print(f"[{fmt}] stream from S3, 1 worker:  {s1['samples_per_s']:6.1f} samples/s wall, "
              f"{s1['samples_per_cpu_s']:6.1f} samples per CPU-second")
        print(f"[{fmt}] stream from S3, 2 workers: {s2['samples_per_s']:6.1f} samples/s wall, "
              f"{s2['samples_per_cpu_s']:6.1f} samples per CPU-second")
        print(f"[{fmt}] ratio per core (shards / LeRobot-style): {r['ratio_per_core']:.1f}x "
              f"(targets: >= 150 samples/s/core, >= 20x)")
    out = os.path.join(work, "loader_bench.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
