"""`data synth` writes a dataset with every structural fact of BEHAVIOR-1K 2025 (reference §1), deterministically,
with learnable content. Real files throughout: the dataset is generated once per module and read back with
pyarrow and PyAV."""

from __future__ import annotations

import json
import os
import re

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_loaders import behavior_facts as bf
from data_loaders.synth import synthesize
from data_loaders.synth_content import generate_episode
from data_loaders.synth_plan import num_task_objects
from data_loaders.video_encode import generate_yuv_palette

TASKS, EPISODES, FRAMES, SEED = [0, 1, 40], 2, 75, 0
LOW = {"head": 128, "left_wrist": 96, "right_wrist": 96}
CAMERA_PRIM = {"head": "robot_r1::robot_r1:zed_link:Camera:0",
               "left_wrist": "robot_r1::robot_r1:left_realsense_link:Camera:0",
               "right_wrist": "robot_r1::robot_r1:right_realsense_link:Camera:0"}


def _files(root: str) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, f), root): os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _load(path: str):
    with open(path) as f:
        return json.load(f)


def _decode(path: str, fmt: str = "rgb24") -> np.ndarray:
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format=fmt) for f in c.decode(video=0)])


def _probe(path: str) -> tuple[str, str, str, int, int, int]:
    with av.open(path) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        return s.codec_context.name, s.codec_context.codec_tag, s.codec_context.pix_fmt, s.width, s.height, n


def _ep_files(ep: int) -> set[str]:
    t, e = f"task-{ep // 10000:04d}", f"episode_{ep:08d}"
    out = {f"data/{t}/{e}.parquet", f"meta/episodes/{t}/{e}.json", f"annotations/{t}/{e}.json"}
    out |= {f"videos/{t}/observation.images.{m}.{c}/{e}.mp4" for m in bf.MODALITIES for c in bf.CAMERAS}
    return out


def assert_totals_match_meta(root: str) -> None:
    """info.json's totals count what the other meta files list, as in the real 2025 dataset (whose tasks.jsonl
    has all 50 tasks and whose info.json says total_tasks 50, whichever tasks a download holds)."""
    info = _load(os.path.join(root, "meta/info.json"))
    tasks = _jsonl(os.path.join(root, "meta/tasks.jsonl"))
    episodes = _jsonl(os.path.join(root, "meta/episodes.jsonl"))
    videos = [f for f in _files(root) if f.startswith("videos/") and f.endswith(".mp4")]
    assert (info["total_tasks"], len(tasks)) == (bf.NUM_TASKS, bf.NUM_TASKS)
    assert info["total_episodes"] == len(episodes) == len(_jsonl(os.path.join(root, "meta/episodes_stats.jsonl")))
    assert info["total_frames"] == sum(e["length"] for e in episodes)
    assert info["total_videos"] == len(videos)
    assert info["splits"] == {"train": f"0:{len(episodes)}"}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth") / "ds")
    report = synthesize(root, tasks=TASKS, episodes_per_task=EPISODES, frames=FRAMES, seed=SEED)
    episodes = _jsonl(os.path.join(root, "meta/episodes.jsonl"))
    return root, report, [e["episode_index"] for e in episodes]


def _parquet(root: str, ep: int) -> pa.Table:
    return pq.read_table(os.path.join(root, f"data/task-{ep // 10000:04d}/episode_{ep:08d}.parquet"))


def _col(table: pa.Table, name: str) -> np.ndarray:
    return np.array(table.column(name).to_pylist(), dtype=np.float32)


def test_report_layout_and_episode_indices(ds):
    root, report, eps = ds
    assert report.num_episodes == 6 and report.num_frames == 6 * FRAMES and report.num_videos == 54
    assert "6 episodes" in str(report) and report.num_bytes == sum(os.path.getsize(p) for p in _files(root).values())
    expected = {"meta/info.json", "meta/tasks.jsonl", "meta/episodes.jsonl", "meta/episodes_stats.jsonl"}
    for ep in eps:
        expected |= _ep_files(ep)
    assert set(_files(root)) == expected
    assert eps == sorted(eps) and list(report.episode_indices) == eps
    for task in TASKS:
        mine = [ep for ep in eps if ep // 10000 == task]
        assert len(mine) == EPISODES
        assert all(ep % 10 == 0 for ep in mine)  # traj 0
        instances = [(ep // 10) % 1000 for ep in mine]  # how eval.py recovers the instance
        assert len(set(instances)) == EPISODES and all(0 <= i < 300 for i in instances)
        assert [bf.episode_index(task, i) for i in instances] == mine


def test_info_json(ds):
    root, _, eps = ds
    text = open(os.path.join(root, "meta/info.json")).read()
    assert text.startswith('{\n    "codebase_version": "v2.1",\n')  # json.dump(indent=4)
    info = json.loads(text)
    assert list(info) == ["codebase_version", "robot_type", "total_episodes", "total_frames", "total_tasks",
                          "total_videos", "chunks_size", "fps", "splits", "data_path", "video_path",
                          "metainfo_path", "annotation_path", "features"]
    assert info["robot_type"] == "R1Pro" and info["total_episodes"] == 6 and info["total_frames"] == 6 * FRAMES
    assert info["total_videos"] == 54 and info["chunks_size"] == 10000
    assert_totals_match_meta(root)
    assert info["fps"] == 30 and type(info["fps"]) is int and info["splits"] == {"train": "0:6"}
    assert info["data_path"] == "data/task-{episode_chunk:04d}/episode_{episode_index:08d}.parquet"
    assert info["video_path"] == "videos/task-{episode_chunk:04d}/{video_key}/episode_{episode_index:08d}.mp4"
    assert info["metainfo_path"] == "meta/episodes/task-{episode_chunk:04d}/episode_{episode_index:08d}.json"
    assert info["annotation_path"] == "annotations/task-{episode_chunk:04d}/episode_{episode_index:08d}.json"
    feats = info["features"]
    video_keys = [f"observation.images.{m}.{c}" for m in ("rgb", "depth", "seg_instance_id")
                  for c in ("left_wrist", "right_wrist", "head")]
    assert list(feats) == video_keys + ["action", "timestamp", "episode_index", "index", "observation.cam_rel_poses",
                                        "observation.state", "observation.task_info"]
    for key in video_keys:
        modality, cam = key.split(".")[2:]
        size, depth = LOW[cam], modality == "depth"
        assert feats[key] == {
            "dtype": "video", "shape": [size, size, 3], "names": ["height", "width", "depth" if depth else "rgb"],
            "info": {"video.fps": 30.0, "video.height": size, "video.width": size, "video.channels": 3,
                     "video.codec": "libx265", "video.pix_fmt": "yuv420p16le" if depth else "yuv420p",
                     "video.is_depth_map": depth, "has_audio": False}}
        assert list(feats[key]["info"])[0] == "video.fps" and type(feats[key]["info"]["video.fps"]) is float
    for key, dtype, shape in (("action", "float32", [23]), ("timestamp", "float64", [1]),
                              ("episode_index", "int64", [1]), ("index", "int64", [1]),
                              ("observation.cam_rel_poses", "float32", [21]), ("observation.state", "float32", [256]),
                              ("observation.task_info", "float32", [None])):
        assert feats[key] == {"dtype": dtype, "shape": shape, "names": None}
        assert list(feats[key]) == ["dtype", "shape", "names"]
    for ep in eps:  # the templates resolve to files that exist
        assert os.path.exists(os.path.join(root, info["data_path"].format(episode_chunk=ep // 10000,
                                                                           episode_index=ep)))


def test_tasks_and_episode_meta_files(ds):
    root, _, eps = ds
    tasks = _jsonl(os.path.join(root, "meta/tasks.jsonl"))
    assert len(tasks) == 50
    for i, row in enumerate(tasks):
        assert list(row) == ["task_index", "task_name", "task"]
        assert row == {"task_index": i, "task_name": bf.TASK_NAMES[i], "task": bf.TASK_INSTRUCTIONS[i]}
    episodes = _jsonl(os.path.join(root, "meta/episodes.jsonl"))
    stats = _jsonl(os.path.join(root, "meta/episodes_stats.jsonl"))
    assert [s["episode_index"] for s in stats] == eps
    for row, st in zip(episodes, stats, strict=True):
        ep = row["episode_index"]
        assert list(row) == ["episode_index", "tasks", "length", "distance_traveled", "left_eef_displacement",
                             "right_eef_displacement"]
        assert row["tasks"] == [bf.TASK_INSTRUCTIONS[ep // 10000]] and row["length"] == FRAMES
        table = _parquet(root, ep)
        state = _col(table, "observation.state").astype(np.float64)
        for key, sl in (("distance_traveled", slice(140, 143)), ("left_eef_displacement", slice(186, 189)),
                        ("right_eef_displacement", slice(225, 228))):
            steps = np.linalg.norm(np.diff(state[:, sl], axis=0), axis=1).sum()
            assert row[key] == pytest.approx(round(steps, 4), abs=2e-4) and row[key] > 0
        assert list(st) == ["episode_index", "stats"]
        assert list(st["stats"]) == ["action", "observation.state", "observation.cam_rel_poses"]
        for key, width in (("action", 23), ("observation.state", 256), ("observation.cam_rel_poses", 21)):
            s, x = st["stats"][key], _col(table, key).astype(np.float64)
            assert list(s) == ["min", "max", "mean", "std", "q01", "q99", "count"]
            assert all(len(s[k]) == width for k in ("min", "max", "mean", "std", "q01", "q99"))
            assert s["count"] == [FRAMES]
            np.testing.assert_allclose(s["min"], x.min(0), rtol=1e-6)
            np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(s["q99"], np.quantile(x, 0.99, axis=0), rtol=1e-5, atol=1e-6)


def test_per_episode_metainfo(ds):
    root, _, eps = ds
    for ep in eps:
        task = ep // 10000
        meta = _load(os.path.join(root, f"meta/episodes/task-{task:04d}/episode_{ep:08d}.json"))
        assert list(meta)[:10] == ["config", "scene_file", "n_episodes", "n_steps", "num_samples", "transitions",
                                   "robot_type", "task_obs_keys", "task_relevant_objs", "ins_id_mapping"]
        for key in ("config", "scene_file", "transitions", "ins_id_mapping"):
            assert isinstance(meta[key], str)
            json.loads(meta[key])
        assert meta["n_steps"] == meta["num_samples"] == FRAMES and meta["robot_type"] == "R1Pro"
        inst_to_name = json.loads(meta["config"])["scene"]["scene_file"]["metadata"]["task"]["inst_to_name"]
        k = num_task_objects(task)
        assert len(inst_to_name) == k + 1 and inst_to_name["agent.n.01_1"] == "robot_r1"
        assert meta["task_relevant_objs"] == [v for i, v in inst_to_name.items() if i != "agent.n.01_1"]
        assert len(meta["task_obs_keys"]) == 4 + 6 * k and meta["task_obs_keys"][0] == "agent.n.01_1_real"
        mapping = {int(i): p for i, p in json.loads(meta["ins_id_mapping"]).items()}
        for cam in bf.CAMERAS:
            ids = meta[f"{CAMERA_PRIM[cam]}::unique_ins_ids"]
            assert ids == sorted(set(ids)) and set(ids) <= set(mapping)
        head_ids = meta[f"{CAMERA_PRIM['head']}::unique_ins_ids"]
        names = {mapping[i].split("/")[3] for i in head_ids}  # the reader convention: 4th path piece
        assert names & set(inst_to_name.values())


def test_parquet_columns_types_and_values(ds):
    root, _, eps = ds
    widths = {"observation.state": 256, "observation.cam_rel_poses": 21, "action": 23}
    for ep in eps:
        table = _parquet(root, ep)
        assert table.column_names == ["index", "episode_index", "task_index", "timestamp", "observation.state",
                                      "observation.cam_rel_poses", "action", "observation.task_info"]
        for name in ("index", "episode_index", "task_index"):
            assert table.schema.field(name).type == pa.int64()
        assert table.schema.field("timestamp").type == pa.float64()
        task_info_width = 10 + 12 * num_task_objects(ep // 10000)
        for name, width in {**widths, "observation.task_info": task_info_width}.items():
            assert pa.types.is_list(table.schema.field(name).type)
            assert table.schema.field(name).type.value_type == pa.float32()
            assert set(pc_len for pc_len in (len(v) for v in table.column(name).to_pylist())) == {width}
        assert table.schema.pandas_metadata is not None
        assert table.column("index").to_pylist() == list(range(FRAMES))
        assert set(table.column("episode_index").to_pylist()) == {ep}
        assert set(table.column("task_index").to_pylist()) == {ep // 10000}
        np.testing.assert_array_equal(table.column("timestamp").to_numpy(), np.arange(FRAMES) / 30.0)
    assert 10 + 12 * num_task_objects(0) == 46  # task 0's real task_info width


def test_videos_codec_format_size_and_length(ds):
    root, _, eps = ds
    for ep in eps:
        for modality in bf.MODALITIES:
            for cam in bf.CAMERAS:
                path = os.path.join(root, f"videos/task-{ep // 10000:04d}/observation.images.{modality}.{cam}/"
                                          f"episode_{ep:08d}.mp4")
                name, _, pix_fmt, w, h, n = _probe(path)
                assert name == "hevc"
                assert pix_fmt == ("yuv420p10le" if modality == "depth" else "yuv420p")
                assert (w, h) == (LOW[cam], LOW[cam]) and n == FRAMES


def test_depth_and_seg_videos_decode_to_the_scene(ds):
    root, _, eps = ds
    ep = eps[0]
    meta = _load(os.path.join(root, f"meta/episodes/task-0000/episode_{ep:08d}.json"))
    ids = meta[f"{CAMERA_PRIM['head']}::unique_ins_ids"]
    base = os.path.join(root, "videos/task-0000/observation.images.{}.head/" + f"episode_{ep:08d}.mp4")
    seg = _decode(base.format("seg_instance_id")).astype(np.int64)
    palette = generate_yuv_palette(len(ids)).astype(np.int64)
    nearest = np.argmin(((seg[..., None, :] - palette) ** 2).sum(-1), axis=-1)
    decoded_ids = np.asarray(ids)[nearest]
    assert set(np.unique(decoded_ids)) == set(ids)  # every listed id is visible, nothing else is
    depth_m = bf.dequantize_depth(_decode(base.format("depth"), fmt="gray16le"))
    assert depth_m.shape == (FRAMES, 128, 128) and 0.5 < depth_m.min() and depth_m.max() < 5.0
    # The target square (nearest object) is at 1.5 m wherever the seg video shows the target object.
    target = decoded_ids == np.array(ids)[-1]
    assert np.median(depth_m[target]) == pytest.approx(1.5, abs=0.05)


def test_annotations(ds):
    root, _, eps = ds
    durations = []
    for ep in eps:
        task = ep // 10000
        doc = _load(os.path.join(root, f"annotations/task-{task:04d}/episode_{ep:08d}.json"))
        assert list(doc) == ["task_name", "data_folder", "meta_data", "skill_annotation", "primitive_annotation"]
        assert doc["task_name"] == bf.TASK_NAMES[task].replace("_", " ") and doc["data_folder"] == ""
        td = doc["meta_data"]["task_duration"]
        assert isinstance(td, int) and 0 < td <= FRAMES and doc["meta_data"]["valid_duration"] == [0, td]
        durations.append(td)
        skills = doc["skill_annotation"]
        assert skills[0]["frame_duration"][0] == 0 and skills[-1]["frame_duration"][1] == td
        for i, s in enumerate(skills):
            assert list(s) == ["skill_idx", "skill_id", "skill_description", "skill_type", "object_id",
                               "manipulating_object_id", "memory_prefix", "spatial_prefix", "mp_ef", "frame_duration"]
            assert s["skill_idx"] == i and len(s["skill_id"]) == 1 and s["skill_id"][0] in bf.SKILL_IDS
            assert s["skill_description"] == [bf.SKILL_PHRASES[s["skill_id"][0]]]
            assert s["skill_type"][0] in ("navigation", "uncoordinated", "coordinated")
            assert s["memory_prefix"] in ([], ["back"]) and s["spatial_prefix"] == [] and s["mp_ef"] == []
            assert all(re.fullmatch(r"[a-z_]+_[a-z]{6}_\d+", o) for o in s["object_id"][0])
            start, end = s["frame_duration"]
            assert start < end and (i == 0 or start == skills[i - 1]["frame_duration"][1])
        covered = []
        for j, p in enumerate(doc["primitive_annotation"]):
            assert list(p) == ["primitive_idx", "primitive_id", "primitive_description", "object_id",
                               "manipulating_object_id", "memory_prefix", "spatial_prefix", "frame_duration",
                               "skill_idxes"]
            assert p["primitive_idx"] == j and p["frame_duration"] == [
                skills[p["skill_idxes"][0]]["frame_duration"][0], skills[p["skill_idxes"][-1]]["frame_duration"][1]]
            covered += p["skill_idxes"]
        assert covered == list(range(len(skills)))
    assert min(durations) < FRAMES  # like the real data, annotations may end before the episode


def test_state_matches_generator_and_ranges(ds):
    root, _, eps = ds
    for ep in eps:
        table = _parquet(root, ep)
        content = generate_episode(ep // 10000, (ep // 10) % 1000, FRAMES, SEED)
        state = bf.proprio_to_state(_col(table, "observation.state"))
        np.testing.assert_allclose(state, content.state, atol=2e-6)
        action = _col(table, "action")
        np.testing.assert_array_equal(action, content.action)
        for x in (state, action):
            assert (x >= bf.JOINT_RANGE_LOW - 1e-6).all() and (x <= bf.JOINT_RANGE_HIGH + 1e-6).all()
        assert set(np.unique(action[:, [14, 22]])) <= {-1.0, 1.0}
        assert state[:, [14, 22]].min() >= -1.0 - 1e-6 and state[:, [14, 22]].max() <= 1.0 + 1e-6


def _square_centroid(video: str) -> np.ndarray:
    frames = _decode(video).astype(np.float64)
    weight = np.clip(frames.max(-1) - 150.0, 0.0, None)  # only the bright goal square passes
    ys, xs = np.mgrid[:frames.shape[1], :frames.shape[2]]
    total = weight.sum((1, 2))
    return np.stack([(weight * xs).sum((1, 2)) / total, (weight * ys).sum((1, 2)) / total], axis=1)


def _r2(features: np.ndarray, target: np.ndarray, *, per_dim: bool = True) -> np.ndarray | float:
    """In-sample R^2 of a least-squares linear fit (0 = the mean baseline), per dimension or variance-weighted."""
    coef = np.linalg.lstsq(features, target, rcond=None)[0]
    sse, sst = ((target - features @ coef) ** 2).sum(0), ((target - target.mean(0)) ** 2).sum(0)
    return 1.0 - sse / sst if per_dim else 1.0 - sse.sum() / sst.sum()


def test_actions_are_learnable_from_state_and_image(ds):
    root, _, eps = ds
    for task in TASKS:
        states, actions, centroids = [], [], []
        for ep in (e for e in eps if e // 10000 == task):
            table = _parquet(root, ep)
            states.append(bf.proprio_to_state(_col(table, "observation.state")).astype(np.float64))
            actions.append(_col(table, "action").astype(np.float64))
            centroids.append(_square_centroid(os.path.join(
                root, f"videos/task-{task:04d}/observation.images.rgb.head/episode_{ep:08d}.mp4")))
        s, a, c = np.concatenate(states), np.concatenate(actions), np.concatenate(centroids)
        one = np.ones((len(s), 1))
        r2 = _r2(np.c_[s, c, one], a)
        assert r2.mean() > 0.95, r2.round(3)  # uniform average over the 23 dims; the mean-action baseline is 0
        assert r2[[14, 22]].min() > 0.6  # grippers switch on a threshold, so a linear fit is only approximate
        # The image carries information the state lacks: it explains most of what the state leaves unexplained
        # in the commanded joint/base deltas.
        dims = np.r_[0:14, 15:22]
        delta = a[:, dims] - s[:, dims]
        unexplained_state = 1.0 - _r2(np.c_[s, one], delta, per_dim=False)
        unexplained_both = 1.0 - _r2(np.c_[s, c, one], delta, per_dim=False)
        assert unexplained_both < 0.25 * unexplained_state, (unexplained_state, unexplained_both)


def test_deterministic_and_independent_of_other_episodes(ds, tmp_path):
    root, _, eps = ds
    again = str(tmp_path / "again")
    synthesize(again, tasks=[1], episodes_per_task=1, frames=FRAMES, seed=SEED)
    files = _files(again)
    ep = _jsonl(os.path.join(again, "meta/episodes.jsonl"))[0]["episode_index"]
    assert ep in eps  # the first instance of a task does not depend on how many were asked for
    for rel in _ep_files(ep) | {"meta/tasks.jsonl"}:
        if rel.endswith(".mp4"):
            continue
        with open(files[rel], "rb") as f1, open(os.path.join(root, rel), "rb") as f2:
            assert f1.read() == f2.read(), rel
    video = f"videos/task-0001/observation.images.rgb.head/episode_{ep:08d}.mp4"
    np.testing.assert_array_equal(_decode(files[video]), _decode(os.path.join(root, video)))

    other = str(tmp_path / "other")
    synthesize(other, tasks=[1], episodes_per_task=1, frames=FRAMES, seed=SEED + 1)
    ep_other = _jsonl(os.path.join(other, "meta/episodes.jsonl"))[0]["episode_index"]
    a_other = _col(_parquet(other, ep_other), "action")
    assert not np.array_equal(a_other, _col(_parquet(root, ep), "action"))
    assert not np.array_equal(generate_episode(1, 5, FRAMES, 1).action, generate_episode(1, 5, FRAMES, 2).action)


def test_refuses_nonempty_output_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty; pass --overwrite to replace it") as e:
        synthesize(str(out), tasks=[40], episodes_per_task=1, frames=31, seed=0)
    assert "overwrite=" not in str(e.value)  # the CLI's flag, never the Python argument
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file; pass --overwrite"):
        synthesize(str(tmp_path / "afile"), tasks=[40], episodes_per_task=1, frames=31, seed=0)
    assert (out / "keep.txt").exists()
    report = synthesize(f"file://{out}", tasks=[40], episodes_per_task=1, frames=31, seed=0, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "meta/info.json").exists() and report.num_frames == 31
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".b1k-synth-")]  # staging cleaned up


@pytest.mark.parametrize("kwargs, message", [
    ({"tasks": [50]}, r"task ids \[50\] are out of range.*0\.\.49"),
    ({"tasks": []}, "no tasks given"),
    ({"tasks": [1, 1]}, "duplicates"),
    ({"frames": 30}, "frames must be >= 31"),
    ({"episodes_per_task": 0}, "episodes_per_task must be in 1..300"),
    ({"seed": -1}, "seed must be a non-negative"),
    ({"resolution": "4k"}, "unknown resolution"),
    ({"layout": "rlds"}, "unknown layout"),
    ({"codec": "vp9"}, "unknown RGB codec"),
])
def test_bad_arguments_raise_clear_errors(tmp_path, kwargs, message):
    args = {"tasks": [0], "episodes_per_task": 1, "frames": 31, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        synthesize(str(tmp_path / "never"), **args)
    assert not (tmp_path / "never").exists()


def test_s3_output(s3_bucket, s3fs_client):
    out = f"{s3_bucket}/datasets/synth"
    report = synthesize(out, tasks=[40], episodes_per_task=1, frames=31, seed=5)
    ep = report.episode_indices[0]
    prefix = out[len("s3://"):]
    keys = {k[len(prefix) + 1:] for k in s3fs_client.find(prefix)}
    assert keys == _ep_files(ep) | {"meta/info.json", "meta/tasks.jsonl", "meta/episodes.jsonl",
                                    "meta/episodes_stats.jsonl"}
    info = json.loads(s3fs_client.cat_file(f"{prefix}/meta/info.json"))
    assert info["total_episodes"] == 1 and info["total_frames"] == 31
    with pytest.raises(ValueError, match="not empty"):
        synthesize(out, tasks=[40], episodes_per_task=1, frames=31, seed=5)
    synthesize(s3_bucket, tasks=[0], episodes_per_task=1, frames=31, seed=5, overwrite=True)  # bucket root
    assert s3fs_client.exists(s3_bucket[len("s3://"):])
    assert not s3fs_client.exists(f"{prefix}/meta/info.json")  # replaced, not merged


def test_full_resolution_and_av1(tmp_path):
    full = str(tmp_path / "full")
    report = synthesize(full, tasks=[0], episodes_per_task=1, frames=31, seed=0, resolution="full")
    ep = report.episode_indices[0]
    info = _load(os.path.join(full, "meta/info.json"))
    for modality in bf.MODALITIES:
        for cam, size in bf.FULL_RESOLUTION.items():
            key = f"observation.images.{modality}.{cam}"
            assert info["features"][key]["shape"] == [size, size, 3]
            _, _, _, w, h, n = _probe(os.path.join(full, f"videos/task-0000/{key}/episode_{ep:08d}.mp4"))
            assert (w, h, n) == (size, size, 31)
    av1 = str(tmp_path / "av1")
    synthesize(av1, tasks=[0], episodes_per_task=1, frames=31, seed=0, codec="av1")
    info = _load(os.path.join(av1, "meta/info.json"))
    assert info["features"]["observation.images.rgb.head"]["info"]["video.codec"] == "libsvtav1"
    assert info["features"]["observation.images.depth.head"]["info"]["video.codec"] == "libx265"
    _, tag, pix_fmt, _, _, n = _probe(os.path.join(av1, f"videos/task-0000/observation.images.rgb.head/"
                                                        f"episode_{ep:08d}.mp4"))
    assert (tag, pix_fmt, n) == ("av01", "yuv420p", 31)
