"""Data-quality gates (data_prep.quality): each bad kind of file is skipped with its reason
in a build's manifest, on both JPEG 2000 paths; good images (CBIS-DDSM-like scanned film,
the synthetic EMBED set, breasts at the minimum size) are never stopped by them."""

import os
import re
import shutil

import cv2
import numpy as np
import pydicom
import pytest

from data_prep import build, prepare, quality, synthetic
from data_prep.dicom import DicomError, read_dicom
from data_prep.synthetic_dicom import PHI_MARKER
from tests.data_prep.phantoms import phantom, write_mammogram
from tests.data_prep.test_build import _dicoms

SIZE = (160, 128)
FOREGROUND = "no breast foreground after the crop"
SHORT_SIDE = "the short side must be at least 64"
EXCESS = "more than Rows x Columns x BitsAllocated / 8"
MISSING_BYTES = "fewer than Rows x Columns x BitsAllocated / 8"
BITS = "BitsStored (17) is larger than BitsAllocated (16)"
# Every reason a gate gives: a good file must never be skipped with one of these.
GATE_REASONS = (quality.BLANK, "no breast foreground", "the short side must be",
                "pixel data holds", "is larger than BitsAllocated")


def _by_path(out_dir):
    """The build's manifest entries by DICOM path."""
    return {e["dicom_path"]: e for e in prepare.read_manifest(out_dir).values()
            if e.get("dicom_path")}


def _is_gate_reason(reason):
    return any(g in (reason or "") for g in GATE_REASONS)


# ----------------------------------------------------------------------------- bad files


def _native(path):
    """The file as an uncompressed dataset (its UIDs kept), to edit pixels and header."""
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
    return ds


def _set_pixels(ds, pixels):
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.astype(np.uint16).tobytes()


def _blank(ds):
    _set_pixels(ds, np.zeros((ds.Rows, ds.Columns)))


def _constant(ds):
    _set_pixels(ds, np.full((ds.Rows, ds.Columns), 900))


def _label_only(ds):
    """An empty plate with one lead marker: Otsu finds only the marker (0.3 % of it)."""
    img = np.full((ds.Rows, ds.Columns), 100)
    img[10:18, 10:18] = 4000
    _set_pixels(ds, img)


def _sliver(ds):
    _set_pixels(ds, np.linspace(0, 4000, 600)[:, None])  # the 600 x 1 image


def _eight_bit_header(ds):
    # 16-bit values under a header that says 8: twice the bytes the header implies.
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7


def _bits_stored_17(ds):
    ds.BitsStored, ds.HighBit = 17, 16


def _short_pixel_data(ds):
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


BAD = {  # edit -> the reason the manifest must give
    _blank: quality.BLANK,
    _constant: quality.BLANK,
    _label_only: FOREGROUND,
    _sliver: "image is 600 x 1 pixels (Rows x Columns); " + SHORT_SIDE,
    _eight_bit_header: EXCESS,
    _bits_stored_17: BITS,
    _short_pixel_data: MISSING_BYTES,
}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(str(out), patients=4, seed=3, image_size=SIZE)
    return str(out)


@pytest.fixture(scope="module")
def clean(raw, tmp_path_factory):
    """The untouched set's manifest (by path): files the tables drop are skipped there too."""
    out = str(tmp_path_factory.mktemp("clean"))
    summary = build.build("embed", raw, raw, out, workers=1, long_side=64)
    return summary, _by_path(out)


def _written(entries, root):
    return [p for p in _dicoms(root) if entries[os.path.abspath(p)]["status"] == "written"]


def test_good_synthetic_files_pass_every_gate(raw, clean):
    summary, entries = clean
    assert len(_written(entries, raw)) == summary["written"] > len(BAD)
    assert not [e["reason"] for e in entries.values() if _is_gate_reason(e.get("reason"))]
    for path in _dicoms(raw):  # the files the tables drop (C-view copies, ...) too
        read_dicom(path, long_side=64)


def test_each_gate_fires_with_its_reason_in_the_manifest(raw, clean, tmp_path):
    src = str(tmp_path / "raw")
    shutil.copytree(raw, src)
    good = [os.path.join(src, os.path.relpath(p, raw)) for p in _written(clean[1], raw)]
    broken = dict(zip(good, BAD))
    for path, edit in broken.items():
        ds = _native(path)
        edit(ds)
        ds.save_as(path)

    out = str(tmp_path / "out")
    build.build("embed", src, src, out, workers=1, long_side=64)
    entries = _by_path(out)
    for path, edit in broken.items():
        entry = entries[os.path.abspath(path)]
        assert entry["status"] == "skipped", (edit.__name__, entry)
        assert BAD[edit] in entry["reason"], (edit.__name__, entry["reason"])
        assert PHI_MARKER not in entry["reason"] and "MRN" not in entry["reason"]
    for path in set(good) - set(broken):  # the rest is still written
        assert entries[os.path.abspath(path)]["status"] == "written"


