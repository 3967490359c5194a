"""Data-quality gates: files that decode but must not become records.

Each gate returns None for a good file or the reason it is skipped; dicom.read_dicom
raises the reason as a DicomError, so a build puts it in the manifest. Reasons name
DICOM fields and pixel facts (sizes, byte counts, bit depths), never a header value
that could identify a patient.

Header gates run before any decoding:
- BitsStored larger than BitsAllocated;
- native (uncompressed) pixel data whose length disagrees with Rows x Columns x
  BitsAllocated / 8 x SamplesPerPixel x NumberOfFrames (pydicom only warns about
  excess bytes and then reads the wrong pixels, e.g. 16-bit values under a header
  that says 8 bits allocated);
- an image whose short side is below MIN_SHORT_SIDE (a 600 x 1 "image").
Image gates run on the decoded, normalised image:
- blank or constant images (one value everywhere);
- no breast: the Otsu foreground kept by the crop covers under MIN_FOREGROUND of
  the image (a blank plate with a label or marker on it).
"""

from __future__ import annotations

import math

MIN_SHORT_SIDE = 64      # pixels; the smallest pydicom test image used here is 64 x 64
MIN_FOREGROUND = 0.01    # share of the image; a breast covers tens of percent of a mammogram
BLANK = "blank or constant image: every pixel has the same value"


def _int(ds, keyword) -> int | None:
    try:
        return int(ds.get(keyword))
    except (TypeError, ValueError):
        return None


def header_problem(ds, *, native: bool) -> str | None:
    """Bit depths and (for native transfer syntaxes) the pixel data length."""
    fields = {k: _int(ds, k) for k in ("Rows", "Columns", "BitsAllocated", "BitsStored")}
    missing = [k for k, v in fields.items() if v is None or v < 1]
    if missing:
        return f"{', '.join(missing)} missing or not a positive number"
    allocated, stored = fields["BitsAllocated"], fields["BitsStored"]
    if stored > allocated:
        return f"BitsStored ({stored}) is larger than BitsAllocated ({allocated})"
    if native:
        return _length_problem(ds, fields["Rows"], fields["Columns"], allocated)
    return None


def _length_problem(ds, rows: int, cols: int, allocated: int) -> str | None:
    samples = _int(ds, "SamplesPerPixel") or 1
    frames = _int(ds, "NumberOfFrames") or 1
    expected = math.ceil(rows * cols * allocated * samples * frames / 8)
    actual = len(ds.PixelData)
    if actual in (expected, expected + expected % 2):  # odd lengths are padded to even
        return None
    what = "fewer" if actual < expected else "more"
    return (f"pixel data holds {actual} bytes, {what} than Rows x Columns x BitsAllocated / 8 "
            f"x SamplesPerPixel x NumberOfFrames = {expected} bytes")


def shape_problem(rows: int, cols: int, *, min_short_side: int = MIN_SHORT_SIDE) -> str | None:
    if min(rows, cols) < min_short_side:
        return (f"image is {rows} x {cols} pixels (Rows x Columns); the short side must be "
                f"at least {min_short_side}")
    return None


def foreground_problem(share: float, *, min_share: float = MIN_FOREGROUND) -> str | None:
    if share < min_share:
        return (f"no breast foreground after the crop: it covers {100 * share:.2f} % of the "
                f"image (minimum {100 * min_share:g} %)")
    return None
