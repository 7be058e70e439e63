"""PyAV video decoding for dataset readers: sequential, random access, frame counting and the eval-style resize.

Works for every codec the bundled FFmpeg decodes (HEVC as in BEHAVIOR 2025, AV1 as in LeRobot v3, H.264) and for
local paths, file:// and s3:// URLs (remote files are streamed through fsspec file objects, which PyAV reads
like any seekable file).

Frames are addressed by index, not by float timestamps: index = round((pts - stream start) * time_base * fps).
All BEHAVIOR/LeRobot videos are constant frame rate, so this is exact and avoids the tolerance juggling of
timestamp matching. Errors about the file's content raise `DatasetError` naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
from fractions import Fraction
from typing import IO, Iterator, Union

import av
import numpy as np
from PIL import Image

from data_loaders import storage
from data_loaders.episode import DatasetError

VideoSource = Union[str, IO[bytes]]

# Remote reads go through fsspec's read-ahead cache; 8 MiB blocks keep the number of GETs per video small while
# a random-access seek near the end of a file does not pull the whole object.
_REMOTE_BLOCK_SIZE = 8 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """Stream properties as the container reports them (the frame count is not here: see `count_frames`)."""

    codec: str
    width: int
    height: int
    fps: float
    pix_fmt: str


def _name(src: VideoSource) -> str:
    return src if isinstance(src, str) else str(getattr(src, "path", getattr(src, "name", repr(src))))


@contextlib.contextmanager
def open_video(src: VideoSource) -> Iterator[av.container.InputContainer]:
    """Open a video for reading from a local path, file:// or s3:// URL, or an open binary file object.

    The caller keeps ownership of a passed file object; a URL is opened (and closed) here.
    """
    with contextlib.ExitStack() as stack:
        if isinstance(src, str):
            fs, path = storage.resolve(src)
            if storage.is_local(fs):
                if not fs.exists(path):
                    raise DatasetError(f"video {src} does not exist; check the dataset's video_path template")
                target: VideoSource = path
            else:
                try:
                    target = stack.enter_context(fs.open(path, "rb", block_size=_REMOTE_BLOCK_SIZE))
                except FileNotFoundError as e:
                    raise DatasetError(f"video {src} does not exist; check the dataset's video_path template") from e
        else:
            target = src
        try:
            container = av.open(target, mode="r")
        except av.error.FFmpegError as e:
            raise DatasetError(f"video {_name(src)} cannot be opened by FFmpeg ({e}); re-encode or re-download it") \
                from e
        stack.callback(container.close)
        if not container.streams.video:
            raise DatasetError(f"video {_name(src)} has no video stream; re-encode it")
        try:
            yield container
        except av.error.FFmpegError as e:  # corrupt packets surface while demuxing/decoding in the caller's body
            raise DatasetError(f"video {_name(src)} failed to decode ({e}); re-encode or re-download it") from e


def _stream_fps(stream: av.video.stream.VideoStream, fps: float | None) -> Fraction:
    if fps is not None:
        return Fraction(fps).limit_denominator(1001)
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise DatasetError("video stream reports no frame rate; pass fps explicitly")
    return Fraction(rate)


def _index_of(pts: int | None, start_pts: int, time_base: Fraction, fps: Fraction) -> int:
    if pts is None:
        raise DatasetError("video frame without a presentation timestamp; remux the file (ffmpeg -c copy)")
    return round((pts - start_pts) * time_base * fps)


def probe(src: VideoSource) -> VideoInfo:
    """Codec, size, nominal fps and pixel format of the first video stream."""
    with open_video(src) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        return VideoInfo(codec=ctx.codec.canonical_name, width=ctx.width, height=ctx.height,
                         fps=float(_stream_fps(stream, None)), pix_fmt=str(ctx.pix_fmt))


def count_frames(src: VideoSource, *, start: int = 0, stop: int | None = None, fps: float | None = None) -> int:
    """Number of frames with index in [start, stop) counted by demuxing packets (nothing is decoded).

    Container metadata (`nb_frames`, duration) is not trusted: a truncated or re-muxed file can carry stale values.
    """
    with open_video(src) as container:
        stream = container.streams.video[0]
        rate, tb = _stream_fps(stream, fps), stream.time_base
        start_pts = stream.start_time or 0
        n = 0
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream flush packet
                continue
            i = _index_of(packet.pts, start_pts, tb, rate)
            n += start <= i and (stop is None or i < stop)
        return n


def _decode_from(
    container: av.container.InputContainer, first: int, rate: Fraction,
) -> Iterator[tuple[int, av.VideoFrame]]:
    """Yield (index, frame) for every frame with index >= `first`, in order, starting near `first`.

    Seeks to the keyframe at or before `first`. With open GOPs (x265's default) the demuxer can land on a keyframe
    whose leading pictures (shown before it, decoded after it) are dropped, so the first decoded frame may already
    be past `first`; then it seeks again from further back (1 s, 8 s, the file start) rather than skip frames.
    """
    stream = container.streams.video[0]
    tb, start_pts = stream.time_base, stream.start_time or 0
    for back_s in (0, 1, 8, None):
        seek_to = 0 if back_s is None else max(0, first - round(back_s * rate))
        if seek_to > 0 or back_s != 0:  # a fresh container is already at the start
            container.seek(start_pts + int(Fraction(seek_to) / rate / tb), stream=stream, backward=True,
                           any_frame=False)
        frames = container.decode(stream)
        head = next(frames, None)
        if head is None:
            return
        head_idx = _index_of(head.pts, start_pts, tb, rate)
        if head_idx > first and seek_to > 0:
            continue
        if head_idx >= first:
            yield head_idx, head
        for frame in frames:
            idx = _index_of(frame.pts, start_pts, tb, rate)
            if idx >= first:
                yield idx, frame
        return


def iter_frames(
    src: VideoSource, *, start_s: float = 0.0, end_s: float | None = None, fps: float | None = None,
    size: int | None = None, pix_fmt: str = "rgb24",
) -> Iterator[np.ndarray]:
    """Decode frames with timestamps in [start_s, end_s) sequentially as RGB uint8 (H, W, 3), or (size, size, 3).

    Timestamps are seconds from the start of the file (LeRobot v3 `from_timestamp`/`to_timestamp`); they are
    rounded to frame indices with `fps` (default: the stream's rate). Without `end_s` decoding runs to the end.
    `pix_fmt` selects another output format (e.g. "gray16le" for depth videos); `size` applies to rgb24 only.
    """
    with open_video(src) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = _stream_fps(stream, fps)
        first = round(Fraction(start_s).limit_denominator(10**6) * rate)
        stop = None if end_s is None else round(Fraction(end_s).limit_denominator(10**6) * rate)
        for idx, frame in _decode_from(container, first, rate):
            if stop is not None and idx >= stop:
                break
            out = frame.to_ndarray(format=pix_fmt)
            yield out if size is None else resize_square(out, size)


def decode_frame_at(
    src: VideoSource, frame_index: int, fps: float, *, offset_s: float = 0.0, size: int | None = None,
) -> np.ndarray:
    """Random access: the RGB uint8 frame shown at `offset_s + frame_index / fps`.

    Like LeRobot's and BEHAVIOR's loaders it opens the container, seeks to the nearest keyframe before the
    timestamp and decodes forward to the frame, so the cost grows with the distance to the previous keyframe.
    `offset_s` is the episode's start inside a multi-episode (LeRobot v3) file.
    """
    if frame_index < 0:
        raise ValueError(f"frame_index must be >= 0, got {frame_index}")
    with open_video(src) as container:
        rate = _stream_fps(container.streams.video[0], fps)
        target = round(Fraction(offset_s).limit_denominator(10**6) * rate) + frame_index
        for idx, frame in _decode_from(container, target, rate):
            if idx != target:
                break
            rgb = frame.to_ndarray(format="rgb24")
            return rgb if size is None else resize_square(rgb, size)
    raise DatasetError(
        f"video {_name(src)} has no frame {frame_index} at {offset_s:.4f}s + {frame_index}/{float(fps):g}s; "
        "the video is shorter than the episode's parquet rows - re-encode it from the source frames")


def resize_square(frame: np.ndarray, size: int) -> np.ndarray:
    """Resize an RGB uint8 (H, W, 3) frame to (size, size, 3) the way openpi's `resize_with_pad` does.

    PIL bilinear (which low-pass filters when shrinking); a non-square frame keeps its aspect ratio and is
    centered on zero (black) padding. A frame already size x size is returned unchanged, as in openpi, so the
    evaluator's native 224x224 renders and pre-resized training frames go through the same path.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
    h, w = frame.shape[:2]
    if (h, w) == (size, size):
        return frame
    ratio = max(w / size, h / size)
    new_w, new_h = int(w / ratio), int(h / ratio)
    resized = Image.fromarray(frame).resize((new_w, new_h), resample=Image.BILINEAR)
    if (new_h, new_w) == (size, size):
        return np.asarray(resized)
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top:top + new_h, left:left + new_w] = np.asarray(resized)
    return out
