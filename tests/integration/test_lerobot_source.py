"""LeRobotSource on real files in all three layouts, on a real S3 server, and on deliberately broken copies.

One small synthetic BEHAVIOR dataset (2 tasks x 1 episode x 60 frames, low resolution, HEVC) is written once and
converted to stock LeRobot v2.1 and v3.0; every layout must read back the same episodes.
"""

from __future__ import annotations

import json
import os
import shutil
from fractions import Fraction

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_loaders import video_decode
from data_loaders.behavior_facts import CAMERAS, proprio_to_state
from data_loaders.episode import DatasetError
from data_loaders.layouts import convert_b1k_dataset
from data_loaders.lerobot_source import LeRobotSource, MissingAnnotationError
from data_loaders.synth import synthesize

pytestmark = pytest.mark.integration

FRAMES = 60
LAYOUTS = ("b1k-v2.1", "lerobot-v2.1", "lerobot-v3.0")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lerobot")
    out = {"b1k-v2.1": str(root / "b1k")}
    synthesize(out["b1k-v2.1"], tasks=[0, 40], episodes_per_task=1, frames=FRAMES, seed=3, resolution="low")
    for layout in ("lerobot-v2.1", "lerobot-v3.0"):
        out[layout] = str(root / layout)
        convert_b1k_dataset(out["b1k-v2.1"], out[layout], layout)
    return out


@pytest.fixture(scope="module")
def sources(dirs) -> dict[str, LeRobotSource]:
    return {layout: LeRobotSource(d) for layout, d in dirs.items()}


@pytest.fixture(scope="module")
def reference_frames(sources) -> list[list[dict[str, np.ndarray]]]:
    """Native-resolution frames of every b1k episode, decoded sequentially."""
    src = sources["b1k-v2.1"]
    return [list(src.iter_rgb_frames(ref.episode_index, size=None)) for ref in src.episodes()]


def _paired(sources):
    """(layout, source, b1k ref, ref in that layout) for every layout and episode (stock layouts renumber)."""
    b1k = sources["b1k-v2.1"].episodes()
    for layout, src in sources.items():
        for i, ref in enumerate(src.episodes()):
            yield layout, src, i, b1k[i], ref


