"""Evaluator observations (behavior_data_and_protocol §4.4) -> the model's inputs, with errors that name the
offending key and what was expected.

Images arrive RGBA at 224x224 (RGBLowResWrapper) or 720/480 (DefaultWrapper); the alpha channel is dropped and
larger frames are resized with padding to 224, exactly as the training frames were (video_decode.resize_square).
Parsing checks every camera's dtype and shape (cheap: no pixel is read) but does not convert the pixels: most
steps are answered from the current action chunk and never look at the images, so `Observation.images` (alpha
dropped, resized) is computed only when the server infers (issue 21: converting three images on every step cost
5-12 ms at 224 px). Everything here is CPU work on message-sized data, so the server runs it off its event loop.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from data_loaders.behavior_facts import CAMERAS, EVAL_CAMERA_KEYS, MODEL_IMAGE_SIZE, PROPRIO_DIM, proprio_to_state
from data_loaders.video_decode import resize_square
from serving.wire import ProtocolError, unpack

PROPRIO_KEY = "robot_r1::proprio"
TASK_KEY = "task_id"
# The evaluator's largest camera is the 720x720 head (DefaultWrapper); 1024 leaves room for a re-rendered camera
# and bounds the resize work: three 1024x1024 RGBA frames are 12 MB.
DEFAULT_MAX_IMAGE_SIDE = 1024


class ObservationError(ProtocolError):
    """An observation with a missing key, wrong dtype or shape, or an unknown task."""


@dataclasses.dataclass(frozen=True)
class Observation:
    cameras: tuple[np.ndarray, ...]  # validated camera frames as received (views of the message), model order
    state: np.ndarray  # (23,) float32, action order
    task: int
    nbytes: int = 0  # size of the message it came from (the server's decoding lanes go by it)

    @functools.cached_property
    def images(self) -> np.ndarray:
        """(3, 224, 224, 3) uint8 in model camera order (head, left wrist, right wrist): alpha dropped, resized."""
        return np.stack([resize_square(np.ascontiguousarray(img[..., :3]), MODEL_IMAGE_SIZE) for img in self.cameras])


def _camera(msg: dict[str, Any], camera: str, max_side: int) -> np.ndarray:
    """The camera's frame, checked (dtype, shape, sides) without touching its pixels."""
    key = EVAL_CAMERA_KEYS[camera]
    img = msg.get(key)
    if img is None:
        raise ObservationError(f"observation has no {key!r} ({camera} camera); send all three RGB cameras")
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise ObservationError(f"{key!r} must be a uint8 array, got {getattr(img, 'dtype', type(img).__name__)}")
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ObservationError(f"{key!r} must have shape (H, W, 4) RGBA or (H, W, 3), got {img.shape}")
    h, w = img.shape[:2]
    if not (0 < h <= max_side and 0 < w <= max_side):
        raise ObservationError(f"{key!r} is {h}x{w}: each side must be 1..{max_side} (--max-image-side; the "
                               f"evaluator sends 224x224, or 720x720 head and 480x480 wrists)")
    if min(h, w) * MODEL_IMAGE_SIZE < max(h, w):  # resizing to 224 would leave a side of 0 pixels
        raise ObservationError(f"{key!r} is {h}x{w}: an aspect ratio beyond {MODEL_IMAGE_SIZE}:1 leaves nothing "
                               f"after resizing to {MODEL_IMAGE_SIZE}x{MODEL_IMAGE_SIZE}; send the camera frame")
    return img


def _state(msg: dict[str, Any]) -> np.ndarray:
    """The model's 23-d float32 state. Finiteness is checked after the cast: a float64 1e300 is finite, but
    becomes inf in float32, and then so would most of the actions."""
    proprio = msg.get(PROPRIO_KEY)
    if proprio is None:
        raise ObservationError(f"observation has no {PROPRIO_KEY!r} (the {PROPRIO_DIM}-d R1Pro proprioception)")
    if not isinstance(proprio, np.ndarray) or proprio.dtype.kind != "f":
        raise ObservationError(f"{PROPRIO_KEY!r} must be a float32 array, got "
                               f"{getattr(proprio, 'dtype', type(proprio).__name__)}")
    if proprio.shape != (PROPRIO_DIM,):
        raise ObservationError(f"{PROPRIO_KEY!r} must have shape ({PROPRIO_DIM},), got {proprio.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        as_model = proprio.astype(np.float32)
        state = proprio_to_state(as_model)  # sums the finger widths: two huge finite values can overflow too
    bad = np.flatnonzero(~np.isfinite(as_model))
    if bad.size:
        i = int(bad[0])
        raise ObservationError(f"{PROPRIO_KEY!r} has {bad.size} value(s) that are not finite in float32 (the "
                               f"model's dtype), the first at index {i}: {proprio[i]!r}; send finite float32 values")
    if not np.all(np.isfinite(state)):
        raise ObservationError(f"{PROPRIO_KEY!r} overflows float32 in the 23-d state derived from it (gripper "
                               f"widths); send values within the robot's ranges")
    return state


def parse_observation(msg: Any, *, num_tasks: int, max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
                      nbytes: int = 0) -> Observation:
    """Validate one observation message and build the model inputs (ObservationError on bad input); the images
    are converted on first use of `.images`."""
    if not isinstance(msg, dict):
        raise ObservationError(f"an observation must be a map, got {type(msg).__name__}")
    cameras = tuple(_camera(msg, cam, max_image_side) for cam in CAMERAS)
    state = _state(msg)
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
    return Observation(cameras=cameras, state=state, task=task, nbytes=nbytes)


def decode(message: bytes, *, num_tasks: int, max_image_side: int = DEFAULT_MAX_IMAGE_SIDE) -> Observation | None:
    """A binary frame -> its Observation, or None for `{"reset": true}` (ProtocolError on anything else)."""
    msg = unpack(message)
    if isinstance(msg, dict) and "reset" in msg:
        return None
    return parse_observation(msg, num_tasks=num_tasks, max_image_side=max_image_side, nbytes=len(message))
