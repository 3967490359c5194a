"""Stage 1 of a build: decode every listed DICOM once into a resumable cache.

Each image is decoded, cropped and resized by a worker process (dicom.read_dicom;
JPEG 2000 at a reduced level unless DecodeOptions.j2k_reduce is off) and written
atomically under `cache/` as an 8-byte shape header plus the zlib-compressed
uint16 buffer: exactly the bytes the dataset stores, so packing needs no
further compression (the slow part of a single-process TFDS write); its outcome (written,
with the crop box that places lesion boxes and the JPEG 2000 level decoded, or skipped
with the reason: unreadable, or stopped by a quality gate) is appended to
`manifest.jsonl` and flushed at once, with the DecodeOptions it was made with. A build
that is killed keeps everything finished: on the next run, images already in the
manifest are not decoded again, unless their options differ from this run's (another
--long-side, --voi or --j2k-reduce) or they predate the recorded options.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
from dataclasses import asdict, dataclass

import struct
import zlib
import numpy as np
from tqdm import tqdm

from data_prep import dicom, geometry

MANIFEST = "manifest.jsonl"
CACHE = "cache"


@dataclass(frozen=True)
class DecodeOptions:
    long_side: int = 1036
    voi: str = "none"
    j2k_reduce: bool = True  # False: decode JPEG 2000 at full resolution, as before


def cache_path(out_dir: str, image_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", image_id)
    return os.path.join(out_dir, CACHE, safe[-2:] or "00", safe + ".u16z")


@dataclass(frozen=True)
class CompressedImage:
    """A uint16 [H, W] image as zlib bytes of its little-endian buffer."""
    shape: tuple[int, int]
    data: bytes

    @classmethod
    def compress(cls, pixels: np.ndarray) -> "CompressedImage":
        buf = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
        return cls(tuple(int(s) for s in pixels.shape), zlib.compress(buf, 1))

    def to_array(self) -> np.ndarray:
        return np.frombuffer(zlib.decompress(self.data), dtype="<u2").reshape(self.shape)


_HEADER = struct.Struct("<II")


def write_cached(path: str, image: CompressedImage) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(_HEADER.pack(*image.shape) + image.data)
    os.replace(tmp, path)  # atomic: a killed worker never leaves half a file


def read_cached(out_dir: str, image_id: str) -> CompressedImage:
    path = cache_path(out_dir, image_id)
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < _HEADER.size:
        raise IOError(f"{path}: cached image is truncated")
    return CompressedImage(_HEADER.unpack_from(blob), blob[_HEADER.size:])


def _decode_one(job: tuple[str, str, str, DecodeOptions]) -> dict:
    """Worker: decode one DICOM into the cache. Never raises; reports the outcome."""
    image_id, dicom_path, out_dir, opts = job
    entry = {"image_id": image_id, "dicom_path": dicom_path, "options": asdict(opts)}
    if not os.path.exists(dicom_path):
        return {**entry, "status": "skipped", "reason": "file not found"}
    try:
        decoded = dicom.read_dicom(dicom_path, voi=opts.voi, long_side=opts.long_side,
                                   j2k_reduce=opts.j2k_reduce)
    except dicom.DicomError as err:
        # The message names the file first; keep only the reason.
        reason = str(err)
        if reason.startswith(dicom_path):
            reason = reason[len(dicom_path):].lstrip(" :")
        return {**entry, "status": "skipped", "reason": reason}
    except Exception as err:  # a decoder crash must not stop the batch
        return {**entry, "status": "skipped", "reason": f"{type(err).__name__}: {err}"}
    pixels, transform = decoded.pixels, decoded.transform  # the crop box places lesion boxes
    target = cache_path(out_dir, image_id)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    write_cached(target, CompressedImage.compress(pixels))
    h, w = pixels.shape
    return {**entry, "status": "written", "height": int(h), "width": int(w),
            "crop": list(transform.crop), "j2k_level": decoded.j2k_level,
            "dicom_laterality": decoded.laterality, "dicom_view": decoded.view}


def transform_of(entry: dict) -> geometry.CropResize | None:
    """The crop/resize a written manifest entry records (None for entries written before
    the crop box was recorded)."""
    if entry.get("status") != "written" or "crop" not in entry:
        return None
    return geometry.CropResize(tuple(int(v) for v in entry["crop"]), int(entry["height"]),
                               int(entry["width"]))


def read_manifest(out_dir: str) -> dict[str, dict]:
    """Latest manifest entry per image id (a killed run may leave a torn last line)."""
    path = os.path.join(out_dir, MANIFEST)
    entries: dict[str, dict] = {}
    if not os.path.exists(path):
        return entries
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            entries[entry["image_id"]] = entry
    return entries


def decode_all(jobs: list[tuple[str, str]], out_dir: str, opts: DecodeOptions,
               workers: int, table_skips: list[dict] = ()) -> dict[str, dict]:
    """Decode (image_id, dicom_path) jobs not yet in the manifest; return all entries.

    `table_skips` are inputs the table rules excluded; they go into the manifest
    too, so it accounts for every input image.
    """
    os.makedirs(os.path.join(out_dir, CACHE), exist_ok=True)
    done = read_manifest(out_dir)
    # A written entry whose cache file vanished, or that predates the recorded crop box
    # (needed to place lesion boxes), is decoded again.
    done = {k: v for k, v in done.items()
            if v["status"] != "written"
            or (os.path.exists(cache_path(out_dir, k)) and transform_of(v) is not None)}
    # So is a decoded entry made with other options (or before options were recorded):
    # a cache from another --long-side or --j2k-reduce must not pass for this run's.
    todo = [(i, p, out_dir, opts) for i, p in jobs
            if done.get(i, {}).get("options") != asdict(opts)]
    with open(os.path.join(out_dir, MANIFEST), "a") as manifest:
        def record(entry: dict) -> None:
            manifest.write(json.dumps(entry, sort_keys=True) + "\n")
            manifest.flush()
            done[entry["image_id"]] = entry

        for skip in table_skips:
            if skip["image_id"] not in done:
                record({**skip, "status": "skipped"})
        if not todo:
            return done
        bar = tqdm(total=len(todo), desc="decode", unit="img", dynamic_ncols=True)
        if workers <= 1:
            for job in todo:
                record(_decode_one(job))
                bar.update()
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers) as pool:
                for entry in pool.imap_unordered(_decode_one, todo, chunksize=1):
                    record(entry)
                    bar.update()
        bar.close()
    return done
