"""Breast crop and aspect-preserving resize of a decoded mammogram (no JAX here)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


def _otsu_threshold(img: np.ndarray, bins: int = 256) -> float | None:
    """Otsu threshold on a `bins`-bin histogram; None for a constant image."""
    lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        return None
    hist, edges = np.histogram(img, bins=bins, range=(lo, hi))
    p = hist.astype(np.float64) / hist.sum()
    centers = 0.5 * (edges[:-1] + edges[1:])
    omega = np.cumsum(p)
    mu = np.cumsum(p * centers)
    denom = omega * (1.0 - omega)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where(denom > 0, (mu[-1] * omega - mu) ** 2 / denom, 0.0)
    k = int(np.argmax(between))
    return float(edges[k + 1])  # foreground: values >= upper edge of bin k


def _downsample(img: np.ndarray, long_side: int) -> np.ndarray:
    if img.dtype not in (np.uint8, np.uint16, np.float32):
        img = img.astype(np.float32)
    return resize_long_side(img, long_side)


def breast_box(img: np.ndarray, *, margin: float = 0.02
               ) -> tuple[tuple[int, int, int, int], float]:
    """The breast's box (y0, y1, x0, x1) and the share of the image its foreground covers.

    Otsu foreground on a ~256-px copy; keeps every connected component at least 10 %
    the size of the largest (a breast split by a dark band stays whole; small markers
    and labels go), maps their box to `img` pixels and widens it by `margin` of each
    image side. The whole image and share 0.0 if nothing is found (a constant image);
    the whole image and share 1.0 for an image too small to judge (a side under 2).
    """
    if img.ndim != 2:
        raise ValueError(f"crop_breast expects a 2-D image, got shape {img.shape}")
    h, w = img.shape
    if h < 2 or w < 2:
        return (0, h, 0, w), 1.0
    small = _downsample(img, 256)
    threshold = _otsu_threshold(small)
    if threshold is None:
        return (0, h, 0, w), 0.0
    mask = (small >= threshold).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return (0, h, 0, w), 0.0
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = stats[1:][areas >= 0.1 * areas.max()]
    share = float(keep[:, cv2.CC_STAT_AREA].sum()) / small.size
    x0s, y0s = keep[:, cv2.CC_STAT_LEFT], keep[:, cv2.CC_STAT_TOP]
    x1s, y1s = x0s + keep[:, cv2.CC_STAT_WIDTH], y0s + keep[:, cv2.CC_STAT_HEIGHT]
    sy, sx = h / small.shape[0], w / small.shape[1]
    my, mx = int(round(margin * h)), int(round(margin * w))
    y0 = max(0, int(math.floor(y0s.min() * sy)) - my)
    y1 = min(h, int(math.ceil(y1s.max() * sy)) + my)
    x0 = max(0, int(math.floor(x0s.min() * sx)) - mx)
    x1 = min(w, int(math.ceil(x1s.max() * sx)) + mx)
    return (y0, y1, x0, x1), share


def crop_breast(img: np.ndarray, *, margin: float = 0.02
                ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Crop to the breast (breast_box); returns (view into img, (y0, y1, x0, x1))."""
    (y0, y1, x0, x1), _ = breast_box(img, margin=margin)
    return img[y0:y1, x0:x1], (y0, y1, x0, x1)


def long_side_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """(height, width) after resize_long_side: the long side at most `long_side`."""
    if long_side < 1:
        raise ValueError(f"long_side must be >= 1, got {long_side}")
    if max(h, w) <= long_side:
        return h, w
    scale = long_side / max(h, w)
    if h >= w:
        return long_side, max(1, round(w * scale))
    return max(1, round(h * scale)), long_side


def resize_long_side(img: np.ndarray, long_side: int) -> np.ndarray:
    """Shrink so the long side is `long_side` (area interpolation, aspect kept).

    Never stretches and never upscales: an image already small enough is
    returned unchanged.
    """
    h, w = img.shape[:2]
    new_h, new_w = long_side_shape(h, w, long_side)
    if (new_h, new_w) == (h, w):
        return img
    return cv2.resize(np.ascontiguousarray(img), (new_w, new_h), interpolation=cv2.INTER_AREA)


def _area_taps(n_src: int, start: float, stop: float, n_out: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights [n_out, taps] averaging each of n_out equal parts of
    [start, stop) (source pixel k covers [k, k + 1)); coverage beyond either end of the
    source goes to the edge pixel."""
    step = (stop - start) / n_out
    lo = start + step * np.arange(n_out)
    k = np.floor(lo).astype(np.int64)[:, None] + np.arange(int(math.ceil(step)) + 1)
    overlap = np.minimum(lo[:, None] + step, k + 1) - np.maximum(lo[:, None], k)
    return np.clip(k, 0, n_src - 1), (np.clip(overlap, 0, None) / step).astype(np.float32)


def area_resize(img: np.ndarray, window: tuple[float, float, float, float],
                shape: tuple[int, int]) -> np.ndarray:
    """Area-average the window (y0, y1, x0, x1) of `img`, in fractional pixel edges, onto
    `shape` (a shrink); float32. With whole-pixel edges it is cv2's INTER_AREA; fractional
    edges let a reduced JPEG 2000 level, whose pixels sit off the full-resolution grid,
    be resampled onto exactly the crop the full-resolution path would take."""
    y0, y1, x0, x1 = window
    rows, row_w = _area_taps(img.shape[0], y0, y1, shape[0])
    cols, col_w = _area_taps(img.shape[1], x0, x1, shape[1])
    first, last = int(cols.min()), int(cols.max()) + 1
    sub = img[:, first:last]
    cols = cols - first
    tmp = sum(row_w[:, t, None] * sub[rows[:, t]] for t in range(rows.shape[1]))
    return sum(col_w[None, :, t] * tmp[:, cols[:, t]] for t in range(cols.shape[1]))


@dataclass(frozen=True)
class CropResize:
    """How a stored image was made from its source: crop (y0:y1, x0:x1), then resize
    to (height, width). Maps source pixel boxes (lesion ROIs) onto the stored image."""
    crop: tuple[int, int, int, int]   # (y0, y1, x0, x1) in source pixels, as crop_breast
    height: int                       # stored image size
    width: int

    def map_box(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
        """Source box (y0, x0, y1, x1), y1/x1 exclusive -> the stored pixels it covers
        (same convention, rounded outwards), or None if it misses the crop."""
        cy0, cy1, cx0, cx1 = self.crop
        sy, sx = self.height / (cy1 - cy0), self.width / (cx1 - cx0)
        y0, x0, y1, x1 = box
        # Pixel edges scale exactly (cv2.resize maps edge e to e * scale); round outwards.
        top = max(0, math.floor((y0 - cy0) * sy + 1e-6))
        left = max(0, math.floor((x0 - cx0) * sx + 1e-6))
        bottom = min(self.height, math.ceil((y1 - cy0) * sy - 1e-6))
        right = min(self.width, math.ceil((x1 - cx0) * sx - 1e-6))
        return (top, left, bottom, right) if bottom > top and right > left else None


def crop_and_resize(img: np.ndarray, long_side: int, *, crop: bool = True
                    ) -> tuple[np.ndarray, CropResize]:
    """crop_breast (if `crop`) then resize_long_side; returns (contiguous image, transform)."""
    if crop:
        img, box = crop_breast(img)
    else:
        box = (0, img.shape[0], 0, img.shape[1])
    out = np.ascontiguousarray(resize_long_side(img, long_side))
    return out, CropResize(tuple(int(v) for v in box), int(out.shape[0]), int(out.shape[1]))
