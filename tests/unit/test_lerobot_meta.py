"""Hostile LeRobot meta files: a field of the wrong type in meta/info.json, meta/episodes.jsonl, meta/tasks.jsonl
or a v3.0 episodes parquet is one DatasetError naming the file, the field and what was expected, raised when the
dataset is opened or its episodes listed (only meta files are needed, so these run in milliseconds)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_loaders import synth_meta
from data_loaders.behavior_facts import TASK_INSTRUCTIONS
from data_loaders.episode import DatasetError
from data_loaders.lerobot_source import LeRobotSource

REPO = Path(__file__).resolve().parents[2]
INFO = synth_meta.info_json(num_episodes=2, num_frames=20, num_tasks=1, sizes={"head": 64, "left_wrist": 48,
                                                                              "right_wrist": 48}, rgb_codec="libx265")
EPISODES = [{"episode_index": 0, "tasks": [TASK_INSTRUCTIONS[0]], "length": 10},
            {"episode_index": 1, "tasks": [TASK_INSTRUCTIONS[0]], "length": 10}]


def _write_b1k(root: Path, info=None, episodes=None, tasks=None) -> str:
    (root / "meta").mkdir(parents=True)
    (root / "meta/info.json").write_text(json.dumps(INFO if info is None else info))
    rows = synth_meta.tasks_rows() if tasks is None else tasks
    (root / "meta/tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    eps = EPISODES if episodes is None else episodes
    (root / "meta/episodes.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                                                      for r in eps))
    return str(root)


def _info(**changes) -> dict:
    info = copy.deepcopy(INFO)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = info
        for p in parents:
            node = node[p]
        node[last] = value
    return info


def _open_and_list(root: str) -> None:
    LeRobotSource(root).episodes()


INFO_CASES = {
    "fps_word": (_info(fps="thirty"), "field 'fps' is 'thirty' (str), expected a positive number"),
    "fps_zero": (_info(fps=0), "field 'fps' is 0 (int), expected a positive number"),
    "fps_bool": (_info(fps=True), "field 'fps' is True (bool)"),
    "chunks_size_text": (_info(chunks_size="10000"), "field 'chunks_size' is '10000' (str), expected an integer >= 1"),
    "total_episodes_negative": (_info(total_episodes=-2), "field 'total_episodes' is -2 (int), expected an integer"),
    "data_path_number": (_info(data_path=7), "field 'data_path' is 7 (int), expected a path template string"),
    "data_path_placeholder": (_info(data_path="data/{chunk}/episode_{episode_index:08d}.parquet"),
                              "field 'data_path' = 'data/{chunk}/episode_{episode_index:08d}.parquet' cannot be "
                              "formatted (KeyError: 'chunk')"),
    "video_path_spec": (_info(video_path="videos/{video_key:03d}/{episode_chunk}/{episode_index}.mp4"),
                        "field 'video_path'"),
    "annotation_path_list": (_info(annotation_path=["a"]), "field 'annotation_path' is ['a'] (list)"),
    "features_list": (_info(features=["action"]), "field 'features' is ['action'] (list), expected an object"),
    "feature_not_object": (_info(**{"features__observation.state": "float32"}),
                           "field 'features.observation.state' is 'float32' (str)"),
    "shape_text": (_info(features__action={"dtype": "float32", "shape": "23"}),
                   "field 'features.action.shape' is '23' (str), expected a list of non-negative integers"),
    "shape_wrong_width": (_info(features__action={"dtype": "float32", "shape": [22]}),
                          "field 'features.action.shape' is [22] (list), expected [23]"),
    "dtype_number": (_info(features__action={"dtype": 32, "shape": [23]}), "field 'features.action.dtype' is 32"),
    "version_number": (_info(codebase_version=2.1), "field 'codebase_version' is 2.1 (float)"),
    "not_an_object": ([1, 2], "holds [1, 2] (list), expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(INFO_CASES))
def test_info_json_field_of_wrong_type_names_file_and_field(tmp_path, case):
    info, message = INFO_CASES[case]
    root = _write_b1k(tmp_path / "ds", info=info)
    with pytest.raises(DatasetError) as e:
        _open_and_list(root)
    text = str(e.value)
    assert text.startswith(f"{root}/meta/info.json"), text
    assert message in text and "\n" not in text, text


def test_info_json_that_is_not_utf8_is_one_clear_error(tmp_path):
    root = _write_b1k(tmp_path / "ds")
    Path(root, "meta/info.json").write_bytes(b"\xff\xfe{\x00")
    with pytest.raises(DatasetError, match=r"meta/info\.json is not valid JSON"):
        LeRobotSource(root)


def test_null_video_and_variable_width_feature_are_accepted(tmp_path):
    info = _info(video_path=None)  # a dataset without videos; task_info keeps shape [null] as in the real file
    assert info["features"]["observation.task_info"]["shape"] == [None]
    root = _write_b1k(tmp_path / "ds", info=info)
    assert [r.length for r in LeRobotSource(root).episodes()] == [10, 10]


ROW_CASES = {
    "length_text": ({"length": "ten"}, "line 2: field 'length' is 'ten' (str), expected an integer >= 0"),
    "length_float": ({"length": 9.5}, "line 2: field 'length' is 9.5 (float)"),
    "index_missing": ({"episode_index": None}, "line 2: field 'episode_index' is None (NoneType)"),
    "tasks_string": ({"tasks": TASK_INSTRUCTIONS[0]}, "line 2: field 'tasks' is"),
}


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_episodes_jsonl_field_of_wrong_type_names_line_and_field(tmp_path, case):
    change, message = ROW_CASES[case]
    episodes = [EPISODES[0], {**EPISODES[1], **change}]
    root = _write_b1k(tmp_path / "ds", episodes=episodes)
    with pytest.raises(DatasetError) as e:
        _open_and_list(root)
    assert f"{root}/meta/episodes.jsonl {message}" in str(e.value), str(e.value)


def test_episodes_jsonl_line_that_is_not_an_object(tmp_path):
    root = _write_b1k(tmp_path / "ds", episodes=[EPISODES[0], "[1, 2]"])
    with pytest.raises(DatasetError, match=r"episodes\.jsonl line 2 holds list, expected a JSON object"):
        _open_and_list(root)


@pytest.mark.parametrize("change,message", [
    ({"task_index": "zero"}, "line 1: field 'task_index' is 'zero' (str), expected an integer"),
    ({"task": 5}, "line 1: field 'task' is 5 (int), expected a string"),
    ({"task": None}, "line 1: field 'task' is None (NoneType), expected a string"),
])
def test_tasks_jsonl_field_of_wrong_type(tmp_path, change, message):
    tasks = synth_meta.tasks_rows()
    tasks[0] = {**tasks[0], **change}
    root = _write_b1k(tmp_path / "ds", tasks=tasks)
    with pytest.raises(DatasetError) as e:
        _open_and_list(root)
    assert f"{root}/meta/tasks.jsonl {message}" in str(e.value), str(e.value)


def _write_v3(root: Path, rows: list[dict]) -> str:
    info = _info(codebase_version="v3.0", data_path="data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                 video_path="videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4")
    del info["annotation_path"]
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    (root / "meta/info.json").write_text(json.dumps(info))
    pq.write_table(pa.table({"task_index": [0], "task": [TASK_INSTRUCTIONS[0]]}), root / "meta/tasks.parquet")
    pq.write_table(pa.Table.from_pylist(rows), root / "meta/episodes/chunk-000/file-000.parquet")
    return str(root)


def test_v3_template_with_v2_placeholders_and_null_data_file_are_named(tmp_path):
    good = {"episode_index": 0, "tasks": [TASK_INSTRUCTIONS[0]], "length": 10, "data/chunk_index": 0,
            "data/file_index": 0}
    assert len(LeRobotSource(_write_v3(tmp_path / "ok", [good])).episodes()) == 1
    root = _write_v3(tmp_path / "null", [good, {**good, "episode_index": 1, "data/file_index": None}])
    with pytest.raises(DatasetError, match=r"file-000\.parquet row 1: field 'data/file_index' is None"):
        _open_and_list(root)
    root = tmp_path / "v2tmpl"
    _write_v3(root, [good])
    info = json.loads((root / "meta/info.json").read_text())
    info["data_path"] = synth_meta.DATA_PATH  # {episode_chunk}: a v2.1 template in a v3.0 dataset
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match=r"field 'data_path' = .* cannot be formatted \(KeyError: 'episode_chunk'\)"):
        LeRobotSource(str(root))


def test_cli_prints_one_line_for_fps_thirty(tmp_path):
    root = _write_b1k(tmp_path / "ds", info=_info(fps="thirty"))
    done = subprocess.run([sys.executable, "-m", "trainer", "data", "shard", root, str(tmp_path / "out"),
                           "--workers", "1"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {root}/meta/info.json: field 'fps' is 'thirty' (str), expected a positive number; "
                     "fix meta/info.json or regenerate it with LeRobot"], done.stderr
