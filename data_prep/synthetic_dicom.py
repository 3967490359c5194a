"""Synthetic mammogram DICOM files with distinctive fake PHI (for synthetic.py and tests)."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from data_prep.synthetic_render import MAX_VALUE

PHI_MARKER = "Zyx"  # every fake name / institution / comment contains it
MAMMO_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray, For Presentation
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root; suffix hashed from the seed
VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
ORIENTATION = {("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"],
               ("L", "MLO"): ["A", "FR"], ("R", "MLO"): ["P", "FL"]}


# ---------------------------------------------------------------- fake PHI
def _token(rng: np.random.Generator, n: int) -> str:
    consonants, vowels = "bdfghjklmnprstvz", "aeiou"
    return "".join(rng.choice(list(vowels if i % 2 else consonants)) for i in range(n))


def digits(rng: np.random.Generator, n: int) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, n))


def fake_phi(rng: np.random.Generator, *, birth_year: int | None = None) -> dict:
    """Made-up identifying DICOM values; every text value contains PHI_MARKER."""
    family, given = PHI_MARKER + _token(rng, 5), "Qu" + _token(rng, 4)
    doctor, tech = PHI_MARKER + _token(rng, 6), PHI_MARKER + _token(rng, 4)
    year = int(birth_year if birth_year is not None else rng.integers(1930, 1985))
    born = datetime.date(year, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 365)))
    mrn = "MRN" + digits(rng, 9)
    return {
        "PatientName": f"{family}^{given}",
        "PatientBirthDate": born.strftime("%Y%m%d"),
        "PatientID": mrn,
        "AccessionNumber": "E" + digits(rng, 11),
        "InstitutionName": f"{PHI_MARKER}{_token(rng, 5)} Memorial Breast Center",
        "ReferringPhysicianName": f"{doctor}^Dr",
        "OperatorsName": f"{tech}^Tech",
        "ImageComments": f"Pt {given} {family} ({mrn}) positioned by {tech}",
        "StudyComments": f"Ordered by Dr {doctor} for {given} {family}",
    }


# ---------------------------------------------------------------- DICOM
def write_dicom(path, pixels: np.ndarray, *, monochrome1: bool, j2k: bool, laterality: str,
                view: str, phi: dict, study_description: str, sop_uid: str,
                study_uid: str | None = None, series_description: str = "",
                manufacturer: str = "", study_date: str = "") -> None:
    """Write one mammogram. `pixels`: uint16 [H, W], MONOCHROME2 sense, 12-bit values.

    MONOCHROME1 files store the inverted values (as such scanners do); j2k compresses
    losslessly with JPEG 2000 (pylibjpeg-openjpeg), else explicit VR little endian.
    """
    path = Path(path)
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype != np.uint16:
        raise ValueError(f"{path}: pixels must be uint16 [H, W], got {pixels.dtype} {pixels.shape}")
    if int(pixels.max(initial=0)) > MAX_VALUE:
        raise ValueError(f"{path}: pixels exceed 12 bits (max {int(pixels.max())})")
    if laterality not in ("L", "R"):
        raise ValueError(f"{path}: laterality {laterality!r} not L/R")
    missing = [k for k in ("PatientName", "PatientID", "AccessionNumber") if k not in phi]
    if missing:
        raise ValueError(f"{path}: phi lacks {', '.join(missing)}")
    stored = (MAX_VALUE - pixels).astype(np.uint16) if monochrome1 else pixels
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MAMMO_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MAMMO_SOP_CLASS, sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid(UID_PREFIX, entropy_srcs=[sop_uid, "study"])
    ds.SeriesInstanceUID = generate_uid(UID_PREFIX, entropy_srcs=[sop_uid, "series"])
    ds.Modality, ds.PresentationIntentType = "MG", "FOR PRESENTATION"
    ds.ImageType = ["DERIVED", "PRIMARY"] if "C-View" in series_description else ["ORIGINAL", "PRIMARY"]
    ds.PatientSex = phi.get("PatientSex", "F")
    for key, value in phi.items():
        if key != "PatientSex":
            setattr(ds, key, value)
    ds.StudyDescription, ds.SeriesDescription = study_description, series_description
    ds.StudyDate = study_date
    ds.Manufacturer = manufacturer
    ds.ImageLaterality, ds.ViewPosition = laterality, view
    ds.PatientOrientation = ORIENTATION.get((laterality, view), "")
    if view in VIEW_CODES:
        code = Dataset()
        code.CodeValue, code.CodeMeaning = VIEW_CODES[view]
        code.CodingSchemeDesignator = "SCT"
        ds.ViewCodeSequence = Sequence([code])
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [round(0.07 * 3328 / pixels.shape[0], 4)] * 2
    tissue = pixels[pixels > 0.08 * MAX_VALUE]  # window on the breast, not the background
    lo, hi = np.percentile(tissue, (1, 99)) if tissue.size else (0, MAX_VALUE)
    center = (lo + hi) / 2
    ds.WindowCenter = round(float(MAX_VALUE - center if monochrome1 else center), 1)
    ds.WindowWidth = round(float(max(hi - lo, 64)), 1)
    ds.VOILUTFunction = "LINEAR"
    ds.PixelData = stored.tobytes()
    if j2k:
        # keep our UID (pydicom would otherwise mint a random one, breaking determinism)
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
