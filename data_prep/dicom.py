"""Read one mammography DICOM into a breast-cropped uint16 image (no JAX here).

Pipeline (read_dicom): dcmread -> decode the first frame -> modality LUT ->
optional VOI (window / LUT) -> invert MONOCHROME1 -> min-max to uint16 ->
Otsu breast crop at full resolution -> area resize of the long side.

Privacy rule: the only header values that leave this module are laterality and
view. Error messages carry the file path and a reason, never tag values.

Colour images (RGB, YBR, PALETTE COLOR) are rejected with a DicomError: a colour
file in a mammography collection is a screenshot or report, not a mammogram.

Not thread-safe (warnings are captured around dcmread); use processes.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from data_prep.geometry import crop_breast, resize_long_side  # noqa: F401 (public API)

VOI_MODES = ("none", "window")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")

_NATIVE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
           DeflatedExplicitVRLittleEndian}
# Every JPEG-family codestream ends with the FFD9 marker (JPEG EOI, J2K EOC).
_JPEG_FAMILY = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
                JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
                HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K}
SUPPORTED_TRANSFER_SYNTAXES = frozenset(_NATIVE | _JPEG_FAMILY | {RLELossless})

# Code meanings (letters only, lower case) and SNOMED codes of CID 4014 views.
_VIEW_MEANINGS = {
    "craniocaudal": "CC",
    "mediolateraloblique": "MLO",
    "mediolateral": "ML",
    "lateromedial": "LM",
    "lateromedialoblique": "LMO",
    "exaggeratedcraniocaudal": "XCC",
    "craniocaudalexaggeratedlaterally": "XCCL",
    "craniocaudalexaggeratedmedially": "XCCM",
    "caudocranialfrombelow": "FB",
    "axillarytail": "AT",
    "cleavage": "CV",
}
_VIEW_CODES = {"399162004": "CC", "R-10242": "CC", "399368009": "MLO", "R-10226": "MLO",
               "399260004": "ML"}


class DicomError(ValueError):
    """A file that cannot become an image; the message starts with its path."""

    def __init__(self, path, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep (path, reason) across process pools
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True, eq=False)
class DecodedImage:
    pixels: np.ndarray   # uint16 [H, W], bright = dense, cropped, long side <= long_side
    laterality: str      # "L" / "R" / ""
    view: str            # "CC" / "MLO" / other code / ""
    timings: dict = field(default_factory=dict)  # seconds: read, decode, process


# ----------------------------------------------------------------------------- read


def _read_dataset(path) -> pydicom.Dataset:
    # pydicom turns a truncated undefined-length element into a warning and drops
    # it; catch that so a cut file is reported as truncated, not "no PixelData".
    # Other warnings are swallowed too: they may quote header values.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
        except FileNotFoundError:
            raise DicomError(path, "file not found") from None
        except InvalidDicomError:
            raise DicomError(path, "not a DICOM file (no 'DICM' prefix or file meta "
                                   "information)") from None
        except OSError as e:
            raise DicomError(path, f"cannot be read ({type(e).__name__})") from None
        except Exception as e:  # pydicom parse errors of every kind
            raise DicomError(path, f"file is truncated or corrupt ({type(e).__name__})") from None
    if any("end of file" in str(w.message).lower() for w in caught):
        raise DicomError(path, "file is truncated (end of file inside a data element)")
    return ds


def decode_pixels(ds: pydicom.Dataset, path) -> np.ndarray:
    """Stored pixel values of the first frame, [rows, cols], native byte order."""
    meta = getattr(ds, "file_meta", None)
    tsuid = meta.get("TransferSyntaxUID") if meta is not None else None
    if not tsuid:
        raise DicomError(path, "no transfer syntax UID in the file meta information")
    tsuid = UID(str(tsuid))
    if tsuid not in SUPPORTED_TRANSFER_SYNTAXES:
        name = tsuid.name if tsuid.name != str(tsuid) else "unknown"
        raise DicomError(path, f"unsupported transfer syntax {tsuid} ({name})")
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise DicomError(path, "float pixel data is not supported")
        raise DicomError(path, "no PixelData element (not an image)")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = ds.get("SamplesPerPixel", 1)
    if photometric not in MONOCHROME or samples != 1:
        raise DicomError(path, f"photometric interpretation {photometric or 'missing'} with "
                               f"{samples} samples per pixel is not supported (grayscale "
                               "MONOCHROME1/MONOCHROME2 only)")
    if tsuid in _JPEG_FAMILY and b"\xff\xd9" not in ds.PixelData[-64:]:
        # openjpeg decodes a cut codestream without complaint; refuse it here.
        raise DicomError(path, "compressed pixel data is truncated (no end-of-image marker)")
    try:
        arr = pixel_array(ds, index=0)
    except Exception as e:  # decoder plugins raise many types; messages are pixel facts
        raise DicomError(path, f"pixel data could not be decoded ({type(e).__name__}: {e})") from None
    if arr.ndim != 2:
        raise DicomError(path, f"decoded pixel data has shape {arr.shape}, expected [rows, cols]")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


# ----------------------------------------------------------------------------- values


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
    return _scale_to_uint16(a.astype(np.float32), lo, hi)


def _scale_to_uint16(out: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Min-max scale float32 `out` in place (hi > lo) and return it as uint16."""
    out -= np.float32(lo)
    out *= np.float32(65535.0 / (hi - lo))
    out += np.float32(0.5)
    np.clip(out, 0, 65535, out=out)
    return out.astype(np.uint16)


