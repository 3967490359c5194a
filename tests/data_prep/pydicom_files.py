"""pydicom's test DICOMs and independent decodes of their pixels, shared by the DICOM tests."""

import io

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian


def data_file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, (
        f"pydicom test file {name} not found: pydicom / pydicom-data are test "
        "dependencies, so the install is broken")
    return path


def read(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(data_file(name))


def native_frame0(ds: pydicom.Dataset) -> np.ndarray:
    """First frame of uncompressed little-endian pixel data, straight from the bytes."""
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    dtype = f"<{'i' if ds.PixelRepresentation else 'u'}{ds.BitsAllocated // 8}"
    n = ds.Rows * ds.Columns
    return np.frombuffer(ds.PixelData, dtype=dtype, count=n).reshape(ds.Rows, ds.Columns)


def pillow_j2k(ds: pydicom.Dataset) -> np.ndarray:
    """Decode the first J2K frame with Pillow (which scales to 16 bits, offsets signed)."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    stream = next(generate_frames(ds.PixelData, number_of_frames=frames))
    a = np.array(Image.open(io.BytesIO(stream))).astype(np.int64)
    if ds.PixelRepresentation:
        assert ds.BitsStored == 16
        return a - 32768
    return a >> (16 - ds.BitsStored)
