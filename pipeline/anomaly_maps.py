"""PNGs that show why an image was flagged: original | reconstruction | per-pixel error.

Drawn with numpy and Pillow only (no matplotlib), so scoring stays light. Small inputs (8x8,
28x28) are enlarged with nearest-neighbour sampling, which shows pixels as blocks instead of
blurring the very detail a reviewer is looking for.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

_GAP = 2  # pixels between panels
_GAP_GREY = 128  # mid grey stays visible next to both black and white panels
_MAX_NAME = 120  # characters of the sanitized item kept in a file name; file systems allow 255 bytes


def heat_colors(values: np.ndarray, vmax: float) -> np.ndarray:
    """[H, W] non-negative values -> [H, W, 3] uint8, black -> red -> yellow -> white.

    ``values / vmax`` is clipped to [0, 1]. Brightness (sum of RGB) rises strictly with the
    value, so the map reads correctly in grayscale prints too. NaN shows as white: a
    non-finite error is itself worth a look.
    """
    if not np.isfinite(vmax) or vmax <= 0:
        raise ValueError(f"vmax must be a positive finite number, got {vmax!r}")
    t = np.asarray(values, dtype=np.float64) / float(vmax)
    t = np.clip(np.nan_to_num(t, nan=1.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    # Three equal thirds: red rises first, then green (-> yellow), then blue (-> white).
    rgb = np.stack([np.clip(3 * t - k, 0.0, 1.0) for k in range(3)], axis=-1)
    return np.rint(rgb * 255).astype(np.uint8)


def composite(image: np.ndarray, reconstruction: np.ndarray, error_map: np.ndarray,
              vmax: float | None = None, scale: int = 4) -> Image.Image:
    """Original | reconstruction | heat map side by side, each enlarged ``scale`` times.

    ``image`` and ``reconstruction`` are [C, H, W] floats in [0, 1] (C = 1 or 3), ``error_map``
    is [H, W] and non-negative. ``vmax`` is the error shown as white; by default the map's own
    maximum, which makes every map use its full range. Pass one shared value (e.g. the
    threshold) to compare maps across images.
    """
    original, recon = _panel(image, "image"), _panel(reconstruction, "reconstruction")
    errors = np.asarray(error_map, dtype=np.float64)
    if errors.ndim != 2 or errors.shape != original.shape[:2] or recon.shape != original.shape:
        raise ValueError(f"expected image and reconstruction [C, H, W] and error_map [H, W] of the same H, W; "
                         f"got {np.shape(image)}, {np.shape(reconstruction)} and {errors.shape}")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if vmax is None:
        finite = errors[np.isfinite(errors)]
        vmax = float(finite.max()) if finite.size else 0.0
        vmax = vmax if vmax > 0 else 1.0  # an all-zero map stays black instead of dividing by zero
    panels = [original, recon, heat_colors(errors, vmax)]
    height, width = original.shape[:2]
    canvas = np.full((height * scale, 3 * width * scale + 2 * _GAP, 3), _GAP_GREY, dtype=np.uint8)
    for index, panel in enumerate(panels):
        left = index * (width * scale + _GAP)
        canvas[:, left:left + width * scale] = panel.repeat(scale, axis=0).repeat(scale, axis=1)
    return Image.fromarray(canvas, mode="RGB")


def write_map(path: Path, image: np.ndarray, reconstruction: np.ndarray, error_map: np.ndarray,
              vmax: float | None = None) -> Path:
    """Write ``composite(...)`` as a PNG, atomically (hidden temp file, then rename); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = composite(image, reconstruction, error_map, vmax)
    temp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        picture.save(temp, format="PNG")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def map_name(item: str) -> str:
    """A safe, unique PNG file name for an item, e.g. "good__cat_01.png-3f2a9c1b.png".

    Separators become "__" and other unsafe characters "_"; the digest of the original item
    keeps names unique where sanitizing alone would not ("a b.png" and "a_b.png").
    """
    text = item.replace("\\", "/").strip("/")
    text = re.sub(r"^[A-Za-z]:", "", text).strip("/")  # a Windows drive is not part of the name
    text = "__".join(part for part in text.split("/") if part not in ("", ".", ".."))
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip(".") or "image"
    digest = hashlib.sha1(item.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    # Keep the end when too long: the file name says more than the folders above it.
    return f"{text[-_MAX_NAME:].lstrip('._') or 'image'}-{digest}.png"


def _panel(values: np.ndarray, name: str) -> np.ndarray:
    """[C, H, W] (or [H, W]) floats in [0, 1] -> [H, W, 3] uint8."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"{name} must be [C, H, W] with C = 1 or 3, got shape {np.shape(values)}")
    pixels = np.rint(np.clip(np.nan_to_num(array, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    pixels = pixels.transpose(1, 2, 0)
    return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels
