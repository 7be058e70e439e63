"""`b1k-train data shard`: real synthetic dataset -> real shards on disk and on the S3 server, checked sample by
sample against the source; the webdataset library reads them; SIGKILL + re-run equals an uninterrupted run;
bad episodes and settings mismatches are refused or recorded.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from data_loaders.behavior_facts import CAMERAS, SKILL_INDEX, TASK_NUM_STAGES
from data_loaders.episode import DatasetError
from data_loaders.lerobot_source import LeRobotSource
from data_loaders.manifest import iter_tar_samples, load_manifest, read_shard_bytes
from data_loaders.sample_format import IMAGE_FORMATS, decode_sample
from data_loaders.sharder import shard_dataset
from data_loaders.synth import synthesize

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FRAMES = 45  # with 16 samples per shard: two full shards and a partial one per episode
SPS = 16


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("src") / "ds")
    synthesize(out, tasks=[0, 40], episodes_per_task=2, frames=FRAMES, seed=0, resolution="low")
    return out


@pytest.fixture(scope="module")
def local_run(src, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("out") / "shards")
    return out, shard_dataset(src, out, workers=2, samples_per_shard=SPS, progress=False)


def shard_cmd(src: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainer", "data", "shard", src, out, "--workers", "1",
            "--samples-per-shard", str(SPS), *extra]


def decoded_samples(out: str):
    """(shard info, key, decoded sample) for every sample of every shard the manifest lists, in order."""
    m = load_manifest(out)
    for sh in m.shards:
        for key, files in iter_tar_samples(read_shard_bytes(m, sh), where=sh.name):
            yield sh, key, decode_sample(files, image_format=m.image_format, where=f"{sh.name}:{key}")


def annotated_skill(annotation: dict, t: int) -> dict | None:
    for item in annotation["skill_annotation"]:
        start, end = item["frame_duration"]
        if start <= t < end:
            return item
    return None


def test_local_shards_equal_source_frame_by_frame(src, local_run):
    out, raw = local_run
    source = LeRobotSource(src)
    refs = source.episodes()
    assert len(refs) == 4 and raw["num_episodes"] == 4 and raw["skipped_episodes"] == []
    assert raw["num_samples"] == sum(r.length for r in refs) == 4 * FRAMES
    assert [e["episode_index"] for e in raw["episodes"]] == [r.episode_index for r in refs]
    # Every shard on disk is listed, every listed shard matches its size and checksum.
    assert sorted(s["name"] for s in raw["shards"]) == sorted(os.path.basename(p) for p in glob.glob(f"{out}/*.tar"))
    for s in raw["shards"]:
        data = Path(out, s["name"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (s["bytes"], s["sha256"])
    assert [s["num_samples"] for s in raw["shards"]] == [16, 16, 13] * 4

    samples = {}
    for sh, key, d in decoded_samples(out):
        ep, t = d["meta"]["episode"], d["meta"]["frame"]
        assert key == f"e{ep:08d}_f{t:06d}" and sh.episode_index == ep
        assert sh.first_frame <= t < sh.first_frame + sh.num_samples
        samples[(ep, t)] = d
    assert len(samples) == raw["num_samples"]

    for ref in refs:
        e = ref.episode_index
        episode = source.read_episode(e)
        annotation = json.loads(Path(src, source.annotation_file(e)).read_text())
        frames = list(source.iter_rgb_frames(e, size=224))
        T, n = ref.length, TASK_NUM_STAGES[ref.task_index]
        for t in range(T):
            d = samples[(e, t)]
            np.testing.assert_array_equal(d["state"], episode.state[t])
            expected_chunk = np.stack([episode.actions[min(t + k, T - 1)] for k in range(30)])
            np.testing.assert_array_equal(d["actions"], expected_chunk)
            assert d["action_mask"].tolist() == [t + k < T for k in range(30)]
            skill = annotated_skill(annotation, t)
            sid = skill["skill_id"][0] if skill else -1
            assert d["meta"] == {
                "episode": e, "frame": t, "timestamp": t / 30.0, "episode_length": T, "task": ref.task_index,
                "stage": min(int(np.floor(t / (T / n))), n - 1), "num_stages": n,
                "skill_id": sid, "skill_index": SKILL_INDEX.get(sid, -1), "skill_valid": sid in SKILL_INDEX,
                "skill_description": skill["skill_description"][0] if skill else "",
                "skill_objects": skill["object_id"][0] if skill else [],
            }
            assert d["images"].shape == (3, 224, 224, 3)
            for i, cam in enumerate(CAMERAS):
                assert np.abs(d["images"][i].astype(int) - frames[t][cam].astype(int)).mean() < 3.0, (e, t, cam)
    # The synthetic annotations end before the episode does, so frames without a skill are covered too.
    assert any(d["meta"]["skill_id"] == -1 for d in samples.values())
    assert len({d["meta"]["stage"] for d in samples.values()}) > 1


def test_webdataset_library_reads_the_shards(local_run):
    import webdataset as wds

    out, raw = local_run
    paths = [str(Path(out, s["name"])) for s in raw["shards"]]
    got = [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in wds.WebDataset(
        paths, shardshuffle=False)]
    ext = IMAGE_FORMATS[raw["settings"]["image_format"]]
    members = sorted(["action_mask.npy", "actions.npy", f"head.{ext}", f"left_wrist.{ext}", "meta.json",
                      f"right_wrist.{ext}", "state.npy"])
    assert got == [(f"e{e['episode_index']:08d}_f{t:06d}", members) for e in raw["episodes"] for t in range(FRAMES)]


def test_s3_output_is_identical_and_rerun_is_noop(src, local_run, s3_bucket, s3fs_client, caplog):
    out = f"{s3_bucket}/behavior/shards"
    raw = shard_dataset(src, out, workers=2, samples_per_shard=SPS, progress=False)
    local_out, local_raw = local_run
    assert raw == local_raw  # deterministic: same bytes wherever and however many workers wrote them
    assert s3fs_client.cat_file(f"{out}/manifest.json") == Path(local_out, "manifest.json").read_bytes()
    m = load_manifest(out)
    for sh in m.shards:
        read_shard_bytes(m, sh, verify=True)

    def stamps() -> dict[str, object]:
        s3fs_client.invalidate_cache()
        return {p: info["LastModified"] for p, info in s3fs_client.find(out, detail=True).items()}

    before = stamps()
    assert shard_dataset(src, out, workers=2, samples_per_shard=SPS, progress=False) == raw
    assert stamps() == before
    # Resume on S3: without the manifest and with one shard lost, only that shard's episode is converted again.
    lost = raw["shards"][4]
    s3fs_client.rm([f"{out}/manifest.json", f"{out}/{lost['name']}"])
    with caplog.at_level(logging.INFO, logger="data_loaders.sharder"):
        assert shard_dataset(src, out, workers=2, samples_per_shard=SPS, progress=False) == raw
    assert "4 episodes, 3 already converted, 0 skipped, 1 to convert" in caplog.text
    after = stamps()
    prefix = f"{out.removeprefix('s3://')}/shard-{lost['episode_index']:08d}-"
    untouched = {p: t for p, t in before.items() if not p.startswith(prefix) and "_parts/episode_" not in p
                 and not p.endswith("manifest.json")}
    assert {p: after[p] for p in untouched} == untouched and lost["name"] in str(after)


def test_rerun_of_finished_conversion_rewrites_nothing(src, local_run):
    out, raw = local_run
    stamp = {p: os.stat(p).st_mtime_ns for p in glob.glob(f"{out}/**", recursive=True)}
    assert shard_dataset(src, out, workers=2, samples_per_shard=SPS, progress=False) == raw
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(f"{out}/**", recursive=True)} == stamp


def test_sigkill_then_rerun_equals_uninterrupted_run(src, local_run, tmp_path):
    out = str(tmp_path / "killed")
    proc = subprocess.Popen(shard_cmd(src, out), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not glob.glob(f"{out}/_parts/episode_*.json") and not glob.glob(f"{out}/shard-*.tar"):
            assert proc.poll() is None, "the conversion ended before it could be killed"
            assert time.monotonic() < deadline, "no shard appeared within 60 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not os.path.exists(f"{out}/manifest.json")
        # The orphaned pool worker notices its parent is gone and exits on its own.
        deadline = time.monotonic() + 10
        while True:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "a pool worker outlived the killed conversion"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    done = subprocess.run(shard_cmd(src, out), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(out, "manifest.json").read_bytes() == Path(local_run[0], "manifest.json").read_bytes()


def truncate_video(path: str, keep: int) -> None:
    """Re-encode `path` (PyAV, same codec) with only its first `keep` frames."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        codec, rate = stream.codec_context.name, stream.average_rate
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    tmp = path + ".short.mp4"
    with av.open(tmp, "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for img in frames[:keep]:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    os.replace(tmp, path)


def test_short_video_errors_or_is_skipped_and_recorded(src, tmp_path):
    bad_src = str(tmp_path / "bad_src")
    shutil.copytree(src, bad_src)
    source = LeRobotSource(bad_src)
    bad = source.episodes()[-1].episode_index
    video = source.rgb_video_url(bad, "head")
    truncate_video(video, FRAMES - 5)
    rel_video = os.path.relpath(video, bad_src)

    out = str(tmp_path / "out")
    with pytest.raises(DatasetError, match=re.escape(rel_video)):
        shard_dataset(bad_src, out, workers=2, samples_per_shard=SPS, progress=False)
    assert not os.path.exists(f"{out}/manifest.json")

    done = subprocess.run(shard_cmd(bad_src, out, "--on-bad-episode", "skip"), cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "from 3 episodes (1 skipped)" in done.stdout
    raw = load_manifest(out).raw
    assert [s["episode_index"] for s in raw["skipped_episodes"]] == [bad]
    assert rel_video in raw["skipped_episodes"][0]["reason"]
    assert json.loads(Path(out, "_parts", f"skipped_{bad:08d}.json").read_text())["episode_index"] == bad
    assert bad not in [e["episode_index"] for e in raw["episodes"]]
    assert all(s["episode_index"] != bad for s in raw["shards"]) and raw["num_samples"] == 3 * FRAMES
    # Under "error" a conversion that skipped episodes is not accepted as finished: the episode is retried.
    with pytest.raises(DatasetError, match="re-encode the video"):
        shard_dataset(bad_src, out, workers=1, samples_per_shard=SPS, progress=False)


def test_rerun_with_other_settings_or_bad_arguments_is_refused(src, local_run):
    out, _ = local_run
    with pytest.raises(ValueError, match=r"different settings.*samples_per_shard.*use a new OUT"):
        shard_dataset(src, out, workers=1, samples_per_shard=SPS // 2, progress=False)
    with pytest.raises(ValueError, match=r"settings\.quality"):
        shard_dataset(src, out, workers=1, samples_per_shard=SPS, quality=50, progress=False)
    for kwargs, msg in [({"workers": 0}, "workers must be >= 1"),
                        ({"workers": 1, "samples_per_shard": 0}, "samples_per_shard must be >= 1"),
                        ({"workers": 1, "quality": 101}, "quality must be in 1..100"),
                        ({"workers": 1, "on_bad_episode": "ignore"}, "on_bad_episode must be one of")]:
        with pytest.raises(ValueError, match=msg):
            shard_dataset(src, out, progress=False, **kwargs)
