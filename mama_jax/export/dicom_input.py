"""DICOM files -> record images, as data_prep made the training records, and safe ids.

Pixels go through data_prep.dicom.read_dicom with the package's decode settings (the
reader, breast crop and long-side resize of the build). The only header values kept
are the SOP Instance UID (the image's key), the Study Instance UID (to group a study),
laterality and view; every other tag, identifying or not, is never read into a row.
A file that cannot be read is skipped with its reason (read_dicom's messages carry
the path and a reason, never a tag value).
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np


@dataclasses.dataclass(frozen=True)
class DicomImage:
    path: str
    sop_instance_uid: str   # "" when the file has none
    study_uid: str          # "" when the file has none (the study key falls back to the folder)
    laterality: str         # L / R / ""
    view: str               # CC / MLO / other code / ""
    pixels: np.ndarray | None  # uint16 [H, W], the record image (None once predicted)

    @property
    def study_key(self) -> str:
        return self.study_uid or f"folder:{os.path.dirname(self.path)}"


@dataclasses.dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def expand_inputs(paths) -> tuple[list[str], list[Skipped]]:
    """Files named and every regular file under folders named (sorted, hidden ones left
    out), each once; names that do not exist are skipped with that reason."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files, skipped, seen = [], [], set()

    def add(path: str) -> None:
        path = os.path.abspath(path)
        if path not in seen:
            seen.add(path)
            files.append(path)

    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if not name.startswith("."):
                        add(os.path.join(root, name))
        elif os.path.isfile(p):
            add(p)
        else:
            skipped.append(Skipped(os.path.abspath(p), "no such file or folder"))
    return files, skipped


def _uids(path: str) -> tuple[str, str]:
    """(SOP Instance UID, Study Instance UID) from the header; nothing else is parsed."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warnings may quote header values
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPInstanceUID", "StudyInstanceUID"])
    return str(ds.get("SOPInstanceUID", "") or ""), str(ds.get("StudyInstanceUID", "") or "")


def read_image(path: str, decode: dict) -> DicomImage | Skipped:
    """One file as the training records were made (decode: a package's settings)."""
    from data_prep import dicom

    try:
        decoded = dicom.read_dicom(path, voi=decode["voi"], long_side=decode["long_side"],
                                   j2k_reduce=decode["j2k_reduce"])
    except dicom.DicomError as err:
        return Skipped(path, err.reason)
    except Exception as err:  # noqa: BLE001  a decoder crash must not stop the batch
        # Only the type: a third-party message could quote a header value.
        return Skipped(path, f"cannot be decoded ({type(err).__name__})")
    try:
        sop, study = _uids(path)
    except Exception as err:  # noqa: BLE001
        return Skipped(path, f"header cannot be read ({type(err).__name__})")
    return DicomImage(path, sop, study, decoded.laterality, decoded.view, decoded.pixels)


def read_images(paths: list[str], decode: dict, workers: int = 1):
    """read_image of each path, in order, lazily. workers > 1 reads in that many spawned
    processes (the reader is not thread-safe, and a fork of a JAX process can hang);
    each imports only this module and data_prep, not JAX."""
    if workers <= 1 or len(paths) < 2:
        yield from (read_image(p, decode) for p in paths)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(read_image, paths, itertools.repeat(decode), chunksize=4)
