"""`LeRobotSource`: one reader for BEHAVIOR 2025 demos and stock LeRobot v2.1 / v3.0 datasets.

Layouts, detected from meta/info.json:
- "b1k-v2.1": BEHAVIOR 2025 (`codebase_version` v2.1, `data/task-TTTT/episode_EEEEEEEE.parquet`, chunk = task,
  meta/episodes.jsonl + meta/tasks.jsonl, `annotations/task-TTTT/...json` with skill segments).
- "lerobot-v2.1": stock v2.1 (`data/chunk-XXX/episode_XXXXXX.parquet`, one mp4 per episode and camera).
- "lerobot-v3.0": many episodes per parquet and mp4 file; meta/episodes/chunk-XXX/file-XXX.parquet gives each
  episode's data file, video files and [from, to) timestamps inside them; tasks in meta/tasks.parquet.

Listing episodes reads only meta files. Every inconsistency raises `DatasetError` naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import posixpath
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_loaders import meta_fields, storage, video_decode
from data_loaders.behavior_facts import ACTION_DIM, CAMERAS, NUM_TASKS, PROPRIO_DIM, RGB_VIDEO_KEYS, proprio_to_state
from data_loaders.episode import DatasetError, Episode, EpisodeRef, SkillSegment

LAYOUTS = ("b1k-v2.1", "lerobot-v2.1", "lerobot-v3.0")
SUPPORTED_VERSIONS = ("v2.1", "v3.0")
DEFAULT_ANNOTATION_PATH = "annotations/task-{episode_chunk:04d}/episode_{episode_index:08d}.json"
_WIDTHS = {"observation.state": PROPRIO_DIM, "action": ACTION_DIM}


class MissingAnnotationError(DatasetError):
    """A b1k-layout episode has no annotation file; callers may skip the episode or read it without skills."""


@dataclasses.dataclass(frozen=True)
class _EpisodeMeta:
    ref: EpisodeRef
    # v3.0 only: where the episode lives inside multi-episode files.
    data_file: tuple[int, int] = (0, 0)  # (chunk_index, file_index)
    videos: dict[str, tuple[int, int, float, float]] = dataclasses.field(default_factory=dict)


class LeRobotSource:
    """Reads a LeRobot-format dataset rooted at a local path, file:// or s3:// URL (implements `EpisodeSource`)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._fs, self._root = storage.resolve(self.url)
        info = self._read_json("meta/info.json", hint=(
            f"{self.url} is not a LeRobot dataset root; point the URL at the directory that contains meta/"))
        if isinstance(info, dict):
            for key in ("fps", "data_path", "features"):  # a missing field is its own, clearer message
                if key not in info:
                    raise DatasetError(f"{self._u('meta/info.json')} lacks {key!r}; regenerate info.json")
        self.info: dict[str, Any] = meta_fields.check_info(info, self._u("meta/info.json"))
        version = self.info.get("codebase_version")
        if version not in SUPPORTED_VERSIONS:
            raise DatasetError(
                f"{self._u('meta/info.json')}: codebase_version {version!r} is not supported; supported versions are "
                f"{', '.join(SUPPORTED_VERSIONS)} (convert older datasets with LeRobot's conversion scripts)")
        if version == "v3.0":
            self.layout = "lerobot-v3.0"
        elif "annotation_path" in self.info or "/task-" in self.info["data_path"]:
            self.layout = "b1k-v2.1"
        else:
            self.layout = "lerobot-v2.1"
        self.fps = float(self.info["fps"])
        self._chunks_size = int(self.info.get("chunks_size") or 1000)
        self._episodes: dict[int, _EpisodeMeta] | None = None
        self._tasks: dict[int, str] | None = None

    # --- file access ------------------------------------------------------------------------------------------

    def _u(self, rel: str) -> str:
        return storage.join(self.url, rel)

    def _read_bytes(self, rel: str, *, hint: str, missing: type[DatasetError] = DatasetError) -> bytes:
        path = posixpath.join(self._root, rel)
        try:
            return storage.with_retries(lambda: self._fs.cat_file(path), what=f"read {self._u(rel)}")
        except FileNotFoundError as e:
            raise missing(f"{self._u(rel)} does not exist; {hint}") from e

    def _read_json(self, rel: str, *, hint: str, missing: type[DatasetError] = DatasetError) -> Any:
        data = self._read_bytes(rel, hint=hint, missing=missing)
        try:
            return json.loads(data)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise DatasetError(f"{self._u(rel)} is not valid JSON ({e}); re-download or regenerate it") from e

    def _read_jsonl(self, rel: str, *, hint: str) -> list[tuple[str, dict[str, Any]]]:
        """(where, object) per non-blank line; `where` names the file and line for error messages."""
        out = []
        for n, line in enumerate(self._read_bytes(rel, hint=hint).splitlines(), 1):
            if not line.strip():
                continue
            where = f"{self._u(rel)} line {n}"
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DatasetError(f"{where} is not valid JSON ({e}); regenerate the file") from e
            if not isinstance(row, dict):
                raise DatasetError(f"{where} holds {type(row).__name__}, expected a JSON object; regenerate the file")
            out.append((where, row))
        return out

    @contextlib.contextmanager
    def _parquet(self, rel: str) -> Iterator[pq.ParquetFile]:
        path = posixpath.join(self._root, rel)
        try:
            f = self._fs.open(path, "rb")
        except FileNotFoundError as e:
            raise DatasetError(f"parquet {self._u(rel)} does not exist; re-download the episode's data file") from e
        with f:
            try:
                yield pq.ParquetFile(f)
            except pa.ArrowInvalid as e:
                raise DatasetError(f"parquet {self._u(rel)} is not readable parquet ({e}); re-download it") from e

    def _check_task(self, task_index: int, where: str) -> int:
        if not 0 <= task_index < NUM_TASKS:
            raise DatasetError(f"{where}: task index {task_index} is outside 0..{NUM_TASKS - 1} (the BEHAVIOR-1K "
                               "2025 tasks); fix the task_index or drop the episode")
        return task_index

    # --- meta ------------------------------------------------------------------------------------------------

    def task_instructions(self) -> dict[int, str]:
        """{task_index: natural-language instruction} exactly as the dataset's tasks file states it."""
        if self._tasks is None:
            if self.layout == "lerobot-v3.0":
                rel = "meta/tasks.parquet"
                with self._parquet(rel) as pf:
                    table = pf.read()
                pandas_index = (table.schema.pandas_metadata or {}).get("index_columns", [])
                names = ["task", *[c for c in pandas_index if isinstance(c, str)], "__index_level_0__"]
                text_col = next((n for n in names if n in table.column_names), None)
                if text_col is None or "task_index" not in table.column_names:
                    raise DatasetError(f"{self._u(rel)} needs a task_index column and the task text (column or "
                                       "pandas index); regenerate it with LeRobot v3.0")
                rows = [(f"{self._u(rel)} row {n}", {"task_index": i, "task": t}) for n, (i, t) in enumerate(
                    zip(table.column("task_index").to_pylist(), table.column(text_col).to_pylist()))]
            else:
                rel = "meta/tasks.jsonl"
                rows = self._read_jsonl(rel, hint="every LeRobot v2.1 dataset needs meta/tasks.jsonl")
            fix = "each task entry needs an integer task_index and the task text"
            self._tasks = {
                self._check_task(meta_fields.get_int(r, "task_index", where, fix=fix), where):
                    meta_fields.get_str(r, "task", where, fix=fix) for where, r in rows}
        return dict(self._tasks)

    def _task_of(self, ep: int, tasks: list[str], rel: str, by_text: dict[str, int]) -> int:
        if tasks and tasks[0] in by_text:
            return by_text[tasks[0]]
        if self.layout == "b1k-v2.1":  # the chunk of a BEHAVIOR episode is its task id
            return self._check_task(ep // self._chunks_size, self._u(rel))
        raise DatasetError(f"{self._u(rel)}: episode {ep} has task {tasks!r}, which is not in the tasks file; "
                           "regenerate the meta files")

    def _meta(self) -> dict[int, _EpisodeMeta]:
        if self._episodes is None:
            by_text = {text: i for i, text in self.task_instructions().items()}
            if self.layout == "lerobot-v3.0":
                self._episodes = self._load_v3_meta(by_text)
            else:
                rel = "meta/episodes.jsonl"
                rows = self._read_jsonl(rel, hint="every LeRobot v2.1 dataset lists its episodes there")
                self._episodes = self._parse_meta_rows(rows, rel, by_text)
        return self._episodes

    def _parse_meta_rows(
        self, rows: list[tuple[str, dict[str, Any]]], rel: str, by_text: dict[str, int],
    ) -> dict[int, _EpisodeMeta]:
        """Episode entries (where, row) of meta/episodes.jsonl (v2.1) or one meta/episodes parquet file (v3.0)."""
        fix = "regenerate the episodes meta"
        get_int, get_number = meta_fields.get_int, meta_fields.get_number
        out = {}
        for where, row in rows:
            ep = get_int(row, "episode_index", where, fix=fix)
            tasks = meta_fields.get_str_list(row, "tasks", where, fix=fix)
            task = self._check_task(self._task_of(ep, tasks, rel, by_text), where)
            videos = {}
            for key in RGB_VIDEO_KEYS.values():  # v3.0: where each camera's frames sit in a shared mp4
                p = f"videos/{key}/"
                if p + "chunk_index" in row:
                    videos[key] = (get_int(row, p + "chunk_index", where, fix=fix),
                                   get_int(row, p + "file_index", where, fix=fix),
                                   get_number(row, p + "from_timestamp", where, fix=fix),
                                   get_number(row, p + "to_timestamp", where, fix=fix))
            v3 = self.layout == "lerobot-v3.0"
            data = (get_int(row, "data/chunk_index", where, fix=fix),
                    get_int(row, "data/file_index", where, fix=fix)) if v3 else (0, 0)
            out[ep] = _EpisodeMeta(EpisodeRef(ep, task, get_int(row, "length", where, fix=fix)), data, videos)
        return out

    def _load_v3_meta(self, by_text: dict[str, int]) -> dict[int, _EpisodeMeta]:
        files = sorted(self._fs.glob(posixpath.join(self._root, "meta/episodes/*/*.parquet")))
        if not files:
            raise DatasetError(f"{self._u('meta/episodes')} holds no chunk-XXX/file-XXX.parquet; a LeRobot v3.0 "
                               "dataset lists its episodes there - re-download the meta directory")
        out = {}
        for path in files:
            rel = posixpath.relpath(path, self._root)
            with self._parquet(rel) as pf:
                rows = pf.read(columns=[c for c in pf.schema_arrow.names if not c.startswith("stats/")]).to_pylist()
            out.update(self._parse_meta_rows([(f"{self._u(rel)} row {n}", r) for n, r in enumerate(rows)], rel,
                                             by_text))
        return out

    def episodes(self) -> list[EpisodeRef]:
        """All episodes in index order, from the meta files only (no data file is opened)."""
        return [m.ref for _, m in sorted(self._meta().items())]

    def _episode_meta(self, ep: int) -> _EpisodeMeta:
        try:
            return self._meta()[ep]
        except KeyError:
            raise DatasetError(f"episode {ep} is not listed in {self.url}/meta; pick one from episodes()") from None

    # --- low-dimensional data --------------------------------------------------------------------------------

    def data_file(self, ep: int) -> str:
        """Path (relative to the dataset root) of the parquet file holding episode `ep`'s rows."""
        meta = self._episode_meta(ep)
        if self.layout == "lerobot-v3.0":
            chunk, file = meta.data_file
            return self.info["data_path"].format(chunk_index=chunk, file_index=file)
        return self.info["data_path"].format(episode_chunk=ep // self._chunks_size, episode_index=ep)

    def _read_rows(self, ep: int, rel: str) -> pa.Table:
        with self._parquet(rel) as pf:
            return self._select_rows(pf, ep, rel)

    def _select_rows(self, pf: pq.ParquetFile, ep: int, rel: str) -> pa.Table:
        names = pf.schema_arrow.names
        required = (*_WIDTHS, "timestamp") + (("episode_index",) if self.layout == "lerobot-v3.0" else ())
        for col in required:
            if col not in names:
                raise DatasetError(f"parquet {self._u(rel)} lacks required column {col!r} (has {names}); "
                                   "re-export the episode with proprio, action and timestamp")
        cols = [c for c in (*_WIDTHS, "timestamp", "task_index", "frame_index", "episode_index") if c in names]
        self._check_column_types(pf.schema_arrow, cols, rel)
        if self.layout != "lerobot-v3.0":
            return pf.read(columns=cols)
        # Multi-episode file: read only the row groups whose episode_index statistics can contain `ep`.
        ci, md = names.index("episode_index"), pf.metadata
        groups = []
        for g in range(md.num_row_groups):
            st = md.row_group(g).column(ci).statistics
            if st is None or not st.has_min_max or st.min <= ep <= st.max:
                groups.append(g)
        table = pf.read_row_groups(groups, columns=cols)
        return table.filter(pc.equal(table.column("episode_index"), ep))

    def _check_column_types(self, schema: pa.Schema, cols: list[str], rel: str) -> None:
        """Scalar columns must be numbers (timestamp: float or int, possibly as a 1-element list; indices: int)."""
        for name in cols:
            if name in _WIDTHS:
                continue  # checked with their widths by _fixed_width
            t = schema.field(name).type
            if name == "timestamp" and (pa.types.is_list(t) or pa.types.is_fixed_size_list(t)):
                t = t.value_type
            ok = pa.types.is_integer(t) or (name == "timestamp" and pa.types.is_floating(t))
            if not ok:
                expected = "float or integer seconds" if name == "timestamp" else "integers"
                raise DatasetError(f"parquet {self._u(rel)}: column {name!r} has type {t}, expected {expected}; "
                                   "re-export the episode")

    def _fixed_width(self, table: pa.Table, name: str, rel: str) -> np.ndarray:
        width = _WIDTHS[name]
        col = table.column(name).combine_chunks()
        is_list = any(f(col.type) for f in (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list))
        if not is_list or not (pa.types.is_floating(col.type.value_type) or pa.types.is_integer(col.type.value_type)):
            raise DatasetError(f"parquet {self._u(rel)}: column {name!r} has type {col.type}, expected a list of "
                               f"{width} floats per row")
        lengths = pc.list_value_length(col)
        bad = pc.not_equal(lengths, width)
        if col.null_count or pc.any(bad).as_py():
            found = sorted({v for v in lengths.to_pylist() if v != width}, key=str)
            raise DatasetError(f"parquet {self._u(rel)}: column {name!r} must have width {width} in every row, found "
                               f"width(s) {found}; re-export the episode")
        return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(col), width)

    def read_episode(self, episode_index: int, *, require_annotations: bool = True) -> Episode:
        """All T rows of an episode: proprio (T, 256), 23-d state, actions (T, 23), timestamps, skill segments.

        In the b1k layout a missing annotation file raises `MissingAnnotationError` unless `require_annotations`
        is False, in which case the episode comes back with `has_annotations=False`.
        """
        meta = self._episode_meta(episode_index)
        rel = self.data_file(episode_index)
        table = self._read_rows(episode_index, rel)
        if "frame_index" in table.column_names:
            table = table.sort_by("frame_index")
        if table.num_rows != meta.ref.length:
            raise DatasetError(f"parquet {self._u(rel)} has {table.num_rows} rows for episode {episode_index} but "
                               f"the episodes meta says length {meta.ref.length}; regenerate the meta files")
        if "task_index" in table.column_names:
            tasks = set(table.column("task_index").to_pylist())
            for task in tasks:
                self._check_task(int(task), f"parquet {self._u(rel)}")
            if tasks != {meta.ref.task_index}:
                raise DatasetError(f"parquet {self._u(rel)}: task_index {sorted(tasks)} disagrees with the episodes "
                                   f"meta ({meta.ref.task_index}) for episode {episode_index}; fix either file")
        proprio = self._fixed_width(table, "observation.state", rel)
        ts = table.column("timestamp").combine_chunks()
        if pa.types.is_list(ts.type) or pa.types.is_fixed_size_list(ts.type):
            ts = ts.flatten()
        skills: tuple[SkillSegment, ...] = ()
        has_annotations = False
        if self.layout == "b1k-v2.1":
            try:
                skills, has_annotations = self._read_skills(episode_index, meta.ref.length), True
            except MissingAnnotationError:
                if require_annotations:
                    raise
        return Episode(episode_index=episode_index, task_index=meta.ref.task_index, proprio=proprio,
                       state=proprio_to_state(proprio), actions=self._fixed_width(table, "action", rel),
                       timestamps=np.asarray(ts.to_numpy(zero_copy_only=False), dtype=np.float64),
                       skills=skills, has_annotations=has_annotations)

    def annotation_file(self, ep: int) -> str:
        """Path (relative to the root) of a b1k episode's annotation JSON."""
        template = self.info.get("annotation_path", DEFAULT_ANNOTATION_PATH)
        return template.format(episode_chunk=ep // self._chunks_size, episode_index=ep)

    def _read_skills(self, ep: int, length: int) -> tuple[SkillSegment, ...]:
        rel = self.annotation_file(ep)
        doc = self._read_json(rel, missing=MissingAnnotationError, hint=(
            "re-download annotations/ or skip the episode (read_episode(..., require_annotations=False))"))
        segments = []
        try:
            for item in doc["skill_annotation"]:
                dur = item["frame_duration"]
                intervals = dur if dur and isinstance(dur[0], list) else [dur]  # some files hold several intervals
                for start, end in intervals:
                    if not 0 <= start <= end <= length:
                        raise DatasetError(
                            f"annotation {self._u(rel)}: skill {item.get('skill_idx')} frame_duration [{start}, {end}] "
                            f"is not inside the episode's {length} frames; fix or drop the annotation")
                    objects = item.get("object_id") or [[]]
                    segments.append(SkillSegment(
                        start=int(start), end=int(end), skill_id=int(item["skill_id"][0]),
                        description=str(item["skill_description"][0]),
                        object_ids=tuple(str(o) for o in (objects[0] if isinstance(objects[0], list) else objects))))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            if isinstance(e, DatasetError):
                raise
            raise DatasetError(f"annotation {self._u(rel)} is malformed ({type(e).__name__}: {e}); expected "
                               "skill_annotation items with skill_id, skill_description, frame_duration") from e
        return tuple(sorted(segments, key=lambda s: (s.start, s.end)))

    # --- videos ----------------------------------------------------------------------------------------------

    def _video(self, ep: int, camera: str) -> tuple[str, float, float | None]:
        """(relative path, start s, end s or None) of a camera's RGB frames of episode `ep`."""
        key = RGB_VIDEO_KEYS.get(camera)
        if key is None:
            raise ValueError(f"unknown camera {camera!r}; expected one of {CAMERAS}")
        template = self.info.get("video_path")
        if not template or key not in self.info["features"]:
            raise DatasetError(f"{self._u('meta/info.json')} declares no video feature {key!r}; this dataset has no "
                               "RGB videos for that camera")
        meta = self._episode_meta(ep)
        if self.layout != "lerobot-v3.0":
            return template.format(episode_chunk=ep // self._chunks_size, video_key=key, episode_index=ep), 0.0, None
        if key not in meta.videos:
            raise DatasetError(f"{self._u('meta/episodes')}: episode {ep} has no videos/{key}/* columns; regenerate "
                               "the episodes meta")
        chunk, file, start, end = meta.videos[key]
        return template.format(video_key=key, chunk_index=chunk, file_index=file), start, end

    def rgb_video_url(self, ep: int, camera: str) -> str:
        """URL of the mp4 holding `camera`'s RGB frames of episode `ep` (shared by many episodes in v3.0)."""
        return self._u(self._video(ep, camera)[0])

    def video_frame_count(self, ep: int, camera: str) -> int:
        """Frames of episode `ep` in `camera`'s video, counted by demuxing (for an up-front check)."""
        rel, start, end = self._video(ep, camera)
        first = round(start * self.fps)
        stop = None if end is None else round(end * self.fps)
        return video_decode.count_frames(self._u(rel), start=first, stop=stop, fps=self.fps)

    def decode_rgb_frame(self, ep: int, camera: str, frame: int, *, size: int | None = None) -> np.ndarray:
        """Random-access decode of one RGB frame (seek to the previous keyframe, decode forward)."""
        length = self._episode_meta(ep).ref.length
        if not 0 <= frame < length:
            raise ValueError(f"frame {frame} outside episode {ep} (0..{length - 1})")
        rel, start, _ = self._video(ep, camera)
        return video_decode.decode_frame_at(self._u(rel), frame, self.fps, offset_s=start, size=size)

    def iter_rgb_frames(self, episode_index: int, *, size: int | None = 224) -> Iterator[dict[str, np.ndarray]]:
        """Yield {camera: uint8 (H, W, 3)} for frames 0..T-1, decoding the three RGB videos in lockstep.

        T is the episode's number of parquet rows. A video with fewer or more frames raises `DatasetError` (when
        the shortfall is reached, or after frame T-1 for extra frames) naming the video and both counts.
        """
        length = self._episode_meta(episode_index).ref.length
        videos = {cam: self._video(episode_index, cam) for cam in CAMERAS}
        its = {cam: video_decode.iter_frames(self._u(rel), start_s=s, end_s=e, fps=self.fps, size=size)
               for cam, (rel, s, e) in videos.items()}
        data = self._u(self.data_file(episode_index))
        try:
            for t in range(length):
                frames = {}
                for cam, it in its.items():
                    frame = next(it, None)
                    if frame is None:
                        raise DatasetError(f"video {self._u(videos[cam][0])} has {t} frames for episode "
                                           f"{episode_index} but parquet {data} has {length} rows; re-encode the video")
                    frames[cam] = frame
                yield frames
            for cam, it in its.items():
                extra = sum(1 for _ in it)
                if extra:
                    raise DatasetError(f"video {self._u(videos[cam][0])} has {length + extra} frames for episode "
                                       f"{episode_index} but parquet {data} has {length} rows; re-encode the video")
        finally:
            for it in its.values():
                it.close()
