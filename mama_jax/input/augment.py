"""Image transforms: the eval geometry (D9) and MaMA's SimCLR-style train augmentation.

Both start from a record's uint16 image (breast already cropped offline, full range
0..65535) and place it on a virtual S x S canvas: long side -> S, aspect kept, centred
zero padding. Eval returns that canvas. Train takes a RandomResizedCrop of the canvas
(torchvision's sampling), flips, jitters and blurs it (spec §3.4 step 4).

The crop is not cut from the S-sized canvas but sampled from the stored image (long side
up to 2S), so a small crop keeps the stored resolution instead of upsampling a
downscaled copy. Crop, resize and both flips are one `cv2.warpAffine`; when the crop is
larger than the output, the region is first area-downsampled by a whole factor.

ColorJitter's saturation and hue and RandomGrayscale are no-ops on a grey image with
three identical channels, so only brightness and contrast are applied.

Two outputs: eval_view / train_view give the grey view as uint16 [S, S], what the input
pipeline sends to the device (2 bytes a pixel; the ViT normalises it and, its three input
channels being equal, sums the patch kernel over them: models/vit.py). eval_transform /
train_transform give the same view normalised on the host, float32 [S, S, 3] in [-1, 1]
(12 bytes a pixel), for callers that hand the tower arrays of their own.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

UINT16_MAX = 65535.0
BLUR_KERNEL = 7  # torchvision GaussianBlur kernel of the official SimCLR transform


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"image must be a non-empty 2-D array [H, W], got shape {image.shape}")
    if image.dtype != np.uint16:
        raise ValueError(f"image must be uint16 (the record contract), got {image.dtype}")
    return image


def canvas_layout(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(h', w', top, left): the resized image's size and offset on the S x S canvas."""
    if size < 1:
        raise ValueError(f"image_size must be >= 1, got {size}")
    k = size / max(height, width)
    h, w = max(1, min(size, round(height * k))), max(1, min(size, round(width * k)))
    return h, w, (size - h) // 2, (size - w) // 2


def _to_model_input(gray01: np.ndarray) -> np.ndarray:
    """[S, S] float32 in [0, 1] (overwritten) -> [S, S, 3] normalised with mean 0.5, std 0.5.

    In place where possible: every fresh megabyte costs page faults in a busy loader.
    """
    gray01 *= np.float32(2.0)
    gray01 -= np.float32(1.0)
    return cv2.merge([gray01, gray01, gray01])


def eval_view(image_u16: np.ndarray, image_size: int) -> np.ndarray:
    """Long side -> image_size (area when shrinking, linear when growing), centred
    zero pad; uint16 [S, S], the grey view the device normalises (one channel)."""
    image = _check_image(image_u16)
    h, w, top, left = canvas_layout(*image.shape, image_size)
    grow = h > image.shape[0] or w > image.shape[1]
    resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR if grow else cv2.INTER_AREA)
    canvas = np.zeros((image_size, image_size), np.uint16)
    canvas[top:top + h, left:left + w] = resized
    return canvas


def eval_geometry(image_u16: np.ndarray, image_size: int) -> np.ndarray:
    """eval_view as float32 [S, S] in [0, 1]."""
    return _unit(eval_view(image_u16, image_size))


def eval_transform(image_u16: np.ndarray, image_size: int) -> np.ndarray:
    """Eval input normalised on the host: 3 channels in [-1, 1]; float32 [S, S, 3]."""
    return _to_model_input(eval_geometry(image_u16, image_size))


def _unit(view_u16: np.ndarray) -> np.ndarray:
    x = view_u16.astype(np.float32)
    x *= np.float32(1.0 / UINT16_MAX)
    return x


def to_uint16(gray01: np.ndarray) -> np.ndarray:
    """[0, 1] float32 (overwritten) -> uint16, rounded: a step of 1/65535, far below the
    bf16 resolution of the tower's input (2^-8 near 1)."""
    gray01 *= np.float32(UINT16_MAX)
    gray01 += np.float32(0.5)
    return gray01.astype(np.uint16)


# ----------------------------------------------------------------------------- train

