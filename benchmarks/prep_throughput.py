"""DICOM preparation throughput on one CPU core (data_prep.dicom.read_dicom).

Writes full-size synthetic mammograms as JPEG 2000 lossless (1.2.840.10008.1.2.4.90,
RSNA's main codec), 16-bit allocated, MONOCHROME2, then times read_dicom on each
in a single process pinned to one core, on the reduced JPEG 2000 path (the default) and
on the full-resolution path (--j2k-reduce off). For each it prints images/s/core,
ms/image, the share of time in read / decode / process (modality+normalise+crop+resize)
and the ratio of its time to a plain full-resolution decode of the same files
(dcmread + pydicom pixel_array): issue 16 asks at most 0.4 on the reduced path.

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
from pydicom.pixels import pixel_array
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


def time_full_decode(paths: list[str]) -> float:
    """Seconds to read and decode every file at full resolution (pydicom, no processing)."""
    pixel_array(pydicom.dcmread(paths[0]), index=0)  # warm-up (plugin imports)
    t0 = time.perf_counter()
    for path in paths:
        pixel_array(pydicom.dcmread(path), index=0)
    return time.perf_counter() - t0


def time_prep(paths: list[str], args, j2k_reduce: bool) -> dict:
    """Time read_dicom on `paths`: wall seconds, summed timings, levels, last output."""
    kw = dict(voi=args.voi, long_side=args.long_side, j2k_reduce=j2k_reduce)
    read_dicom(paths[0], **kw)  # warm-up (imports, caches)
    totals = {"read": 0.0, "decode": 0.0, "process": 0.0}
    levels = set()
    t0 = time.perf_counter()
    for path in paths:
        out = read_dicom(path, **kw)
        levels.add(out.j2k_level)
        for k in totals:
            totals[k] += out.timings[k]
    return {"wall": time.perf_counter() - t0, "totals": totals, "levels": sorted(levels),
            "shape": out.pixels.shape, "dtype": out.pixels.dtype, "j2k_reduce": j2k_reduce}


def report(name: str, run: dict, n: int, decode_wall: float) -> None:
    """Print images/s/core, the time split and the ratio to a full-resolution decode."""
    wall, totals = run["wall"], run["totals"]
    share = {k: 100.0 * v / sum(totals.values()) for k, v in totals.items()}
    flag = "on" if run["j2k_reduce"] else "off"
    print(f"prep_throughput: {name} path (--j2k-reduce {flag}), J2K level(s) {run['levels']}, "
          f"last output {run['shape'][0]}x{run['shape'][1]} {run['dtype']}")
    print(f"prep_throughput:   {n / wall:.3f} images/s/core; {1000 * wall / n:.0f} ms/image; "
          f"prep / full-resolution decode = {wall / decode_wall:.2f}")
    print(f"prep_throughput:   read {share['read']:.1f}% / decode {share['decode']:.1f}% / "
          f"process {share['process']:.1f}% (normalise+crop+resize); per image read "
          f"{1000 * totals['read'] / n:.0f} ms, decode {1000 * totals['decode'] / n:.0f} ms, "
          f"process {1000 * totals['process'] / n:.0f} ms")


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
        print(f"prep_throughput: 1 process, {where}, voi={args.voi}, long side {args.long_side}; "
              f"pydicom {pydicom.__version__}")
        # The plain decode is timed before and after the two paths and averaged, so a
        # drift of the shared host's speed does not favour either side of the ratio.
        before = time_full_decode(paths)
        runs = {"reduced": time_prep(paths, args, True), "full": time_prep(paths, args, False)}
        decode_wall = (before + time_full_decode(paths)) / 2
        print(f"prep_throughput: full-resolution decode (dcmread + pixel_array) "
              f"{1000 * decode_wall / args.n:.0f} ms/image")
        for name, run in runs.items():
            report(name, run, args.n, decode_wall)
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
