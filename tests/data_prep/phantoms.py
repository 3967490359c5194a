"""Breast-like test images with a known outline, and a DICOM writer for them (shared by
the geometry, DICOM, reduced JPEG 2000 and quality-gate tests)."""

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid


def phantom(h=1200, w=900, cy=600, cx=400, ry=400, rx=300, seed=0):
    """Dark noisy background, bright textured ellipse, and a small bright marker."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    img = rng.normal(800, 100, (h, w))
    img[inside] = 30000 + 8000 * np.sin(xx[inside] / 9.0) * np.cos(yy[inside] / 13.0)
    img[40:60, w - 60:w - 40] = 60000  # a lead marker: must not widen the box
    return np.clip(img, 0, 65535).astype(np.uint16), inside


def box_of(mask):
    ys, xs = np.nonzero(mask)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def write_mammogram(path, image, *, monochrome1=False, j2k=False, window=None, bits=14,
                    laterality="R", view="MLO"):
    """A mammogram-like DICOM from a MONOCHROME2-sense uint16 image of `bits` bits stored."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = "Doe^Jane", "SECRET-ID-42", "MG"
    ds.ImageLaterality, ds.ViewPosition = laterality, view
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    stored = (2 ** bits - 1 - image) if monochrome1 else image
    if window:
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = window
    ds.PixelData = stored.astype(np.uint16).tobytes()
    if j2k:
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(path, enforce_file_format=True)
    return path