# ----------------------------------------------------------------------------- tags


def _code(value) -> str:
    return str(value or "").strip().upper()


def _frame_laterality(ds) -> str:
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        try:
            return _code(ds[keyword][0].FrameAnatomySequence[0].FrameLaterality)
        except (KeyError, IndexError, AttributeError, TypeError):
            continue
    return ""


def laterality_and_view(ds) -> tuple[str, str]:
    """("L"/"R"/"", "CC"/"MLO"/other view code/"") from the DICOM tags."""
    laterality = ""
    for value in (ds.get("ImageLaterality"), ds.get("Laterality"), _frame_laterality(ds)):
        if _code(value) in ("L", "R"):
            laterality = _code(value)
            break
    view = _code(ds.get("ViewPosition"))
    if not view:
        try:
            item = ds.ViewCodeSequence[0]
        except (AttributeError, IndexError, TypeError):
            item = None
        if item is not None:
            meaning = "".join(c for c in str(item.get("CodeMeaning", "")).lower() if c.isalpha())
            view = _VIEW_MEANINGS.get(meaning) or _VIEW_CODES.get(str(item.get("CodeValue", "")).strip(), "")
    return laterality, view


# ----------------------------------------------------------------------------- all


def read_dicom(path, *, voi: str = "none", long_side: int = 1036, crop: bool = True
               ) -> DecodedImage:
    """Decode one DICOM to a record image; raises DicomError naming the file."""
    if voi not in VOI_MODES:
        raise ValueError(f"voi must be one of {VOI_MODES}, got {voi!r}")
    if long_side < 1:
        raise ValueError(f"long_side must be >= 1, got {long_side}")
    t0 = time.perf_counter()
    ds = _read_dataset(path)
    t1 = time.perf_counter()
    raw = decode_pixels(ds, path)
    t2 = time.perf_counter()
    try:
        mono = to_monochrome2(raw, ds, voi=voi)  # a fresh float32 array we own
        del raw
        lo, hi = float(mono.min()), float(mono.max())
        if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
            img = _scale_to_uint16(mono, lo, hi)  # in place: no second float copy
        else:
            img = normalise_uint16(mono)
        del mono
        if crop:
            img, _ = crop_breast(img)
        img = np.ascontiguousarray(resize_long_side(img, long_side))
        laterality, view = laterality_and_view(ds)
    except Exception as e:
        raise DicomError(path, f"pixel processing failed ({type(e).__name__}: {e})") from None
    t3 = time.perf_counter()
    return DecodedImage(img, laterality, view,
                        {"read": t1 - t0, "decode": t2 - t1, "process": t3 - t2})
