"""Encode frame streams into mp4 files the way the BEHAVIOR-1K 2025 dataset stores its videos.

Reference (behavior_data_and_protocol.md §1.9): one mp4 per camera and modality, PyAV `add_stream(codec, rate=30)`.
- rgb and seg_instance_id: libx265, yuv420p, x265-params `log-level=none`;
- depth: libx265 *lossless* yuv420p10le, fed the log-quantised uint16 depth as gray16le. The real info.json claims
  yuv420p16le; the files are 10-bit and we reproduce that mismatch on purpose so readers are tested against it;
- seg: each pixel's instance id becomes its index in the episode's `unique_ins_ids` list, then the colour
  `generate_yuv_palette(n)[index]`, written as plain RGB24.

RGB may instead use AV1 (libsvtav1, gop 2, crf 30, the LeRobot default) or H.264 for reader tests. We always use
the fastest preset: the synthetic content is simple, and test time matters more than bitrate.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence

import av
import numpy as np

from data_loaders.behavior_facts import FPS


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    """How one video stream is encoded: FFmpeg encoder, stored pixel format and encoder options."""

    encoder: str
    pix_fmt: str
    options: tuple[tuple[str, str], ...]
    gop_size: int | None = None


RGB_SPECS: dict[str, VideoSpec] = {
    "hevc": VideoSpec("libx265", "yuv420p", (("preset", "ultrafast"), ("x265-params", "log-level=none"))),
    # LeRobot's AV1 settings; preset 11 is SVT-AV1's fastest non-realtime preset.
    "av1": VideoSpec("libsvtav1", "yuv420p", (("preset", "11"), ("crf", "30")), gop_size=2),
    "h264": VideoSpec("libx264", "yuv420p", (("preset", "ultrafast"),)),
}
SEG_SPEC = RGB_SPECS["hevc"]
DEPTH_SPEC = VideoSpec(
    "libx265", "yuv420p10le", (("preset", "ultrafast"), ("x265-params", "lossless=1:log-level=none")))

# SVT-AV1 prints a banner and warnings to stderr on every encoder open unless told otherwise (errors only).
os.environ.setdefault("SVT_LOG", "1")


def rgb_spec(codec: str) -> VideoSpec:
    """The RGB stream spec for a `--codec` choice ("hevc", "av1" or "h264")."""
    try:
        return RGB_SPECS[codec]
    except KeyError:
        raise ValueError(f"unknown RGB codec {codec!r}: choose one of {sorted(RGB_SPECS)}") from None


class VideoWriter:
    """Incremental mp4 writer: `write(frame)` per frame, then `close()` (or use it as a context manager).

    Frames are uint8 (H, W, 3) for input_format rgb24 or uint16 (H, W) for gray16le. Frame i gets pts i in the
    encoder's 1/30 s time base, so decoded frame i lines up with parquet row i (timestamp i/30). Several writers
    can be open at once, which lets a caller render each frame once for all of a camera's modalities.
    """

    def __init__(self, path: str, *, width: int, height: int, spec: VideoSpec, input_format: str = "rgb24"):
        self.path, self.width, self.height, self.input_format = path, width, height, input_format
        self.count = 0
        self._container = av.open(path, mode="w", format="mp4")
        self._stream = self._container.add_stream(spec.encoder, rate=FPS)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = spec.pix_fmt
        self._stream.options = dict(spec.options)
        if spec.gop_size is not None:
            self._stream.codec_context.gop_size = spec.gop_size
        self._pix_fmt = spec.pix_fmt

    def write(self, frame_array: np.ndarray) -> None:
        if frame_array.shape[:2] != (self.height, self.width):
            raise ValueError(f"{self.path}: frame {self.count} has shape {frame_array.shape}, "
                             f"expected ({self.height}, {self.width})")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_array), format=self.input_format)
        # Convert explicitly (not inside the encoder) so the rgb24/gray16le -> yuv conversion is visible here.
        frame = frame.reformat(format=self._pix_fmt)
        frame.pts = self.count
        self._container.mux(self._stream.encode(frame))
        self.count += 1

    def close(self) -> None:
        if self._container is None:
            return
        try:
            self._container.mux(self._stream.encode(None))  # flush delayed (B-)frames
        finally:
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_video(path: str, frames: Iterable[np.ndarray], *, width: int, height: int, spec: VideoSpec,
                 input_format: str = "rgb24") -> int:
    """Encode all `frames` into an mp4 at 30 fps (see VideoWriter); returns the number of frames written."""
    with VideoWriter(path, width=width, height=height, spec=spec, input_format=input_format) as writer:
        for frame in frames:
            writer.write(frame)
    return writer.count


def generate_yuv_palette(n: int) -> np.ndarray:
    """The dataset's instance-segmentation palette: `n` distinct uint8 colours, shape (n, 3).

    m = ceil(n ** (1/3)) levels per channel, Y in linspace(16, 235, m), U and V in linspace(16, 240, m), enumerated
    with Y outermost and V innermost; the triples are then used directly as RGB.
    """
    if n < 1:
        raise ValueError(f"palette size must be >= 1, got {n}")
    # Exactly the dataset's formula, including float cube-root rounding (27 ids -> m = 4, not 3).
    m = int(np.ceil(n ** (1 / 3)))
    y = np.linspace(16, 235, m)
    uv = np.linspace(16, 240, m)
    grid = np.array([(a, b, c) for a in y for b in uv for c in uv], dtype=np.float64)
    return grid[:n].astype(np.uint8)


def seg_to_rgb(ids: np.ndarray, unique_ins_ids: Sequence[int]) -> np.ndarray:
    """Colour an (H, W) map of non-negative instance ids with the palette index of each id in `unique_ins_ids`."""
    order = np.asarray(unique_ins_ids, dtype=np.int64)
    lut = np.full(int(max(order.max(), ids.max())) + 1, -1, dtype=np.int64)
    lut[order] = np.arange(len(order))
    index = lut[ids]
    if (index < 0).any():
        missing = sorted(set(np.unique(ids[index < 0]).tolist()))
        raise ValueError(f"instance ids {missing} are not in unique_ins_ids {order.tolist()}")
    return generate_yuv_palette(len(order))[index]
