"""Reduced-resolution JPEG 2000 decoding (data_prep.j2k and read_dicom's reduced path).

Parity reference: the full-resolution decode (pydicom), normalised as today, cropped at
the box the reduced path recorded and area-resized (cv2 INTER_AREA) to the same shape.
Bounds, in uint16 record units (65535 = full range):
- mean absolute difference <= 0.5 % of the range (327.68), the issue's bound;
- max <= 10 % of the range (6554). The differences sit at sharp edges (skin line,
  collimator, pectoral wedge): a level is the wavelet low-pass, not a block mean, and
  its ringing lobe reaches an eighth of a step on either side. The global scale moves
  too: the extremes of a reduced level are block means, so the record's min-max scale
  differs from the full image's single-pixel extremes. Measured (x86-64, Pillow 13
  with OpenJPEG 2.5.4, pylibjpeg-openjpeg 2.6): mean 0.13-0.44 % of the range (RG1
  highest), max 2.3 k to 5.8 k (3.5-8.8 %, RG3 lossy with voi=window highest).
- no edge artefacts: the outermost rows and columns are no worse than the ring just
  inside them (a misplaced crop or a resampling bug shows up there first).

Rebuilding a dataset with the reduced path changes only the records of JPEG 2000 files
whose manifest j2k_level is above 0; every other record is the same, bit for bit.
"""

import os

import cv2
import numpy as np
import pytest

from benchmarks.prep_throughput import phantom as mammogram_phantom
from benchmarks.prep_throughput import write_j2k
from data_prep import build, j2k, prepare, synthetic
from data_prep.dicom import decode_pixels, read_dicom
from tests.data_prep.pydicom_files import data_file, read
from tests.data_prep.test_build import _read_dataset

J2K_FILES = ["MR_small_jp2klossless.dcm", "JPEG2000.dcm", "emri_small_jpeg_2k_lossless.dcm",
             "RG1_J2KR.dcm", "RG1_J2KI.dcm", "RG3_J2KR.dcm", "RG3_J2KI.dcm", "MR2_J2KR.dcm",
             "MR2_J2KI.dcm", "693_J2KR.dcm", "693_J2KI.dcm"]
RADIOGRAPHS = ["RG1_J2KR.dcm", "RG1_J2KI.dcm", "RG3_J2KR.dcm", "RG3_J2KI.dcm"]
MAD_BOUND, MAX_BOUND = 0.005 * 65536, 0.10 * 65535


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """One 3328 x 2560 14-bit lossless phantom (the benchmark's), encoded once (~5 s)."""
    path = str(tmp_path_factory.mktemp("j2k") / "phantom.dcm")
    write_j2k(path, mammogram_phantom(3328, 2560, seed=0))
    return path


def reference(path, transform, voi="none"):
    """Full decode, today's grey values, the recorded crop, cv2's area resize."""
    whole = read_dicom(path, long_side=2 ** 31 - 1, crop=False, j2k_reduce=False, voi=voi).pixels
    y0, y1, x0, x1 = transform.crop
    size = (transform.width, transform.height)
    return cv2.resize(whole[y0:y1, x0:x1], size, interpolation=cv2.INTER_AREA)


def differences(path, long_side, **kw):
    reduced = read_dicom(path, long_side=long_side, **kw)
    ref = reference(path, reduced.transform, kw.get("voi", "none"))
    assert reduced.pixels.shape == ref.shape and reduced.pixels.dtype == np.uint16
    return reduced, np.abs(reduced.pixels.astype(np.int64) - ref.astype(np.int64))


def check_parity(diff):
    assert diff.mean() <= MAD_BOUND, diff.mean()
    assert diff.max() <= MAX_BOUND, diff.max()
    for outer, inner in (((0,), (1, 2, 3)), ((-1,), (-2, -3, -4))):
        for rows in (True, False):
            take = (lambda i: diff[list(i)]) if rows else (lambda i: diff[:, list(i)])
            assert take(outer).mean() <= 1.5 * take(inner).mean() + 0.001 * 65535, (outer, rows)


# ----------------------------------------------------------------------------- codec


