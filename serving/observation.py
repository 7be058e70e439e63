"""Evaluator observations (behavior_data_and_protocol §4.4) -> the model's inputs, with errors that name the
offending key and what was expected.

Images arrive RGBA at 224x224 (RGBLowResWrapper) or 720/480 (DefaultWrapper); the alpha channel is dropped and
larger frames are resized with padding to 224, exactly as the training frames were (video_decode.resize_square).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data_loaders.behavior_facts import CAMERAS, EVAL_CAMERA_KEYS, MODEL_IMAGE_SIZE, PROPRIO_DIM, proprio_to_state
from data_loaders.video_decode import resize_square
from serving.wire import ProtocolError

PROPRIO_KEY = "robot_r1::proprio"
TASK_KEY = "task_id"
MAX_IMAGE_SIDE = 4096


class ObservationError(ProtocolError):
    """An observation with a missing key, wrong dtype or shape, or an unknown task."""


@dataclasses.dataclass(frozen=True)
class Observation:
    images: np.ndarray  # (3, 224, 224, 3) uint8 in model camera order (head, left wrist, right wrist)
    state: np.ndarray  # (23,) float32, action order
    task: int


def _image(msg: dict[str, Any], camera: str) -> np.ndarray:
    key = EVAL_CAMERA_KEYS[camera]
    img = msg.get(key)
    if img is None:
        raise ObservationError(f"observation has no {key!r} ({camera} camera); send all three RGB cameras")
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise ObservationError(f"{key!r} must be a uint8 array, got {getattr(img, 'dtype', type(img).__name__)}")
    if img.ndim != 3 or img.shape[2] not in (3, 4) or not (0 < img.shape[0] <= MAX_IMAGE_SIDE
                                                            and 0 < img.shape[1] <= MAX_IMAGE_SIDE):
        raise ObservationError(f"{key!r} must have shape (H, W, 4) RGBA or (H, W, 3), H, W <= {MAX_IMAGE_SIDE}; got "
                               f"{img.shape}")
    return resize_square(np.ascontiguousarray(img[..., :3]), MODEL_IMAGE_SIZE)


def parse_observation(msg: Any, *, num_tasks: int) -> Observation:
    """Validate one observation message and build the model inputs (ObservationError on bad input)."""
    if not isinstance(msg, dict):
        raise ObservationError(f"an observation must be a map, got {type(msg).__name__}")
    images = np.stack([_image(msg, cam) for cam in CAMERAS])
    proprio = msg.get(PROPRIO_KEY)
    if proprio is None:
        raise ObservationError(f"observation has no {PROPRIO_KEY!r} (the {PROPRIO_DIM}-d R1Pro proprioception)")
    if not isinstance(proprio, np.ndarray) or proprio.dtype.kind != "f":
        raise ObservationError(f"{PROPRIO_KEY!r} must be a float32 array, got "
                               f"{getattr(proprio, 'dtype', type(proprio).__name__)}")
    if proprio.shape != (PROPRIO_DIM,):
        raise ObservationError(f"{PROPRIO_KEY!r} must have shape ({PROPRIO_DIM},), got {proprio.shape}")
    if not np.all(np.isfinite(proprio)):
        raise ObservationError(f"{PROPRIO_KEY!r} has non-finite values")
    task = msg.get(TASK_KEY)
    if task is None:
        raise ObservationError(f"observation has no {TASK_KEY!r}: send it as int64 of shape (1,) (the 2025 "
                               f"evaluator does since 2025-10-29)")
    if isinstance(task, np.ndarray):
        if task.dtype.kind not in "iu" or task.size != 1:
            raise ObservationError(f"{TASK_KEY!r} must be an integer array of shape (1,), got {task.dtype} "
                                   f"{task.shape}")
        task = int(task.reshape(-1)[0])
    elif isinstance(task, (int, np.integer)) and not isinstance(task, bool):
        task = int(task)
    else:
        raise ObservationError(f"{TASK_KEY!r} must be an int64 array of shape (1,), got {type(task).__name__}")
    if not 0 <= task < num_tasks:
        raise ObservationError(f"unknown task id {task}: this server serves task ids 0..{num_tasks - 1}")
    return Observation(images=images, state=proprio_to_state(proprio), task=task)