def test_layouts_detected_and_episodes_listed_from_meta(sources):
    assert {layout: s.layout for layout, s in sources.items()} == {layout: layout for layout in LAYOUTS}
    b1k = sources["b1k-v2.1"]
    assert [r.task_index for r in b1k.episodes()] == [0, 40]
    assert all(r.episode_index // 10000 == r.task_index and r.length == FRAMES for r in b1k.episodes())
    for layout, src, i, bref, ref in _paired(sources):
        assert src.fps == 30.0
        assert (ref.task_index, ref.length) == (bref.task_index, bref.length)
        if layout != "b1k-v2.1":
            assert ref.episode_index == i
        assert src.task_instructions()[ref.task_index] == b1k.task_instructions()[ref.task_index]
    v21, v30 = sources["lerobot-v2.1"].info, sources["lerobot-v3.0"].info
    assert v21["codebase_version"] == "v2.1" and v21["total_chunks"] == 1 and v21["total_videos"] == 2 * 9
    assert v30["codebase_version"] == "v3.0" and "total_chunks" not in v30 and v30["features"]["action"]["fps"] == 30
    assert v21["data_path"] == "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    assert v30["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"


def test_stock_parquet_has_lerobot_bookkeeping_columns(sources, dirs):
    v30 = pq.read_table(os.path.join(dirs["lerobot-v3.0"], sources["lerobot-v3.0"].data_file(1)))
    v21 = [pq.read_table(os.path.join(dirs["lerobot-v2.1"], sources["lerobot-v2.1"].data_file(i))) for i in (0, 1)]
    for table in (v30, pa.concat_tables(v21)):
        assert table.column("index").to_pylist() == list(range(2 * FRAMES))  # global
        assert table.column("frame_index").to_pylist() == list(range(FRAMES)) * 2  # per episode
        assert table.column("episode_index").to_pylist() == [0] * FRAMES + [1] * FRAMES
        assert table.column("task_index").to_pylist() == [0] * FRAMES + [40] * FRAMES
    meta = pq.read_table(os.path.join(dirs["lerobot-v3.0"], "meta/episodes/chunk-000/file-000.parquet")).to_pylist()
    key = "videos/observation.images.rgb.head"
    assert [(m[f"{key}/from_timestamp"], m[f"{key}/to_timestamp"]) for m in meta] == [(0.0, 2.0), (2.0, 4.0)]
    assert [(m["dataset_from_index"], m["dataset_to_index"]) for m in meta] == [(0, FRAMES), (FRAMES, 2 * FRAMES)]


def test_low_dim_data_identical_across_layouts(sources, dirs):
    b1k = sources["b1k-v2.1"]
    for layout, src, _, bref, ref in _paired(sources):
        want, got = b1k.read_episode(bref.episode_index), src.read_episode(ref.episode_index)
        assert got.task_index == want.task_index and got.length == FRAMES
        for field in ("proprio", "state", "actions", "timestamps"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=f"{layout} {field}")
        np.testing.assert_allclose(got.timestamps, np.arange(FRAMES) / 30.0)
        assert got.state.shape == (FRAMES, 23) and got.actions.shape == (FRAMES, 23)
    # The 23-d state is proprio_to_state of the parquet column itself.
    ref = b1k.episodes()[1]
    table = pq.read_table(os.path.join(dirs["b1k-v2.1"], b1k.data_file(ref.episode_index)))
    column = np.stack(table.column("observation.state").to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_array_equal(b1k.read_episode(ref.episode_index).state, proprio_to_state(column))


def test_skill_segments_match_annotation_json(sources, dirs):
    b1k = sources["b1k-v2.1"]
    for ref in b1k.episodes():
        with open(os.path.join(dirs["b1k-v2.1"], b1k.annotation_file(ref.episode_index))) as f:
            doc = json.load(f)
        ep = b1k.read_episode(ref.episode_index)
        assert ep.has_annotations and len(ep.skills) == len(doc["skill_annotation"]) > 0
        for seg, item in zip(ep.skills, doc["skill_annotation"]):
            assert [seg.start, seg.end] == item["frame_duration"]
            assert (seg.skill_id, seg.description) == (item["skill_id"][0], item["skill_description"][0])
            assert list(seg.object_ids) == item["object_id"][0]
        assert ep.skill_at(ep.skills[0].start) == ep.skills[0]
    for layout in ("lerobot-v2.1", "lerobot-v3.0"):
        ep = sources[layout].read_episode(0)
        assert not ep.has_annotations and ep.skills == ()


def test_rgb_frames_match_across_layouts(sources, reference_frames):
    for layout, src, i, _, ref in _paired(sources):
        frames = list(src.iter_rgb_frames(ref.episode_index, size=None))
        assert len(frames) == FRAMES
        for t, (got, want) in enumerate(zip(frames, reference_frames[i])):
            for cam in CAMERAS:
                assert got[cam].shape == want[cam].shape and got[cam].dtype == np.uint8
                diff = np.abs(got[cam].astype(np.int16) - want[cam]).mean()
                # v2.1 copies the mp4 files; v3.0 re-encodes them (lossy H.264).
                assert diff == 0 if layout != "lerobot-v3.0" else diff < 3, (layout, i, t, cam, diff)
    # Frames differ from episode to episode, so a wrong v3.0 time range would be caught above.
    assert np.abs(reference_frames[0][5]["head"].astype(int) - reference_frames[1][5]["head"]).mean() > 3


def test_iter_rgb_frames_resizes_like_the_evaluator(sources, reference_frames):
    src = sources["lerobot-v2.1"]
    for t, frames in enumerate(src.iter_rgb_frames(1)):  # default size=224
        for cam in CAMERAS:
            assert frames[cam].shape == (224, 224, 3)
            np.testing.assert_array_equal(frames[cam], video_decode.resize_square(reference_frames[1][t][cam], 224))
    wide = np.full((48, 96, 3), 200, np.uint8)
    padded = video_decode.resize_square(wide, 32)
    assert padded.shape == (32, 32, 3)  # 96x48 -> 32x16, centered on black
    assert padded[:8].max() == 0 and padded[24:].max() == 0 and padded[8:24].min() == 200


def test_random_access_equals_sequential_decode(sources, reference_frames):
    for layout in LAYOUTS:
        src = sources[layout]
        for i, ref in enumerate(src.episodes()):
            seq = reference_frames[i] if layout != "lerobot-v3.0" else list(src.iter_rgb_frames(i, size=None))
            for k in (0, 1, 13, 29, 44, FRAMES - 1):
                for cam in ("head", "right_wrist"):
                    np.testing.assert_array_equal(src.decode_rgb_frame(ref.episode_index, cam, k), seq[k][cam],
                                                  err_msg=f"{layout} episode {i} frame {k} {cam}")


def test_random_access_across_open_gop_keyframes(tmp_path):
    """x265's default open GOPs make a seek land past leading pictures; no frame may be skipped or misplaced."""
    path = str(tmp_path / "gop.mp4")
    with av.open(path, mode="w", format="mp4") as out:
        stream = out.add_stream("libx265", rate=30)
        stream.width = stream.height = 48
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "x265-params": "keyint=24:min-keyint=24:scenecut=0:log-level=none"}
        for i in range(100):
            arr = np.zeros((48, 48, 3), np.uint8)
            arr[:, :, 0], arr[i % 48, :, 1], arr[:, (3 * i) % 48, 2] = (5 * i) % 256, 255, 255
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 30)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    seq = list(video_decode.iter_frames(path))
    assert len(seq) == video_decode.count_frames(path) == 100
    for k in range(100):
        np.testing.assert_array_equal(video_decode.decode_frame_at(path, k, 30), seq[k], err_msg=f"frame {k}")
    for start, stop in ((23, 25), (47, 73), (70, 100)):
        part = list(video_decode.iter_frames(path, start_s=start / 30, end_s=stop / 30))
        assert len(part) == stop - start and all(np.array_equal(a, b) for a, b in zip(part, seq[start:stop]))
        assert video_decode.count_frames(path, start=start, stop=stop) == stop - start


