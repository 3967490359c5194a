"""JPEG 2000 at reduced resolution: the codestream header and a Pillow decode of one level.

A JPEG 2000 codestream is a wavelet pyramid. Level r (0 = full resolution) is the
low-pass (LL) band after r decompositions: ceil(side / 2^r) pixels a side, close to
a 2^r x 2^r block mean of the image (the 5/3 or 9/7 low-pass filter, centred on the
block's first pixel rather than its middle). Decoding level r skips the finer
subbands, which hold most of the work: on a 3328 x 2560 lossless mammogram level 1
costs a fifth and level 2 a twentieth of a full decode.

pydicom's decoder (pylibjpeg-openjpeg) always decodes level 0; Pillow's JPEG 2000
plugin (OpenJPEG too) takes the level as `reduce`. Pillow scales samples of fewer
than 8 or 16 bits up to its 8- or 16-bit mode and offsets signed samples to unsigned;
decode_level undoes both, so its level 0 equals pydicom's decode bit for bit.

codestream() returns None for whatever Pillow cannot give back exactly (precision
above 16 bits, several components, subsampling, an image offset, a size or sign that
disagrees with the DICOM header, HTJ2K which no encoder here can test): the caller
then keeps the full-resolution path.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile
from pydicom.encaps import generate_frames
from pydicom.uid import JPEG2000, HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL, JPEG2000Lossless

TRANSFER_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL,
                               HTJ2K})
REDUCIBLE = frozenset({JPEG2000Lossless, JPEG2000})

_SOC_SIZ = b"\xff\x4f\xff\x51"  # start of codestream, then the SIZ marker segment
_SIZ, _COD, _COC, _SOT = 0xFF51, 0xFF52, 0xFF53, 0xFF90


@dataclass(frozen=True)
class Codestream:
    """The first frame's codestream and the header facts a reduced decode needs."""
    data: bytes        # the frame as stored (a raw codestream, or a JP2 file around one)
    rows: int
    cols: int
    precision: int     # bits per sample
    signed: bool
    levels: int        # decomposition levels: levels 0..levels can be decoded
    dtype: np.dtype    # what pydicom's decode returns for this file


def side_at(side: int, level: int) -> int:
    """Pixels along a side of `side` full-resolution pixels at `level`."""
    return -(-side // (1 << level))


def _main_header(data: bytes) -> dict | None:
    """SIZ facts and the fewest decomposition levels of COD/COC, from the main header."""
    start = data.find(_SOC_SIZ)  # a JP2 wrapper puts the codestream inside a box
    if start < 0:
        return None
    pos, facts, levels = start + 2, None, []
    while pos + 4 <= len(data):
        marker, length = struct.unpack_from(">HH", data, pos)
        if marker == _SOT or length < 2:  # the first tile: end of the main header
            break
        body = data[pos + 4:pos + 2 + length]
        if marker == _SIZ and len(body) >= 39:
            xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", body, 2)
            (components,) = struct.unpack_from(">H", body, 34)
            ssiz, xrsiz, yrsiz = body[36:39]  # first component
            facts = {"rows": ysiz - yosiz, "cols": xsiz - xosiz, "offset": (yosiz, xosiz),
                     "components": components, "precision": (ssiz & 0x7F) + 1,
                     "signed": bool(ssiz & 0x80), "subsampled": (xrsiz, yrsiz) != (1, 1)}
        elif marker == _COD and len(body) >= 6:
            levels.append(body[5])
        elif marker == _COC and facts is not None:
            index = 2 if facts["components"] >= 257 else 1  # Ccoc is 1 or 2 bytes
            if len(body) > index + 1:
                levels.append(body[index + 1])
        pos += 2 + length
    if facts is None or not levels:
        return None
    return {**facts, "levels": min(levels)}


def codestream(ds) -> Codestream | None:
    """The first frame of a JPEG 2000 file, or None where a Pillow decode would not be exact."""
    meta = getattr(ds, "file_meta", None)
    tsuid = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsuid not in REDUCIBLE or "PixelData" not in ds:
        return None
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        data = next(generate_frames(ds.PixelData, number_of_frames=frames))
        header = _main_header(data)
        bits, signed = int(ds.BitsAllocated), bool(int(ds.get("PixelRepresentation", 0) or 0))
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception:  # malformed encapsulation or header: the full path reports it
        return None
    if (header is None or header["components"] != 1 or header["subsampled"]
            or header["offset"] != (0, 0) or (header["rows"], header["cols"]) != (rows, cols)
            or header["precision"] > min(16, bits) or header["signed"] != signed
            or bits not in (8, 16)):
        return None
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
    return Codestream(bytes(data), rows, cols, header["precision"], signed, header["levels"],
                      dtype)


def _load_at_level(im: Image.Image, level: int, size: tuple[int, int]) -> None:
    """Load `im` at `level` with the true reduced `size` (width, height)."""
    im.reduce = level
    power = 1 << level
    if tuple(int((s + (power >> 1)) / power) for s in im.size) == size:
        im.load()
        return
    # Pillow 13 rounds the reduced size half up where OpenJPEG rounds up, and then
    # rejects the tile ("broken data stream"). Give its loader the true size; this
    # touches Pillow internals, so any failure sends the caller to the full path.
    tile = im.tile[0]
    im._size = size
    im.tile = [ImageFile._Tile(tile[0], (0, 0, *size), tile[2],
                               (tile[3][0], level, *tile[3][2:]))]
    ImageFile.ImageFile.load(im)


def decode_level(stream: Codestream, level: int) -> np.ndarray | None:
    """Stored pixel values at `level`, [side_at(rows), side_at(cols)], pydicom's dtype.

    None if Pillow fails or returns another size (the caller decodes in full).
    """
    if not 0 <= level <= stream.levels:
        raise ValueError(f"level must be in 0..{stream.levels}, got {level}")
    shape = (side_at(stream.rows, level), side_at(stream.cols, level))
    try:
        with Image.open(io.BytesIO(stream.data)) as im:
            _load_at_level(im, level, (shape[1], shape[0]))
            samples = np.asarray(im)
    except Exception:  # Pillow and OpenJPEG raise many types
        return None
    if samples.shape != shape or samples.dtype not in (np.uint8, np.uint16):
        return None
    values = samples.astype(np.int32) >> (8 * samples.dtype.itemsize - stream.precision)
    if stream.signed:
        values -= 1 << (stream.precision - 1)
    return values.astype(stream.dtype)
