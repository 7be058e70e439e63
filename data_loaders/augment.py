"""Train-time image augmentation (pi_behavior §2.7), on PIL images so it stays uint8 and runs in C.

Head camera: random crop to 95% of the side, resized back, rotated by up to ±5 degrees (one affine warp).
All three cameras: color jitter with brightness 0.3, contrast 0.4, saturation 0.5 (factors uniform in
[1 - x, 1 + x]). Everything is drawn from the generator passed in, so a seeded generator per sample makes the
augmentation of that sample reproducible no matter which worker or rank produces it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageEnhance


@dataclasses.dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    crop_fraction: float = 0.95  # head camera crop side, as a fraction of the image side
    max_rotation_deg: float = 5.0  # head camera rotation range (±)
    brightness: float = 0.3
    contrast: float = 0.4
    saturation: float = 0.5

    def __post_init__(self) -> None:
        if not 0.5 <= self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in [0.5, 1], got {self.crop_fraction}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} jitter must be in [0, 1), got {getattr(self, name)}")


def crop_rotate(img: Image.Image, rng: np.random.Generator, cfg: AugmentConfig) -> Image.Image:
    """Random crop of `crop_fraction` of the side, resized back and rotated about its centre, in one warp."""
    w, h = img.size
    cw, ch = w * cfg.crop_fraction, h * cfg.crop_fraction
    x0 = rng.uniform(0.0, w - cw)
    y0 = rng.uniform(0.0, h - ch)
    theta = math.radians(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
    sx, sy = cw / w, ch / h
    cos, sin = math.cos(theta), math.sin(theta)
    # PIL maps each output pixel (x, y) to an input position: in = centre_crop + S * R * (out - centre_out).
    cx_in, cy_in = x0 + cw / 2.0, y0 + ch / 2.0
    cx_out, cy_out = w / 2.0, h / 2.0
    a, b = sx * cos, -sx * sin
    d, e = sy * sin, sy * cos
    c = cx_in - a * cx_out - b * cy_out
    f = cy_in - d * cx_out - e * cy_out
    return img.transform((w, h), Image.Transform.AFFINE, (a, b, c, d, e, f), resample=Image.Resampling.BILINEAR)


def color_jitter(img: Image.Image, rng: np.random.Generator, cfg: AugmentConfig) -> Image.Image:
    """Brightness, contrast and saturation factors drawn uniformly around 1, applied in that order."""
    for enhancer, amount in ((ImageEnhance.Brightness, cfg.brightness), (ImageEnhance.Contrast, cfg.contrast),
                             (ImageEnhance.Color, cfg.saturation)):
        factor = rng.uniform(1.0 - amount, 1.0 + amount)
        img = enhancer(img).enhance(factor)
    return img


def augment_cameras(images: list[Image.Image], rng: np.random.Generator, cfg: AugmentConfig) -> list[Image.Image]:
    """Augment [head, left_wrist, right_wrist]; only the head gets the geometric part."""
    out = []
    for i, img in enumerate(images):
        if i == 0:
            img = crop_rotate(img, rng, cfg)
        out.append(color_jitter(img, rng, cfg))
    return out
