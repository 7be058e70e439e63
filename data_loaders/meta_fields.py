"""Type checks of the LeRobot meta fields the reader uses (meta/info.json, episodes and tasks entries).

A dataset from elsewhere may carry `"fps": "thirty"` or a `data_path` with an unknown placeholder; without these
checks that surfaces as a ValueError or KeyError deep inside the reader. Here it is one DatasetError naming the
file, the field, what it holds and what was expected.
"""

from __future__ import annotations

from typing import Any

from data_loaders.behavior_facts import ACTION_DIM, PROPRIO_DIM
from data_loaders.episode import DatasetError

# Placeholders each path template of info.json is formatted with (LeRobot's own names per version).
TEMPLATE_FIELDS = {
    "v2.1": {"data_path": ("episode_chunk", "episode_index"),
             "video_path": ("episode_chunk", "video_key", "episode_index"),
             "annotation_path": ("episode_chunk", "episode_index")},
    "v3.0": {"data_path": ("chunk_index", "file_index"),
             "video_path": ("video_key", "chunk_index", "file_index")},
}
# Widths the reader requires, checked against the declared feature shapes.
FEATURE_WIDTHS = {"observation.state": PROPRIO_DIM, "action": ACTION_DIM}
_SAMPLE = {"episode_chunk": 0, "episode_index": 0, "chunk_index": 0, "file_index": 0,
           "video_key": "observation.images.rgb.head"}


def _show(value: Any) -> str:
    text = repr(value)
    return (text if len(text) <= 60 else text[:57] + "...") + f" ({type(value).__name__})"


def _bad(where: str, field: str, value: Any, expected: str, fix: str) -> DatasetError:
    return DatasetError(f"{where}: field {field!r} is {_show(value)}, expected {expected}; {fix}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def get_int(doc: dict[str, Any], field: str, where: str, *, minimum: int = 0, fix: str,
            default: int | None = None) -> int:
    """doc[field] as an int >= minimum (an integral float such as 30.0 is accepted: JSON writers differ)."""
    if field not in doc and default is not None:
        return default
    if field not in doc:
        raise DatasetError(f"{where}: field {field!r} is missing; {fix}")
    v = doc[field]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v) or v < minimum:
        raise _bad(where, field, doc[field], f"an integer >= {minimum}", fix)
    return v


def get_number(doc: dict[str, Any], field: str, where: str, *, fix: str, positive: bool = False) -> float:
    v = doc.get(field)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or (positive and v <= 0):
        raise _bad(where, field, v, "a positive number" if positive else "a number", fix)
    return float(v)


def get_str(doc: dict[str, Any], field: str, where: str, *, fix: str) -> str:
    v = doc.get(field)
    if not isinstance(v, str):
        raise _bad(where, field, v, "a string", fix)
    return v


def get_str_list(doc: dict[str, Any], field: str, where: str, *, fix: str) -> list[str]:
    """doc[field] as a list of strings; absent or null is the empty list."""
    v = doc.get(field)
    if v is None:
        return []
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise _bad(where, field, v, "a list of strings", fix)
    return list(v)


def check_template(template: Any, field: str, where: str, names: tuple[str, ...]) -> str:
    """A path template that formats with exactly the placeholders `names` (and their format specs)."""
    fix = f"use a template with the placeholders {{{'}, {'.join(names)}}} only, as LeRobot writes it"
    if not isinstance(template, str) or not template:
        raise _bad(where, field, template, "a path template string", fix)
    try:
        template.format(**{n: _SAMPLE[n] for n in names})
    except (KeyError, IndexError, ValueError) as e:
        raise DatasetError(f"{where}: field {field!r} = {template!r} cannot be formatted "
                           f"({type(e).__name__}: {e}); {fix}") from None
    return template


def check_info(info: Any, where: str) -> dict[str, Any]:
    """meta/info.json, type-checked in every field the reader uses; returns it unchanged."""
    fix = "fix meta/info.json or regenerate it with LeRobot"
    if not isinstance(info, dict):
        raise DatasetError(f"{where} holds {_show(info)}, expected a JSON object; {fix}")
    version = info.get("codebase_version")
    if version is not None and not isinstance(version, str):
        raise _bad(where, "codebase_version", version, 'a version string like "v2.1"', fix)
    get_number(info, "fps", where, fix=fix, positive=True)
    get_int(info, "chunks_size", where, minimum=1, fix=fix, default=1000)
    for field in ("total_episodes", "total_frames", "total_tasks", "total_videos", "total_chunks"):
        if info.get(field) is not None:
            get_int(info, field, where, fix=fix)
    for field, names in TEMPLATE_FIELDS.get(version, {}).items():
        if field == "data_path" or info.get(field) is not None:  # no videos / annotations: null or absent
            check_template(info.get(field), field, where, names)
    _check_features(info.get("features"), where, fix)
    return info


def _check_features(features: Any, where: str, fix: str) -> None:
    if not isinstance(features, dict):
        raise _bad(where, "features", features, "an object of {name: {dtype, shape, ...}}", fix)
    for name, feat in features.items():
        field = f"features.{name}"
        if not isinstance(feat, dict):
            raise _bad(where, field, feat, "an object with dtype and shape", fix)
        if "dtype" in feat and not isinstance(feat["dtype"], str):
            raise _bad(where, f"{field}.dtype", feat["dtype"], 'a dtype name like "float32" or "video"', fix)
        shape = feat.get("shape")
        # The BEHAVIOR data declares observation.task_info with shape [null] (variable width).
        if shape is not None and (not isinstance(shape, list) or not all(
                s is None or (_is_int(s) and s >= 0) for s in shape)):
            raise _bad(where, f"{field}.shape", shape, "a list of non-negative integers", fix)
        width = FEATURE_WIDTHS.get(name)
        if width is not None and shape is not None and shape not in ([width], [1, width]):
            raise _bad(where, f"{field}.shape", shape, f"[{width}] (the BEHAVIOR R1Pro {name} width)", fix)
