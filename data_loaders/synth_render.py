"""Camera images of a synthetic episode: rgb, metric depth and instance ids for the head and wrist cameras.

What each camera shows is chosen so the policy input carries the information the action depends on:
- head: a wall above a floor whose texture shifts with the robot pose, and a bright square of the task colour
  (the current target object) centred at 0.5 + SQUARE_GAIN * g(t) of the image; anti-aliased so its centroid is
  a smooth, linear function of the goal;
- left/right wrist: a background whose brightness grows with that gripper's opening, two finger bars whose gap is
  the opening, and a disk of the target object.
Depth and segmentation are consistent with the rgb geometry (square/disk nearer than the background; ids of the
wall, floor, gripper links and target objects from the task world's instance registry).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from data_loaders import behavior_facts as bf
from data_loaders.synth_content import EpisodeContent
from data_loaders.video_encode import generate_yuv_palette, seg_to_rgb

HORIZON = 0.45  # wall/floor boundary, fraction of the head image height
SQUARE_SIDE = 1 / 8  # goal square side, fraction of the head image size
SQUARE_GAIN = 0.35  # square centre = 0.5 + SQUARE_GAIN * g, in image fractions (x right, y down)
_WALL_RGB = np.array([45.0, 50.0, 70.0])
_FLOOR_RGB = np.array([72.0, 60.0, 46.0])
_WRIST_TINT = {"left_wrist": np.array([70.0, 110.0, 200.0]), "right_wrist": np.array([200.0, 110.0, 70.0])}
_FINGER_RGB = np.array([35.0, 35.0, 40.0])


def square_center(goal: np.ndarray) -> np.ndarray:
    """Goal (..., 2) -> square centre in image fractions (..., 2) as (x, y)."""
    return 0.5 + SQUARE_GAIN * np.asarray(goal)


def unique_ins_ids(content: EpisodeContent, camera: str) -> list[int]:
    """Sorted instance ids visible in `camera` over the episode (the episode metadata's `unique_ins_ids`)."""
    w = content.world
    targets = {w.objects[i].ins_id for i in np.unique(content.target_obj)}
    fixed = {w.wall_id, w.floor_id} if camera == "head" else {w.floor_id, w.gripper_ids[camera.split("_")[0]]}
    return sorted(fixed | targets)


def _coverage_1d(n: int, lo: float, hi: float) -> np.ndarray:
    """Fraction of each of n pixels covered by the interval [lo, hi) (in pixel units)."""
    edges = np.arange(n, dtype=np.float64)
    return np.clip(np.minimum(edges + 1.0, hi) - np.maximum(edges, lo), 0.0, 1.0)


class CameraRenderer:
    """Renders one camera of one episode; `frame(t)` returns (rgb uint8 (H, W, 3), depth uint16 (H, W),
    seg uint8 (H, W, 3)): rgb24, log-quantised depth (behavior_facts.quantize_depth) and palette-coloured
    instance ids, exactly what the dataset's encoders receive.

    Everything that does not move is rendered once here; a frame only redraws the moving parts, which keeps full
    resolution (720x720 head) affordable.
    """

    def __init__(self, content: EpisodeContent, camera: str, size: int):
        if camera not in bf.CAMERAS:
            raise ValueError(f"unknown camera {camera!r}: choose one of {bf.CAMERAS}")
        self.content, self.camera, self.size = content, camera, size
        self.ids = unique_ins_ids(content, camera)
        self._palette = generate_yuv_palette(len(self.ids))
        self._color = np.array(content.world.color, dtype=np.float32)
        self._y = ((np.arange(size) + 0.5) / size).astype(np.float32)[:, None]
        self._x = ((np.arange(size) + 0.5) / size).astype(np.float32)[None, :]
        w = content.world
        if camera == "head":
            self._horizon_row = int(np.count_nonzero(self._y[:, 0] < HORIZON))
            wall = np.broadcast_to(self._y < HORIZON, (size, size))
            depth = np.where(wall, 4.0 + 0.3 * np.sin(2 * np.pi * self._x),
                             0.9 + 3.1 * (1.0 - (self._y - HORIZON) / (1.0 - HORIZON)))
            ids = np.where(wall, w.wall_id, w.floor_id)
            self._near_q = bf.quantize_depth(1.5)
        else:
            self._side = camera.split("_")[0]
            dist = np.hypot(self._x - 0.5, self._y - 0.35) * size
            disk = np.clip(0.14 * size - dist + 0.5, 0.0, 1.0)[..., None]
            self._disk_mask = disk[..., 0] >= 0.5
            background = _WRIST_TINT[camera].astype(np.float32) * (0.85 + 0.15 * self._y)[..., None]
            self._bg_part = background * (1.0 - disk)  # scaled by the gripper opening every frame
            self._disk_part = 0.85 * self._color * disk
            self._finger_row = int(np.count_nonzero(self._y[:, 0] <= 0.55))
            self._finger_q = bf.quantize_depth(0.06)
            self._finger_color = self._palette_color(w.gripper_ids[self._side])
            depth = np.where(self._disk_mask, 0.35, 1.0)
            ids = np.full((size, size), w.floor_id)
            ids[self._disk_mask] = w.objects[int(content.target_obj[0])].ins_id
        self._depth_q = bf.quantize_depth(depth)
        self._seg = seg_to_rgb(ids, self.ids)

    def _palette_color(self, ins_id: int) -> np.ndarray:
        return self._palette[self.ids.index(ins_id)]

    def _target_color(self, t: int) -> np.ndarray:
        return self._palette_color(self.content.world.objects[int(self.content.target_obj[t])].ins_id)

    def frame(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._head(t) if self.camera == "head" else self._wrist(t)

    def _head(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c, size, h = self.content, self.size, self._horizon_row
        pos = c.proprio[t, bf.PROPRIO["robot_pos"]]
        yaw = float(c.proprio[t, bf.PROPRIO["robot_2d_ori"]][0])
        # The view shifts with the robot pose: wall stripes follow the yaw, the floor checker the position.
        rgb = np.empty((size, size, 3), dtype=np.float32)
        rgb[:h] = _WALL_RGB + 12.0 * np.sin(2 * np.pi * (3.0 * self._x + yaw / np.pi))[..., None]
        checker = (np.sin(2 * np.pi * (4.0 * self._x + 0.5 * pos[0]))
                   * np.sin(2 * np.pi * (4.0 * self._y[h:] + 0.5 * pos[1])))
        rgb[h:] = _FLOOR_RGB + 12.0 * checker[..., None]
        # The target square, anti-aliased so its centroid moves smoothly with the goal.
        cx, cy = square_center(c.goal[t]) * size
        half = SQUARE_SIDE * size / 2
        cov_y, cov_x = _coverage_1d(size, cy - half, cy + half), _coverage_1d(size, cx - half, cx + half)
        rows, cols = np.flatnonzero(cov_y), np.flatnonzero(cov_x)
        box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        cov = np.outer(cov_y[box[0]], cov_x[box[1]]).astype(np.float32)[..., None]
        rgb[box] += (self._color - rgb[box]) * cov
        inside = np.zeros((size, size), dtype=bool)
        inside[box] = cov[..., 0] >= 0.5
        depth = self._depth_q.copy()
        depth[inside] = self._near_q
        seg = self._seg.copy()
        seg[inside] = self._target_color(t)
        return _to_uint8(rgb), depth, seg

    def _wrist(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        grip = self.content.state[t, 14 if self._side == "left" else 22]
        opening = float(np.clip((grip + 1.0) / 2.0, 0.0, 1.0))
        rgb = (0.3 + 0.6 * opening) * self._bg_part + self._disk_part  # brighter when the gripper is open
        rgb = np.broadcast_to(rgb, (self.size, self.size, 3)).copy()
        gap = 0.08 + 0.3 * opening  # finger bars move apart as the gripper opens
        cols = (np.abs(self._x[0] - (0.5 - gap)) < 0.05) | (np.abs(self._x[0] - (0.5 + gap)) < 0.05)
        fingers = np.s_[self._finger_row:, cols]
        rgb[fingers] = _FINGER_RGB
        depth = self._depth_q.copy()
        depth[fingers] = self._finger_q
        seg = self._seg.copy()
        seg[self._disk_mask] = self._target_color(t)
        seg[fingers] = self._finger_color
        return _to_uint8(rgb), depth, seg


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def render(content: EpisodeContent, modality: str, camera: str, size: int) -> Iterator[np.ndarray]:
    """Yield the T frames of one video (see CameraRenderer.frame for the formats)."""
    if modality not in bf.MODALITIES:
        raise ValueError(f"unknown modality {modality!r}: choose one of {bf.MODALITIES}")
    renderer = CameraRenderer(content, camera, size)
    for t in range(content.length):
        yield renderer.frame(t)[bf.MODALITIES.index(modality)]