def random_resized_crop_box(rng: np.random.Generator, size: int, scale: tuple, ratio: tuple
                            ) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params on a size x size canvas: (top, left, h, w)."""
    area = float(size * size)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= size and 0 < h <= size:
            return int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1)), h, w
    # Fallback of torchvision: the whole (square) canvas, ratio clamped into range.
    if 1.0 < min(ratio):
        w, h = size, int(round(size / min(ratio)))
    elif 1.0 > max(ratio):
        h, w = size, int(round(size * max(ratio)))
    else:
        h = w = size
    return (size - h) // 2, (size - w) // 2, h, w


def _axis_map(crop_start: float, crop_len: int, size: int, offset: int, scale: float,
              flip: bool, src_len: int) -> tuple[float, float, int, int]:
    """Output pixel u -> source pixel a*u + b along one axis, plus the source span used.

    Canvas pixel c (centre c + 0.5) sits at stored-image coordinate (c + 0.5 - offset) *
    scale; pixel-index coordinates subtract 0.5 (cv2's convention: centres on integers).
    """
    step = crop_len / size * scale                   # stored pixels per output pixel
    b = (crop_start + 0.5 * crop_len / size - offset) * scale - 0.5
    if flip:
        b, step = b + step * (size - 1), -step
    first, last = sorted((b, b + step * (size - 1)))
    margin = 2 * math.ceil(max(1.0, abs(step))) + 2   # interpolation taps + area blocks
    lo = max(0, int(math.floor(first)) - margin)
    hi = min(src_len, int(math.ceil(last)) + margin + 1)
    return step, b, lo, hi


def _warp_crop(image: np.ndarray, box: tuple[int, int, int, int], size: int,
               hflip: bool, vflip: bool) -> np.ndarray:
    """The canvas crop `box` resized to size x size (and flipped), from the stored image;
    uint16 [size, size]."""
    top, left, ch, cw = box
    h, w, off_y, off_x = canvas_layout(*image.shape, size)
    ax, bx, x0, x1 = _axis_map(left, cw, size, off_x, image.shape[1] / w, hflip, image.shape[1])
    ay, by, y0, y1 = _axis_map(top, ch, size, off_y, image.shape[0] / h, vflip, image.shape[0])
    if x1 <= x0 or y1 <= y0:  # the crop lies in the padding only
        return np.zeros((size, size), np.uint16)
    roi = image[y0:y1, x0:x1]
    bx, by = bx - x0, by - y0
    # Shrinking: area-downsample the region by whole factors first (cv2's fast path), so
    # the warp below samples at most ~1.5 source pixels per output pixel (no aliasing
    # worth the name). Zeros appended to reach a multiple are canvas padding or lie
    # beyond the margin, never under the warp's taps.
    kx, ky = max(1, round(abs(ax))), max(1, round(abs(ay)))
    if kx > 1 or ky > 1:
        pad_y, pad_x = -roi.shape[0] % ky, -roi.shape[1] % kx
        if pad_x or pad_y:
            roi = cv2.copyMakeBorder(roi, 0, pad_y, 0, pad_x, cv2.BORDER_CONSTANT, value=0)
        roi = cv2.resize(roi, (roi.shape[1] // kx, roi.shape[0] // ky),
                         interpolation=cv2.INTER_AREA)
        ax, bx = ax / kx, (bx + 0.5) / kx - 0.5
        ay, by = ay / ky, (by + 0.5) / ky - 0.5
    m = np.array([[ax, 0.0, bx], [0.0, ay, by]], np.float64)
    return cv2.warpAffine(roi, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _brightness(x: np.ndarray, factor: float) -> np.ndarray:
    x *= np.float32(factor)
    return np.clip(x, 0.0, 1.0, out=x)


def _contrast(x: np.ndarray, factor: float) -> np.ndarray:
    # torchvision: blend with the mean of the greyscale image (a scalar).
    mean = np.float32(x.mean())
    x *= np.float32(factor)
    x += mean * np.float32(1.0 - factor)
    return np.clip(x, 0.0, 1.0, out=x)


def _jitter_range(strength: float) -> tuple[float, float]:
    return max(0.0, 1.0 - strength), 1.0 + strength


def _augment(image_u16: np.ndarray, image_size: int, rng: np.random.Generator, cfg: Any
             ) -> np.ndarray:
    """One random view: uint16 [S, S] when no jitter or blur was drawn (the warp's own
    output), else float32 [S, S] in [0, 1]."""
    image = _check_image(image_u16)
    box = random_resized_crop_box(rng, image_size, cfg.crop_scale, cfg.crop_ratio)
    hflip = rng.random() < cfg.hflip
    vflip = rng.random() < cfg.vflip
    x = _warp_crop(image, box, image_size, hflip, vflip)

    if rng.random() < cfg.jitter_prob:
        x = _unit(x)
        b = rng.uniform(*_jitter_range(cfg.brightness))
        c = rng.uniform(*_jitter_range(cfg.contrast))
        if rng.random() < 0.5:  # torchvision applies the jitters in a random order
            x = _contrast(_brightness(x, b), c)
        else:
            x = _brightness(_contrast(x, c), b)
    if rng.random() < cfg.blur_prob:
        sigma = rng.uniform(*cfg.blur_sigma)
        x = cv2.GaussianBlur(_unit(x) if x.dtype == np.uint16 else x, (BLUR_KERNEL, BLUR_KERNEL),
                             sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
    return x


def train_view(image_u16: np.ndarray, image_size: int, rng: np.random.Generator,
               cfg: Any) -> np.ndarray:
    """One random view (train_transform's draws) as uint16 [S, S] for the device to
    normalise; equal to train_transform's view within 1/65535 before normalisation."""
    x = _augment(image_u16, image_size, rng, cfg)
    return x if x.dtype == np.uint16 else to_uint16(x)


def train_transform(image_u16: np.ndarray, image_size: int, rng: np.random.Generator,
                    cfg: Any) -> np.ndarray:
    """One random view: crop (cfg.crop_scale, cfg.crop_ratio) of the eval canvas resized
    back to S, h/v flips, brightness/contrast jitter (cfg.jitter_prob), Gaussian blur
    (kernel 7, cfg.blur_sigma, cfg.blur_prob); float32 [S, S, 3] in [-1, 1].

    Every draw comes from `rng` in a fixed order, so one seed gives one view.
    """
    x = _augment(image_u16, image_size, rng, cfg)
    return _to_model_input(_unit(x) if x.dtype == np.uint16 else x)
