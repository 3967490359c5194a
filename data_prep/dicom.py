"""Read one mammography DICOM into a breast-cropped uint16 image (no JAX here).

Pipeline (read_dicom): dcmread -> quality gates on the header (quality.py) -> decode
the first frame -> modality LUT -> optional VOI (window / LUT) -> invert MONOCHROME1 ->
min-max to uint16 (grey.py) -> quality gates on the image -> Otsu breast crop -> area
resize of the long side (geometry.py).

JPEG 2000 files skip most of the decode (j2k_reduce, the default; j2k.py): the breast
box is found on the ~256-px level of the wavelet pyramid, then the image is decoded at
the deepest level whose crop still has a long side of at least `long_side`, and the
same steps run on that level. Other codecs, JPEG 2000 files whose crop needs level 0,
and every file with j2k_reduce=False take the full-resolution path, unchanged. Where
the reduced path differs: a level is close to, not equal to, a block mean of the full
image; the min-max scale and the MONOCHROME1 flip use the extremes of the decoded
level (block means, so single-pixel noise extremes no longer stretch the scale); the
crop box is rounded outwards to whole pixels of that level.

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
from contextlib import contextmanager
from dataclasses import dataclass, field

import cv2
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array
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

from data_prep import geometry, j2k, quality
from data_prep.geometry import resize_long_side
from data_prep.grey import VOI_MODES, scale_to_uint16, normalise_uint16, to_monochrome2

__all__ = ["DicomError", "DecodedImage", "VOI_MODES", "check_pixel_header", "decode_pixels",
           "laterality_and_view", "normalise_uint16", "read_dicom", "to_monochrome2"]

BOX_SIDE = 256  # long side of the level the reduced path finds the breast on (crop_breast's)
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
    # Derived geometry, no header values: the crop in source pixels and the stored size.
    transform: geometry.CropResize | None = None
    j2k_level: int | None = None  # JPEG 2000 level decoded (0 = full); None: another codec


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


def check_pixel_header(ds: pydicom.Dataset, path) -> UID:
    """The transfer syntax, once the header allows a grayscale decode (else DicomError)."""
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
    problem = quality.header_problem(ds, native=tsuid in _NATIVE)
    if problem:
        raise DicomError(path, problem)
    if tsuid in _JPEG_FAMILY and b"\xff\xd9" not in ds.PixelData[-64:]:
        # openjpeg decodes a cut codestream without complaint; refuse it here.
        raise DicomError(path, "compressed pixel data is truncated (no end-of-image marker)")
    return tsuid


def decode_pixels(ds: pydicom.Dataset, path) -> np.ndarray:
    """Stored pixel values of the first frame, [rows, cols], native byte order."""
    check_pixel_header(ds, path)
    try:
        arr = pixel_array(ds, index=0)
    except Exception as e:  # decoder plugins raise many types; messages are pixel facts
        raise DicomError(path, f"pixel data could not be decoded ({type(e).__name__}: {e})") from None
    if arr.ndim != 2:
        raise DicomError(path, f"decoded pixel data has shape {arr.shape}, expected [rows, cols]")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


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


# ----------------------------------------------------------------------------- record


def _level_image(raw: np.ndarray, ds, voi: str, *, reduced: bool = False
                 ) -> np.ndarray | None:
    """Decoded stored values as min-max uint16, bright = dense; None if constant.

    On a reduced level (`reduced`) the extremes are taken after a 3 x 3 median: the
    wavelet low-pass rings along sharp edges (one pixel wide, up to about an eighth of
    the step beyond either side), which would otherwise set the scale. Flat extremes
    (a background, a saturated label) come out exact; single-pixel extremes of the full
    image (noise, specks) are lost to the reduction either way.
    """
    mono = to_monochrome2(raw, ds, voi=voi)  # a fresh float32 array we own
    lo, hi = float(mono.min()), float(mono.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("image contains NaN or infinite values")
    if hi <= lo:
        return None
    if reduced:
        smooth = cv2.medianBlur(mono, 3)
        if smooth.max() > smooth.min():
            lo, hi = float(smooth.min()), float(smooth.max())
    return scale_to_uint16(mono, lo, hi)  # in place: no second float copy


def _breast_box(img: np.ndarray, path) -> tuple[int, int, int, int]:
    box, share = geometry.breast_box(img)
    problem = quality.foreground_problem(share)
    if problem:
        raise DicomError(path, problem)
    return box


def _crop_resize(img, box, long_side):
    """Full-resolution crop and resize; returns (image, transform)."""
    y0, y1, x0, x1 = box
    out = np.ascontiguousarray(resize_long_side(img[y0:y1, x0:x1], long_side))
    return out, geometry.CropResize(tuple(box), int(out.shape[0]), int(out.shape[1]))


def _level_edges(edges, level: int) -> list[float]:
    """Source pixel edges -> pixel edges of `level`, whose pixel k averages the source
    around pixel 2^level * k (the low-pass filter is centred on it, not on the block's
    middle): a source edge e lies at (e + (2^level - 1) / 2) / 2^level."""
    f = 1 << level
    return [(e + (f - 1) / 2) / f for e in edges]


def _source_box(box, level: int, rows: int, cols: int) -> tuple[int, int, int, int]:
    """A box in pixels of `level` -> source pixels, rounded outwards and clipped."""
    f, off = 1 << level, ((1 << level) - 1) / 2
    y0, y1, x0, x1 = box
    return (max(0, math.floor(f * y0 - off)), min(rows, math.ceil(f * y1 - off)),
            max(0, math.floor(f * x0 - off)), min(cols, math.ceil(f * x1 - off)))


def _deepest_level(long: int, side: int, levels: int) -> int:
    """The deepest level (<= levels) at which `long` source pixels still span `side`."""
    level = 0
    while level < levels and long >= side << (level + 1):
        level += 1
    return level


def _reduced_record(ds, path, stream: j2k.Codestream, voi: str, long_side: int, crop: bool):
    """(image, transform, level, decode seconds) from reduced JPEG 2000 decodes, or None
    where the full-resolution path must run (level 0 needed, or Pillow cannot decode)."""
    rows, cols = stream.rows, stream.cols
    if max(rows, cols) < 2 * long_side:
        return None  # even the uncropped image needs level 0: no extra decode
    decode_s, box, low, low_level = 0.0, (0, rows, 0, cols), None, None
    if crop:
        low_level = _deepest_level(max(rows, cols), BOX_SIDE, stream.levels)
        t0 = time.perf_counter()
        low = j2k.decode_level(stream, low_level)
        decode_s += time.perf_counter() - t0
        small = None if low is None else _level_image(low, ds, voi, reduced=True)
        if small is None:
            return None  # undecodable or constant here: the full decode decides
        box = _source_box(_breast_box(small, path), low_level, rows, cols)
    y0, y1, x0, x1 = box
    level = _deepest_level(max(y1 - y0, x1 - x0), long_side, stream.levels)
    if level == 0:
        return None
    raw = low
    if level != low_level:
        t0 = time.perf_counter()
        raw = j2k.decode_level(stream, level)
        decode_s += time.perf_counter() - t0
    img = None if raw is None else _level_image(raw, ds, voi, reduced=True)
    if img is None:
        return None
    # The crop and output size the full path would use for this box, resampled from the level.
    shape = geometry.long_side_shape(y1 - y0, x1 - x0, long_side)
    window = _level_edges((y0, y1), level) + _level_edges((x0, x1), level)
    out = geometry.area_resize(img, window, shape)
    # Fancy indexing along columns leaves a Fortran-ordered array; records are C order.
    out = np.ascontiguousarray(np.clip(np.rint(out), 0, 65535).astype(np.uint16))
    return out, geometry.CropResize(box, *shape), level, decode_s


def _full_record(ds, path, voi: str, long_side: int, crop: bool):
    """(image, transform, decode seconds) from a full-resolution decode (today's path)."""
    t0 = time.perf_counter()
    raw = decode_pixels(ds, path)
    decode_s = time.perf_counter() - t0
    with _processing(path):
        img = _level_image(raw, ds, voi)
        del raw
        if img is None:
            raise DicomError(path, quality.BLANK)
        box = _breast_box(img, path) if crop else (0, img.shape[0], 0, img.shape[1])
        out, transform = _crop_resize(img, box, long_side)
    return out, transform, decode_s


@contextmanager
def _processing(path):
    """Report a failure in the pixel steps as a DicomError naming the file."""
    try:
        yield
    except DicomError:
        raise
    except Exception as e:
        raise DicomError(path, f"pixel processing failed ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- all


def read_dicom(path, *, voi: str = "none", long_side: int = 1036, crop: bool = True,
               j2k_reduce: bool = True, min_short_side: int = quality.MIN_SHORT_SIDE
               ) -> DecodedImage:
    """Decode one DICOM to a record image; raises DicomError naming the file.

    j2k_reduce=False decodes JPEG 2000 at full resolution, as every other codec.
    """
    if voi not in VOI_MODES:
        raise ValueError(f"voi must be one of {VOI_MODES}, got {voi!r}")
    if long_side < 1:
        raise ValueError(f"long_side must be >= 1, got {long_side}")
    t0 = time.perf_counter()
    ds = _read_dataset(path)
    t1 = time.perf_counter()
    tsuid = check_pixel_header(ds, path)
    problem = quality.shape_problem(int(ds.Rows), int(ds.Columns), min_short_side=min_short_side)
    if problem:
        raise DicomError(path, problem)
    stream = j2k.codestream(ds) if j2k_reduce else None
    with _processing(path):
        reduced = _reduced_record(ds, path, stream, voi, long_side, crop) if stream else None
    if reduced is not None:
        img, transform, level, decode_s = reduced
    else:
        img, transform, decode_s = _full_record(ds, path, voi, long_side, crop)
        level = 0 if tsuid in j2k.TRANSFER_SYNTAXES else None
    laterality, view = laterality_and_view(ds)
    t2 = time.perf_counter()
    timings = {"read": t1 - t0, "decode": decode_s, "process": t2 - t1 - decode_s}
    return DecodedImage(img, laterality, view, timings, transform, level)
