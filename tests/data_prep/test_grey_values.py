"""data_prep.dicom grey values: MONOCHROME1 inversion, VOI LUT sequences and windows
(LINEAR, LINEAR_EXACT, SIGMOID) against the DICOM formulas written out in numpy, and
the uint16 normalisation."""

import copy

import numpy as np
import pytest
from pydicom.pixels import apply_voi_lut

from data_prep.dicom import decode_pixels, normalise_uint16, read_dicom, to_monochrome2
from tests.data_prep.pydicom_files import data_file, native_frame0, pillow_j2k, read

# ----------------------------------------------------------------------------- grey values


@pytest.fixture(scope="module")
def rg3():
    ds = read("RG3_J2KR.dcm")  # MONOCHROME1, 10-bit, WC 550 / WW 1024
    return ds, pillow_j2k(ds).astype(np.float64)


def test_monochrome1_is_inverted(rg3):
    ds, raw = rg3
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    stored = decode_pixels(ds, "RG3_J2KR.dcm")
    got = to_monochrome2(stored, ds, voi="none")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, raw.max() + raw.min() - raw)

    windowed = apply_voi_lut(stored, ds)  # LINEAR window, float64
    got_w = to_monochrome2(stored, ds, voi="window")
    np.testing.assert_allclose(got_w, windowed.max() + windowed.min() - windowed, atol=0.02)


def test_read_dicom_monochrome1_without_crop_or_resize(rg3):
    ds, raw = rg3
    out = read_dicom(data_file("RG3_J2KR.dcm"), long_side=4000, crop=False).pixels
    want = (raw.max() - raw) / (raw.max() - raw.min()) * 65535
    assert out.dtype == np.uint16 and out.shape == raw.shape
    assert np.abs(out.astype(np.float64) - want).max() <= 0.51  # rounding, float32 slack


def test_voi_lut_sequence():
    ds = read("vlut_04.dcm")
    raw = native_frame0(ds)
    got = to_monochrome2(decode_pixels(ds, "vlut_04.dcm"), ds, voi="window")
    np.testing.assert_array_equal(got, apply_voi_lut(raw, ds).astype(np.float32))
    # The lookup written out: entries below first_map take entry 0, past the end the last.
    n, first, _ = ds.VOILUTSequence[0].LUTDescriptor
    lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
    idx = np.clip(raw.astype(np.int64) - first, 0, (n or 65536) - 1)
    np.testing.assert_array_equal(got, lut[idx])
    assert not np.array_equal(got, raw.astype(np.float32))  # the LUT really did something


def linear(x, c, w, y_min, y_max):  # PS3.3 C.11.2.1.2.1
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    mid = ((x - (c - 0.5)) / (w - 1) + 0.5) * (y_max - y_min) + y_min
    return np.where(x <= lo, y_min, np.where(x > hi, y_max, mid))


def linear_exact(x, c, w, y_min, y_max):  # PS3.3 C.11.2.1.3.2
    mid = ((x - c) / w + 0.5) * (y_max - y_min) + y_min
    return np.where(x <= c - w / 2, y_min, np.where(x > c + w / 2, y_max, mid))


def sigmoid(x, c, w, y_min, y_max):  # PS3.3 C.11.2.1.3.1
    return (y_max - y_min) / (1 + np.exp(-4 * (x - c) / w)) + y_min


@pytest.mark.parametrize("function, formula", [
    (None, linear), ("LINEAR", linear), ("LINEAR_EXACT", linear_exact), ("SIGMOID", sigmoid)])
@pytest.mark.parametrize("rescale", [None, (2.0, -100.0)])
def test_windowing_matches_standard_formulas(function, formula, rescale):
    ds = read("MR_small.dcm")  # signed 16-bit, WC 600 / WW 1600
    x = native_frame0(ds).astype(np.float64)
    if function:
        ds.VOILUTFunction = function
    y_min, y_max = -32768.0, 32767.0
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        x = x * rescale[0] + rescale[1]
        y_min, y_max = y_min * rescale[0] + rescale[1], y_max * rescale[0] + rescale[1]
    got = to_monochrome2(decode_pixels(ds, "MR_small.dcm"), ds, voi="window")
    want = formula(x, 600.0, 1600.0, y_min, y_max)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0.05)
    np.testing.assert_allclose(got, apply_voi_lut(x, ds), rtol=1e-5, atol=0.05)
    assert not np.allclose(got, x, atol=1.0)  # the window really did something


def test_windowing_fallbacks():
    ds = read("MR_small.dcm")
    raw = decode_pixels(ds, "MR_small.dcm")
    plain = to_monochrome2(raw, ds, voi="none")
    np.testing.assert_array_equal(plain, raw.astype(np.float32))
    for change in ({"WindowWidth": 0}, {"WindowCenter": 1e6},  # invalid / constant result
                   {"VOILUTFunction": "CUBIC"}):
        odd = copy.deepcopy(ds)
        for key, value in change.items():
            setattr(odd, key, value)
        np.testing.assert_array_equal(to_monochrome2(raw, odd, voi="window"), plain)
    several = copy.deepcopy(ds)  # several windows: the first one is used
    several.WindowCenter, several.WindowWidth = [600, 1000], [1600, 400]
    np.testing.assert_array_equal(to_monochrome2(raw, several, voi="window"),
                                  to_monochrome2(raw, ds, voi="window"))
    del ds.WindowCenter, ds.WindowWidth
    np.testing.assert_array_equal(to_monochrome2(raw, ds, voi="window"), plain)
    with pytest.raises(ValueError, match="voi"):
        to_monochrome2(raw, ds, voi="auto")
    with pytest.raises(ValueError, match="voi"):
        read_dicom(data_file("MR_small.dcm"), voi="sigmoid")


def test_normalise_uint16():
    a = np.array([[-5.0, 0.0], [5.0, 15.0]], np.float32)
    np.testing.assert_array_equal(normalise_uint16(a),
                                  np.round((a + 5) / 20 * 65535).astype(np.uint16))
    assert normalise_uint16(np.full((3, 4), 7.0)).tolist() == [[0] * 4] * 3
    assert normalise_uint16(np.arange(6, dtype=np.int16).reshape(2, 3)).dtype == np.uint16
