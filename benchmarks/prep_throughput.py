"""DICOM preparation throughput on one CPU core (data_prep.dicom.read_dicom).

Writes full-size synthetic mammograms as JPEG 2000 lossless (1.2.840.10008.1.2.4.90,
RSNA's main codec), 16-bit allocated, MONOCHROME2, then times read_dicom on each
in a single process pinned to one core and prints images/s/core, ms/image and
the share of time in read / decode / process (modality+normalise+crop+resize).

    .venv/bin/python benchmarks/prep_throughput.py --n 4

The phantom is made here (not data_prep.synthetic) so the figure does not move
when the demo data changes: a breast against the chest-wall edge with a skin
fall-off, multi-scale fibroglandular texture, a pectoral wedge and quantum noise,
so the codestream compresses about as hard as a real mammogram (~2-3:1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_prep.dicom import read_dicom  # noqa: E402

BITS_STORED = 14


def phantom(height: int, width: int, seed: int) -> np.ndarray:
    """uint16 MONOCHROME2 breast phantom with 14-bit values."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    cy = height * rng.uniform(0.45, 0.55)
    ry, rx = height * rng.uniform(0.36, 0.45), width * rng.uniform(0.5, 0.7)
    r = np.sqrt(((yy - cy) / ry) ** 2 + (xx / rx) ** 2)  # breast against x = 0
    thickness = np.clip(1.0 - r, 0.0, None) ** 0.35     # soft skin-line fall-off
    texture = np.zeros((height, width), np.float32)
    for sigma, weight in ((48, 0.5), (12, 0.3), (3, 0.2)):  # glandular structure
        noise = rng.standard_normal((height, width)).astype(np.float32)
        noise = cv2.GaussianBlur(noise, (0, 0), sigma)
        texture += weight * noise / (noise.std() + 1e-6)
    img = 600.0 + thickness * (7000.0 + 1500.0 * texture)
    pectoral = (xx / (0.35 * width) + yy / (0.4 * height)) < 1.0  # MLO wedge, top left
    img[pectoral & (thickness > 0)] += 2500.0
    img += rng.normal(0.0, 12.0, img.shape).astype(np.float32)  # quantum noise
    return np.clip(img, 0, 2 ** BITS_STORED - 1).astype(np.uint16)


def write_j2k(path: str, image: np.ndarray) -> float:
    """Write `image` as a JPEG 2000 lossless mammogram; returns encode seconds."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # digital MG
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ImageLaterality, ds.ViewPosition = "MG", "L", "MLO"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, BITS_STORED, BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelData = image.tobytes()
    t0 = time.perf_counter()
    try:
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    except Exception as e:
        sys.exit(f"prep_throughput: cannot encode JPEG 2000 with pylibjpeg "
                 f"({type(e).__name__}: {e}); is pylibjpeg-openjpeg installed?")
    seconds = time.perf_counter() - t0
    ds.save_as(path, enforce_file_format=True)
    return seconds


def pin_to_one_core() -> str:
    cv2.setNumThreads(1)
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"pinned to core {core}"
    return "not pinned (no sched_setaffinity)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="number of images")
    parser.add_argument("--height", type=int, default=3328)
    parser.add_argument("--width", type=int, default=2560)
    parser.add_argument("--long-side", type=int, default=1036)
    parser.add_argument("--voi", default="none", choices=("none", "window"))
    parser.add_argument("--workdir", default="tmp",
                        help="folder for the DICOMs; 'tmp' = a temporary folder, removed after")
    args = parser.parse_args(argv)
    if args.n < 1 or args.height < 16 or args.width < 16:
        parser.error("--n must be >= 1 and --height/--width >= 16")

    temporary = args.workdir == "tmp"
    workdir = tempfile.mkdtemp(prefix="prep_throughput_") if temporary else args.workdir
    os.makedirs(workdir, exist_ok=True)
    try:
        paths, encode_s, raw_bytes = [], 0.0, 0
        for i in range(args.n):
            img = phantom(args.height, args.width, seed=i)
            path = os.path.join(workdir, f"phantom_{i:03d}.dcm")
            encode_s += write_j2k(path, img)
            raw_bytes += img.nbytes
            paths.append(path)
        file_bytes = sum(os.path.getsize(p) for p in paths)
        print(f"prep_throughput: wrote {args.n} x {args.height}x{args.width} J2K lossless "
              f"({BITS_STORED} bits stored) to {workdir}; encode {encode_s / args.n:.2f} s/image, "
              f"compression {raw_bytes / file_bytes:.2f}:1, {file_bytes / args.n / 2**20:.1f} MiB/file")

        where = pin_to_one_core()
        read_dicom(paths[0], voi=args.voi, long_side=args.long_side)  # warm-up (imports, caches)
        totals = {"read": 0.0, "decode": 0.0, "process": 0.0}
        t0 = time.perf_counter()
        for path in paths:
            out = read_dicom(path, voi=args.voi, long_side=args.long_side)
            for k in totals:
                totals[k] += out.timings[k]
        wall = time.perf_counter() - t0
        share = {k: 100.0 * v / sum(totals.values()) for k, v in totals.items()}
        print(f"prep_throughput: 1 process, {where}, voi={args.voi}, long side {args.long_side}, "
              f"last output {out.pixels.shape[0]}x{out.pixels.shape[1]} {out.pixels.dtype}")
        print(f"prep_throughput: {args.n / wall:.3f} images/s/core; {1000 * wall / args.n:.0f} ms/image; "
              f"read {share['read']:.1f}% / decode {share['decode']:.1f}% / "
              f"process {share['process']:.1f}% (crop+resize+normalise)")
        print(f"prep_throughput: per image read {1000 * totals['read'] / args.n:.0f} ms, "
              f"decode {1000 * totals['decode'] / args.n:.0f} ms, "
              f"process {1000 * totals['process'] / args.n:.0f} ms; pydicom {pydicom.__version__}")
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