def test_frame_counts(sources, dirs):
    for _, src, _, _, ref in _paired(sources):
        for cam in CAMERAS:
            assert src.video_frame_count(ref.episode_index, cam) == FRAMES
    shared = sources["lerobot-v3.0"].rgb_video_url(1, "head")
    assert shared == sources["lerobot-v3.0"].rgb_video_url(0, "head")
    assert video_decode.count_frames(shared) == 2 * FRAMES
    assert video_decode.probe(shared).codec == "h264"


def test_reads_from_s3(dirs, sources, reference_frames, s3_bucket, s3fs_client):
    for layout in ("b1k-v2.1", "lerobot-v3.0"):
        s3fs_client.put(dirs[layout], f"{s3_bucket}/{layout}", recursive=True)
        remote, local = LeRobotSource(f"{s3_bucket}/{layout}"), sources[layout]
        assert remote.layout == layout and remote.episodes() == local.episodes()
        ref = remote.episodes()[1]
        np.testing.assert_array_equal(remote.read_episode(ref.episode_index).state,
                                      local.read_episode(ref.episode_index).state)
        frames = list(remote.iter_rgb_frames(ref.episode_index, size=None))
        local_frames = list(local.iter_rgb_frames(ref.episode_index, size=None))
        assert len(frames) == FRAMES
        for got, want in zip(frames, local_frames):
            for cam in CAMERAS:
                np.testing.assert_array_equal(got[cam], want[cam])
        assert remote.rgb_video_url(ref.episode_index, "head").startswith(s3_bucket)
        np.testing.assert_array_equal(remote.decode_rgb_frame(ref.episode_index, "head", 37), local_frames[37]["head"])
        assert remote.read_episode(ref.episode_index).skills == local.read_episode(ref.episode_index).skills


def test_av1_rgb_decodes(tmp_path, reference_frames):
    out = str(tmp_path / "av1")
    synthesize(out, tasks=[0], episodes_per_task=1, frames=FRAMES, seed=3, resolution="low", codec="av1")
    src = LeRobotSource(out)
    ref = src.episodes()[0]
    assert video_decode.probe(src.rgb_video_url(ref.episode_index, "head")).codec == "av1"
    frames = list(src.iter_rgb_frames(ref.episode_index, size=None))
    assert len(frames) == FRAMES
    for got, want in zip(frames, reference_frames[0]):  # same content as the HEVC episode of task 0
        for cam in CAMERAS:
            assert np.abs(got[cam].astype(np.int16) - want[cam]).mean() < 6
    np.testing.assert_array_equal(src.decode_rgb_frame(ref.episode_index, "left_wrist", 31), frames[31]["left_wrist"])


# --- broken datasets ---------------------------------------------------------------------------------------------


def _reencode_with(path: str, n: int) -> None:
    """Rewrite the mp4 at `path` with its first `n` frames (repeating the last one if n exceeds the original)."""
    frames = list(video_decode.iter_frames(path))
    frames += [frames[-1]] * max(0, n - len(frames))
    with av.open(path, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for i, arr in enumerate(frames[:n]):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 30)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def _edit_json(path: str, edit) -> None:
    with open(path) as f:
        doc = json.load(f)
    edit(doc)
    with open(path, "w") as f:
        json.dump(doc, f)


def _edit_parquet(path: str, edit) -> None:
    pq.write_table(edit(pq.read_table(path)), path)


@pytest.fixture
def broken(dirs, tmp_path):
    """A fresh copy of the b1k dataset plus handy paths into it."""
    root = str(tmp_path / "broken")
    shutil.copytree(dirs["b1k-v2.1"], root)
    src = LeRobotSource(root)
    ep = src.episodes()[0].episode_index
    rel = {"data": src.data_file(ep), "annotation": src.annotation_file(ep),
           "video": os.path.relpath(src.rgb_video_url(ep, "right_wrist"), root)}
    return root, ep, rel