@pytest.mark.parametrize("name", J2K_FILES)
def test_level_0_equals_pydicom_and_levels_have_the_codestream_size(name):
    ds = read(name)
    stream = j2k.codestream(ds)
    assert stream is not None and stream.levels == 5
    full = decode_pixels(ds, data_file(name))
    level0 = j2k.decode_level(stream, 0)
    assert level0.dtype == full.dtype
    np.testing.assert_array_equal(level0, full)
    for level in (1, 2, 3):  # RG1 (1955 x 1841) at level 2: Pillow's size rounding differs
        got = j2k.decode_level(stream, level)
        assert got is not None and got.shape == tuple(-(-s // 2 ** level) for s in full.shape)


def test_what_pillow_cannot_give_back_exactly_keeps_the_full_path():
    assert j2k.codestream(read("J2K_pixelrep_mismatch.dcm")) is None  # unsigned stream, signed header
    assert j2k.codestream(read("US1_J2KR.dcm")) is None                # three components
    assert j2k.codestream(read("MR_small.dcm")) is None                # not JPEG 2000
    out = read_dicom(data_file("J2K_pixelrep_mismatch.dcm"), long_side=64)
    assert out.j2k_level == 0
    assert read_dicom(data_file("MR_small.dcm"), long_side=32).j2k_level is None


# ----------------------------------------------------------------------------- parity


def test_full_size_phantom_parity(full_size):
    reduced, diff = differences(full_size, 1036)
    assert reduced.j2k_level == 1  # 3328-px crop: 1664 px at level 1, too few at level 2
    check_parity(diff)
    # Against today's record: the same breast box up to a few pixels, the same size.
    today = read_dicom(full_size, long_side=1036, j2k_reduce=False)
    assert today.j2k_level == 0
    assert np.abs(np.subtract(reduced.transform.crop, today.transform.crop)).max() <= 24
    assert abs(reduced.pixels.shape[1] - today.pixels.shape[1]) <= 2
    assert reduced.pixels.shape[0] == today.pixels.shape[0] == 1036


@pytest.mark.parametrize("name", RADIOGRAPHS)
@pytest.mark.parametrize("voi", ["none", "window"])
def test_radiograph_parity_at_level_2(name, voi):
    reduced, diff = differences(data_file(name), 400, voi=voi)  # MONOCHROME1, 15 / 10 bits
    assert reduced.j2k_level == 2
    check_parity(diff)


@pytest.mark.parametrize("name", J2K_FILES)
def test_default_long_side_needs_level_0_for_the_pydicom_files(name):
    # All under 2 x 1036 px: the reduced path must give today's record, bit for bit.
    on = read_dicom(data_file(name))
    off = read_dicom(data_file(name), j2k_reduce=False)
    assert on.j2k_level == off.j2k_level == 0
    np.testing.assert_array_equal(on.pixels, off.pixels)
    assert on.transform == off.transform


def test_crop_false_decodes_a_level_of_the_whole_image():
    path = data_file("RG3_J2KR.dcm")
    out, diff = differences(path, 440, crop=False)
    assert out.j2k_level == 2 and out.transform.crop == (0, 1760, 0, 1760)
    check_parity(diff)


def test_manifest_records_the_level_and_off_gives_the_full_path(full_size, tmp_path):
    # One output folder: a re-run with --j2k-reduce off must not reuse the reduced cache.
    jobs, out = [("phantom", full_size)], str(tmp_path)
    on = prepare.decode_all(jobs, out, prepare.DecodeOptions(), workers=1)
    assert on["phantom"]["j2k_level"] == 1
    off = prepare.decode_all(jobs, out, prepare.DecodeOptions(j2k_reduce=False), workers=1)
    assert off["phantom"]["j2k_level"] == 0
    today = read_dicom(full_size, j2k_reduce=False)
    np.testing.assert_array_equal(prepare.read_cached(out, "phantom").to_array(), today.pixels)
    assert off["phantom"]["crop"] == list(today.transform.crop)
    lines = open(os.path.join(out, prepare.MANIFEST)).readlines()
    prepare.decode_all(jobs, out, prepare.DecodeOptions(j2k_reduce=False), workers=1)
    assert len(open(os.path.join(out, prepare.MANIFEST)).readlines()) == len(lines) == 2


def test_cli_flag():
    from data_prep.__main__ import _parser

    base = ["build", "--dataset", "embed", "--tables", "t", "--images", "i", "--out", "o"]
    assert _parser().parse_args(base).j2k_reduce == "on"
    assert _parser().parse_args(base + ["--j2k-reduce", "off"]).j2k_reduce == "off"



# ----------------------------------------------------------------------------- rebuild


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory):
    """A small demo set: the demo's image size (640 x 512), a quarter of studies J2K."""
    out = str(tmp_path_factory.mktemp("demo"))
    synthetic.generate(out, patients=3, seed=0)
    return out


def _records(raw, out, **kw):
    """(records by image id, manifest) of a build of `raw`."""
    build.build("embed", raw, raw, out, workers=1, **kw)
    records = {r["image_id"].decode(): r for rs in _read_dataset(out).values() for r in rs}
    return records, prepare.read_manifest(out)


@pytest.mark.parametrize("long_side, level_changes", [(1036, False), (160, True)])
def test_rebuild_changes_only_the_jpeg2000_records_whose_level_changed(
        demo_raw, tmp_path, long_side, level_changes):
    # At the demo's long side every crop needs level 0: the rebuild is the same, bit for bit.
    # At 160 the J2K crops take level 1 or 2 there; the manifest names them.
    on, manifest = _records(demo_raw, str(tmp_path / "on"), long_side=long_side)
    off, manifest_off = _records(demo_raw, str(tmp_path / "off"), long_side=long_side,
                                 j2k_reduce=False)
    assert on.keys() == off.keys() and len(on) > 0
    changed = {i for i in on if (manifest[i]["j2k_level"] or 0) > 0}
    assert bool(changed) == level_changes
    assert {manifest_off[i]["j2k_level"] for i in on} <= {None, 0}
    levels = {manifest[i]["j2k_level"] for i in on}
    assert None in levels and levels - {None}  # native and JPEG 2000 files both in the set
    for i in on:
        same = {k for k in on[i] if np.array_equal(on[i][k], off[i][k])}
        if i in changed:  # the image and the crop-mapped boxes may move; nothing else
            assert set(on[i]) - same <= {"image", "roi_boxes"}
            assert abs(on[i]["image"].shape[1] - off[i]["image"].shape[1]) <= 2
        else:
            assert same == set(on[i]), (i, set(on[i]) - same)