@pytest.mark.parametrize("j2k_reduce", [True, False])
@pytest.mark.parametrize("kind, reason", [("blank", quality.BLANK), ("label", FOREGROUND)])
def test_image_gates_on_both_jpeg2000_paths(tmp_path, kind, reason, j2k_reduce):
    # 600 x 480 at long side 100: the reduced path would decode level 2.
    img = np.zeros((600, 480), np.uint16)
    if kind == "label":
        img[20:32, 20:32] = 12000
    path = write_mammogram(tmp_path / f"{kind}.dcm", img, j2k=True)
    with pytest.raises(DicomError, match=re.escape(f"{kind}.dcm") + ".*" + re.escape(reason)):
        read_dicom(path, long_side=100, j2k_reduce=j2k_reduce)


@pytest.mark.parametrize("j2k", [False, True])
def test_short_side_bound_is_64(tmp_path, j2k):
    for short, ok in ((64, True), (63, False)):
        img, _ = phantom(h=200, w=short, cy=100, cx=0, ry=90, rx=0.8 * short)
        path = write_mammogram(tmp_path / f"s{short}.dcm", img, j2k=j2k)
        if ok:
            assert min(read_dicom(path, long_side=96).pixels.shape) >= 1
        else:
            with pytest.raises(DicomError, match=f"200 x {short} pixels.*{SHORT_SIDE}"):
                read_dicom(path, long_side=96)


def test_odd_pixel_data_padding_is_not_a_length_error(tmp_path):
    # 8-bit 65 x 65: 4225 bytes, stored padded to 4226; the pad byte is fine, more is not.
    img, _ = phantom(h=65, w=65, cy=32, cx=0, ry=28, rx=40)
    ds = pydicom.dcmread(write_mammogram(tmp_path / "odd.dcm", img))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    values = (img >> 8).astype(np.uint8).tobytes()
    for extra, ok in ((b"", True), (b"\0", True), (b"\0\0\0", False)):
        ds.PixelData = values + extra
        ds.save_as(tmp_path / "odd.dcm")
        if ok:
            assert read_dicom(tmp_path / "odd.dcm", long_side=64).pixels.size > 0
        else:
            with pytest.raises(DicomError, match="holds 4228 bytes, " + EXCESS):
                read_dicom(tmp_path / "odd.dcm", long_side=64)


# ----------------------------------------------------------------------------- good film


def film_mammogram(seed: int) -> tuple[np.ndarray, str, str]:
    """A CBIS-DDSM-like scanned film (16 bits stored, MONOCHROME2): film-base fog with
    grain, a breast against the chest wall with a skin fall-off and texture, and per seed
    a bright label, a scanner edge strip, dense or fatty tissue. Returns (image, L/R, view)."""
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(480, 640)), int(rng.integers(300, 400))
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    r = np.hypot((yy - h * rng.uniform(0.4, 0.6)) / (h * rng.uniform(0.3, 0.45)),
                 xx / (w * rng.uniform(0.5, 0.8)))
    tissue = np.clip(1 - r, 0, None) ** 0.4
    texture = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 6)
    img = 3000 + 800 * rng.standard_normal((h, w))  # fog and film grain
    img += tissue * (rng.uniform(25000, 45000) + 60000 * texture)
    if seed % 2 == 0:  # a patient label, bright, opposite the chest wall
        img[int(0.05 * h):int(0.1 * h), int(0.75 * w):int(0.95 * w)] = 62000
    if seed % 3 == 0:  # the scanner's edge of the film
        img[:, -max(4, w // 40):] = 50000
    laterality, view = "LR"[seed % 2], ("CC", "MLO")[seed // 2 % 2]
    img = np.clip(img, 0, 65535).astype(np.uint16)
    return (img[:, ::-1] if laterality == "R" else img), laterality, view


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    root = tmp_path_factory.mktemp("film")
    jobs = []
    for seed in range(8):
        img, laterality, view = film_mammogram(seed)
        for j2k in (False, True):
            name = f"film{seed}_{'j2k' if j2k else 'native'}"
            write_mammogram(root / f"{name}.dcm", img, j2k=j2k, bits=16,
                            laterality=laterality, view=view)
            jobs.append((name, str(root / f"{name}.dcm")))
    return jobs


def test_cbis_ddsm_like_films_are_written(films, tmp_path):
    # Long side 128: the JPEG 2000 copies take the reduced path (level >= 1).
    entries = prepare.decode_all(films, str(tmp_path), prepare.DecodeOptions(long_side=128),
                                 workers=1)
    for name, _ in films:
        assert entries[name]["status"] == "written", entries[name]
        if name.endswith("j2k"):
            assert entries[name]["j2k_level"] >= 1
        else:
            assert entries[name]["j2k_level"] is None
