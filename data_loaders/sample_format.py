"""The webdataset sample layout written by the sharder and read by the streaming loader.

One sample per timestep. Tar members of sample `e00000010_f000123`:

    e00000010_f000123.head.jpg          224x224 RGB (extension follows the manifest's image format)
    e00000010_f000123.left_wrist.jpg
    e00000010_f000123.right_wrist.jpg
    e00000010_f000123.state.npy         float32 (23,)      raw 23-d policy state
    e00000010_f000123.actions.npy       float32 (30, 23)   raw absolute future actions a[t..t+29]; steps past the
                                                           episode end repeat the last action
    e00000010_f000123.action_mask.npy   bool (30,)         True where a[t+k] exists in the episode
    e00000010_f000123.meta.json         episode, frame, timestamp, episode_length, task, stage, skill fields
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image

from data_loaders.behavior_facts import ACTION_DIM, ACTION_HORIZON, CAMERAS, STATE_DIM

IMAGE_FORMATS: dict[str, str] = {"jpeg": "jpg", "png": "png", "webp": "webp"}
# Chosen by measurement (bench/loader_bench.py, bench/README.md): at quality 90 WebP is ~30% smaller per sample
# than JPEG at the same PSNR, and the loader stays well above its per-core target.
DEFAULT_IMAGE_FORMAT = "webp"
DEFAULT_IMAGE_QUALITY = 90
ARRAY_FIELDS = ("state", "actions", "action_mask")


class SampleError(ValueError):
    """A sample in a shard cannot be decoded; the message names the shard and the sample key."""


def sample_key(episode_index: int, frame: int) -> str:
    return f"e{episode_index:08d}_f{frame:06d}"


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def encode_image(img: np.ndarray, image_format: str, quality: int) -> bytes:
    """uint8 (H, W, 3) -> compressed bytes. Deterministic for identical input."""
    buf = io.BytesIO()
    pil = Image.fromarray(img, mode="RGB")
    if image_format == "jpeg":
        pil.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 95 else 2)
    elif image_format == "png":
        pil.save(buf, format="PNG", compress_level=1)
    elif image_format == "webp":
        pil.save(buf, format="WEBP", quality=quality, method=0)
    else:
        raise ValueError(f"unknown image format {image_format!r}; choose one of {sorted(IMAGE_FORMATS)}")
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", im.size)
        return np.asarray(im.convert("RGB"))


def encode_sample(
    *,
    images: dict[str, np.ndarray],
    state: np.ndarray,
    actions: np.ndarray,
    action_mask: np.ndarray,
    meta: dict[str, Any],
    image_format: str,
    quality: int,
) -> dict[str, bytes]:
    """Build the tar members (extension -> bytes) of one sample; the caller adds `__key__`."""
    if state.shape != (STATE_DIM,) or actions.shape != (ACTION_HORIZON, ACTION_DIM):
        raise ValueError(f"bad sample shapes state={state.shape} actions={actions.shape}")
    ext = IMAGE_FORMATS[image_format]
    out = {f"{cam}.{ext}": encode_image(images[cam], image_format, quality) for cam in CAMERAS}
    out["state.npy"] = _npy_bytes(state.astype(np.float32))
    out["actions.npy"] = _npy_bytes(actions.astype(np.float32))
    out["action_mask.npy"] = _npy_bytes(action_mask.astype(bool))
    out["meta.json"] = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    return out


def decode_sample(files: dict[str, bytes], *, image_format: str, where: str, decode_images: bool = True) -> dict:
    """Tar members of one sample -> numpy fields. `where` names the shard/key for error messages.

    Returns images uint8 (3, H, W, 3) in CAMERAS order (or the raw bytes if not decode_images), state, actions,
    action_mask and the meta dict.
    """
    ext = IMAGE_FORMATS[image_format]
    try:
        out: dict[str, Any] = {}
        for name in ARRAY_FIELDS:
            out[name] = np.load(io.BytesIO(files[f"{name}.npy"]), allow_pickle=False)
        out["meta"] = json.loads(files["meta.json"])
        raw = [files[f"{cam}.{ext}"] for cam in CAMERAS]
        out["images"] = np.stack([decode_image(b) for b in raw]) if decode_images else raw
    except KeyError as e:
        raise SampleError(f"{where}: sample is missing member {e.args[0]!r}; re-run `b1k-train data shard`") from e
    except (ValueError, OSError, json.JSONDecodeError) as e:
        raise SampleError(f"{where}: corrupt sample ({type(e).__name__}: {e}); re-run `b1k-train data shard`") from e
    if out["state"].shape != (STATE_DIM,) or out["actions"].shape != (ACTION_HORIZON, ACTION_DIM):
        raise SampleError(f"{where}: wrong shapes state={out['state'].shape} actions={out['actions'].shape}")
    return out