def _narrow_action(t: pa.Table) -> pa.Table:
    narrow = pa.array([row[:22] for row in t.column("action").to_pylist()], pa.list_(pa.float32()))
    return t.set_column(t.column_names.index("action"), "action", narrow)


def _bad_task(t: pa.Table) -> pa.Table:
    return t.set_column(t.column_names.index("task_index"), "task_index", pa.array([55] * t.num_rows, pa.int64()))


def _bad_tasks_file(root: str) -> None:
    path = os.path.join(root, "meta/tasks.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    rows[3]["task_index"] = 77
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _stretch(doc: dict) -> None:
    doc["skill_annotation"][-1]["frame_duration"][1] = FRAMES + 40


CASES = {
    # name: (how to break the copy, file named in the error, extra text the message must contain, when it fails)
    "no_info": (lambda root, rel: os.remove(os.path.join(root, "meta/info.json")), "meta/info.json", (), "open"),
    "old_version": (lambda root, rel: _edit_json(os.path.join(root, "meta/info.json"),
                                                 lambda d: d.update(codebase_version="v1.6")),
                    "meta/info.json", ("v1.6", "v2.1", "v3.0"), "open"),
    "no_parquet": (lambda root, rel: os.remove(os.path.join(root, rel["data"])), "data", (), "read"),
    "no_action_column": (lambda root, rel: _edit_parquet(os.path.join(root, rel["data"]),
                                                         lambda t: t.drop_columns(["action"])),
                         "data", ("'action'",), "read"),
    "narrow_action": (lambda root, rel: _edit_parquet(os.path.join(root, rel["data"]), _narrow_action),
                      "data", ("width 23", "[22]"), "read"),
    "task_out_of_range": (lambda root, rel: _edit_parquet(os.path.join(root, rel["data"]), _bad_task),
                          "data", ("55", "0..49"), "read"),
    "task_file_out_of_range": (lambda root, rel: _bad_tasks_file(root), "meta/tasks.jsonl", ("77",), "list"),
    "no_annotation": (lambda root, rel: os.remove(os.path.join(root, rel["annotation"])), "annotation", (), "read"),
    "annotation_past_end": (lambda root, rel: _edit_json(os.path.join(root, rel["annotation"]), _stretch),
                            "annotation", (str(FRAMES + 40), f"{FRAMES} frames"), "read"),
    "no_video": (lambda root, rel: os.remove(os.path.join(root, rel["video"])), "video", (), "frames"),
    "short_video": (lambda root, rel: _reencode_with(os.path.join(root, rel["video"]), FRAMES - 7),
                    "video", (f"has {FRAMES - 7} frames", f"{FRAMES} rows"), "frames"),
    "long_video": (lambda root, rel: _reencode_with(os.path.join(root, rel["video"]), FRAMES + 5),
                   "video", (f"has {FRAMES + 5} frames", f"{FRAMES} rows"), "frames"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_dataset_error_naming_the_file(broken, case):
    root, ep, rel = broken
    breaker, file_key, fragments, stage = CASES[case]
    breaker(root, rel)
    with pytest.raises(DatasetError) as err:
        src = LeRobotSource(root)
        if stage in ("list", "read", "frames"):
            src.episodes()
        if stage == "read":
            src.read_episode(ep)
        if stage == "frames":
            for _ in src.iter_rgb_frames(ep, size=None):
                pass
    message = str(err.value)
    assert os.path.join(root, rel.get(file_key, file_key)) in message, message
    for fragment in fragments:
        assert fragment in message, message
    if case == "no_annotation":
        assert isinstance(err.value, MissingAnnotationError)
        episode = LeRobotSource(root).read_episode(ep, require_annotations=False)
        assert not episode.has_annotations and episode.length == FRAMES


def test_truncated_v3_video_is_detected(dirs, tmp_path):
    root = str(tmp_path / "v3")
    shutil.copytree(dirs["lerobot-v3.0"], root)
    src = LeRobotSource(root)
    video = src.rgb_video_url(1, "left_wrist")
    _reencode_with(video, 2 * FRAMES - 10)  # the second episode loses its last 10 frames
    assert len(list(LeRobotSource(root).iter_rgb_frames(0, size=None))) == FRAMES
    assert LeRobotSource(root).video_frame_count(1, "left_wrist") == FRAMES - 10
    with pytest.raises(DatasetError, match=f"{video} has {FRAMES - 10} frames .* {FRAMES} rows"):
        for _ in LeRobotSource(root).iter_rgb_frames(1, size=None):
            pass
