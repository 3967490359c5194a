"""Grey values of decoded stored pixels: modality LUT, VOI (LUT or window), MONOCHROME1
flip and the min-max uint16 normalisation of the record (no JAX here).

The window formulas are pydicom.pixels.apply_windowing's (PS3.3 C.11.2.1.2), in float32.
"""

from __future__ import annotations

import math

import numpy as np
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi

VOI_MODES = ("none", "window")


def _number(ds, keyword, index=0):
    """First (or index-th) numeric value of a DS/IS element, None if absent or bad."""
    value = ds.get(keyword)
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[index] if len(value) > index else None
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _modality_lut(arr: np.ndarray, ds) -> np.ndarray:
    """Modality LUT or rescale, as float32 (LUT output stays integer)."""
    if ds.get("ModalityLUTSequence"):
        return apply_modality_lut(arr, ds)
    out = arr.astype(np.float32)
    slope, intercept = _number(ds, "RescaleSlope"), _number(ds, "RescaleIntercept")
    if slope is not None and slope != 1.0:
        out *= np.float32(slope)
    if intercept:
        out += np.float32(intercept)
    return out


def _output_range(ds) -> tuple[float, float]:
    """Window output range as in PS3.3 C.11.2.1.2 (and pydicom.apply_windowing)."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0) or 0) == 0:
        y_min, y_max = 0.0, float(2 ** bits - 1)
    else:
        y_min, y_max = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = _number(ds, "RescaleSlope"), _number(ds, "RescaleIntercept")
    if slope is not None and intercept is not None:
        y_min, y_max = y_min * slope + intercept, y_max * slope + intercept
    return y_min, y_max


def _window(x: np.ndarray, ds) -> np.ndarray | None:
    """WindowCenter/Width with VOILUTFunction, float32; None if no usable window.

    Same formulas as pydicom.pixels.apply_windowing, but in float32 to avoid a
    full-size float64 copy.
    """
    center, width = _number(ds, "WindowCenter"), _number(ds, "WindowWidth")
    if center is None or width is None:
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    y_min, y_max = _output_range(ds)
    y_range = y_max - y_min
    if function in ("LINEAR", "LINEAR_EXACT"):
        if function == "LINEAR":
            if width < 1:
                return None
            center, width = center - 0.5, width - 1.0
        elif width <= 0:
            return None
        if width == 0:  # LINEAR with width 1: a step at the centre
            return np.where(x <= center, np.float32(y_min), np.float32(y_max))
        out = x - np.float32(center)
        out *= np.float32(y_range / width)
        out += np.float32(0.5 * y_range + y_min)
        np.clip(out, min(y_min, y_max), max(y_min, y_max), out=out)
        return out
    if function == "SIGMOID":
        if width <= 0:
            return None
        out = x - np.float32(center)
        out *= np.float32(-4.0 / width)
        with np.errstate(over="ignore"):
            np.exp(out, out=out)
        out += np.float32(1.0)
        np.divide(np.float32(y_range), out, out=out)
        out += np.float32(y_min)
        return out
    return None  # unknown VOILUTFunction: treat as no window


def _has_voi_lut(ds) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]


def to_monochrome2(arr: np.ndarray, ds, *, voi: str) -> np.ndarray:
    """float32 image, bright = dense: modality LUT, VOI per `voi`, MONOCHROME1 flip.

    voi="none": modality LUT only (the official MaMA conversion).
    voi="window": VOILUTSequence if present, else WindowCenter/Width with
    VOILUTFunction LINEAR / LINEAR_EXACT / SIGMOID. Files without a usable
    window (absent, invalid width, unknown function, or a window that maps the
    whole image to one value) fall back to "none".
    """
    if voi not in VOI_MODES:
        raise ValueError(f"voi must be one of {VOI_MODES}, got {voi!r}")
    values = _modality_lut(arr, ds)
    out = None
    if voi == "window":
        if _has_voi_lut(ds):
            lut_in = values
            if lut_in.dtype.kind == "f":  # LUT indices must be integers
                lut_in = np.rint(lut_in).astype(np.int32)
            out = apply_voi(lut_in, ds).astype(np.float32)
        else:
            x = values.astype(np.float32, copy=False)
            out = _window(x, ds)
            if out is not None and out.min() == out.max() and x.min() != x.max():
                out = None  # e.g. a window meant for another bit depth
    if out is None:
        out = values.astype(np.float32, copy=False)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "MONOCHROME1":
        # Flip within the image's own range (values beyond BitsStored exist).
        np.subtract(out.min() + out.max(), out, out=out)
    return out


def normalise_uint16(arr: np.ndarray) -> np.ndarray:
    """Min-max to 0..65535 (rounded); a constant image becomes zeros."""
    a = np.asarray(arr)
    lo, hi = float(a.min()), float(a.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("image contains NaN or infinite values")
    if hi <= lo:
        return np.zeros(a.shape, np.uint16)
    return scale_to_uint16(a.astype(np.float32), lo, hi)


def scale_to_uint16(out: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Min-max scale float32 `out` in place (hi > lo) and return it as uint16."""
    out -= np.float32(lo)
    out *= np.float32(65535.0 / (hi - lo))
    out += np.float32(0.5)
    np.clip(out, 0, 65535, out=out)
    return out.astype(np.uint16)
