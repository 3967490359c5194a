"""data_prep.dicom: codecs, tags and bad files (grey values: test_grey_values.py; crop and
resize: test_geometry.py).

Pixel values are checked against an independent decode wherever one exists:
the raw bytes of an uncompressed twin (numpy.frombuffer), Pillow's own
JPEG 2000 decoder, or spot values published in pydicom's test suite.
"""

import pickle
import re

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence

from data_prep.dicom import (
    DecodedImage,
    DicomError,
    decode_pixels,
    laterality_and_view,
    read_dicom,
)
from tests.data_prep.phantoms import box_of, phantom, write_mammogram
from tests.data_prep.pydicom_files import data_file, native_frame0, pillow_j2k, read



# ----------------------------------------------------------------------------- codecs


@pytest.mark.parametrize("name, twin", [
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),       # 4.90, RSNA's main codec
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),   # 4.80
    ("MR_small_RLE.dcm", "MR_small.dcm"),                # RLE
    ("MR_small_bigendian.dcm", "MR_small.dcm"),          # explicit big endian
    ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),  # multi-frame: first frame
])
def test_lossless_codecs_equal_uncompressed_twin(name, twin):
    ds = read(name)
    got = decode_pixels(ds, data_file(name))
    want = native_frame0(read(twin))
    assert got.ndim == 2 and got.dtype.isnative
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "RG3_J2KR.dcm"])
def test_jpeg2000_equals_pillow_decode(name):
    ds = read(name)
    got = decode_pixels(ds, data_file(name))
    np.testing.assert_array_equal(got.astype(np.int64), pillow_j2k(ds))


# Spot values from pydicom's tests/pixels/pixels_reference.py (JPGS_* entries).
SV1_SPOTS = {
    "JPEG-LL.dcm": {(400, 124): (60, 58, 61, 68, 59, 65, 64, 67),
                    (600, 124): (3, 1, 2, 0, 2, 1, 2, 0)},
    "JPGLosslessP14SV1_1s_1f_8b.dcm": {(300, 512): (26, 26, 25, 22, 19, 16, 14, 15),
                                       (600, 512): (45, 43, 41, 38, 33, 30, 26, 21)},
}


@pytest.mark.parametrize("name", sorted(SV1_SPOTS))
def test_jpeg_lossless_sv1(name):
    ds = read(name)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    got = decode_pixels(ds, data_file(name))
    np.testing.assert_array_equal(got, pydicom.dcmread(data_file(name)).pixel_array)
    for (row, col), values in SV1_SPOTS[name].items():
        assert tuple(got[row, col:col + 8]) == values


def test_colour_file_is_rejected():
    path = data_file("SC_rgb_jpeg_gdcm.dcm")  # SV1 but RGB: not a mammogram
    with pytest.raises(DicomError, match=re.escape("SC_rgb_jpeg_gdcm.dcm")) as err:
        read_dicom(path)
    assert "RGB" in str(err.value) and "MONOCHROME" in str(err.value)



# ----------------------------------------------------------------------------- tags


def coded(meaning="", value=""):
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return Sequence([item])


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower case on purpose
def test_laterality_and_view():
    ds = Dataset()
    assert laterality_and_view(ds) == ("", "")
    ds.Laterality, ds.ViewPosition = "r", "mlo "
    assert laterality_and_view(ds) == ("R", "MLO")
    ds.ImageLaterality = "L"  # image-level wins over series-level
    assert laterality_and_view(ds) == ("L", "MLO")
    ds.ImageLaterality, ds.Laterality = "B", ""  # both breasts: unknown side
    assert laterality_and_view(ds)[0] == ""

    ds = Dataset()
    ds.ViewPosition = ""
    ds.ViewCodeSequence = coded("cranio-caudal", "399162004")
    assert laterality_and_view(ds) == ("", "CC")
    ds.ViewCodeSequence = coded("Medio-lateral oblique")
    assert laterality_and_view(ds)[1] == "MLO"
    ds.ViewCodeSequence = coded("", "399368009")
    assert laterality_and_view(ds)[1] == "MLO"
    ds.ViewCodeSequence = coded("medio-lateral", "")
    assert laterality_and_view(ds)[1] == "ML"
    ds.ViewCodeSequence = coded("some free text view")
    assert laterality_and_view(ds)[1] == ""

    anatomy = Dataset()
    anatomy.FrameLaterality = "R"
    group = Dataset()
    group.FrameAnatomySequence = Sequence([anatomy])
    ds.SharedFunctionalGroupsSequence = Sequence([group])
    assert laterality_and_view(ds)[0] == "R"


# ----------------------------------------------------------------------------- bad input


def copy_of(name, tmp_path, new_name, edit=None):
    ds = read(name)
    if edit:
        edit(ds)
    path = tmp_path / new_name
    ds.save_as(path)
    return path


@pytest.mark.parametrize("source, fraction", [
    ("MR_small.dcm", 0.5), ("MR_small_jp2klossless.dcm", 0.5), ("JPEG-LL.dcm", 0.9)])
def test_truncated_file(tmp_path, source, fraction):
    data = open(data_file(source), "rb").read()
    path = tmp_path / f"cut_{fraction}_{source}"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(DicomError, match=re.escape(path.name)) as err:
        read_dicom(path)
    assert "truncated" in str(err.value) or "less than expected" in str(err.value)


def test_cut_codestream_in_a_well_formed_file(tmp_path):
    # openjpeg would decode this silently; the missing end-of-image marker gives it away.
    def cut(ds):
        stream = next(generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([stream[:-200]])
    path = copy_of("MR_small_jp2klossless.dcm", tmp_path, "cut_stream.dcm", cut)
    with pytest.raises(DicomError, match=re.escape("cut_stream.dcm")) as err:
        read_dicom(path)
    assert "truncated" in str(err.value)


def test_missing_pixel_data(tmp_path):
    path = copy_of("MR_small.dcm", tmp_path, "no_pixels.dcm", lambda ds: ds.pop("PixelData"))
    with pytest.raises(DicomError, match=re.escape("no_pixels.dcm")) as err:
        read_dicom(path)
    assert "no PixelData" in str(err.value)


def test_unsupported_transfer_syntax(tmp_path):
    def to_mpeg2(ds):
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    path = copy_of("MR_small_jp2klossless.dcm", tmp_path, "mpeg2.dcm", to_mpeg2)
    with pytest.raises(DicomError, match=re.escape("mpeg2.dcm")) as err:
        read_dicom(path)
    assert "unsupported transfer syntax 1.2.840.10008.1.2.4.100" in str(err.value)
    assert "MPEG2" in str(err.value)


def test_not_a_dicom_and_missing_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(DicomError, match=re.escape("notes.txt")) as err:
        read_dicom(text)
    assert "not a DICOM file" in str(err.value)
    with pytest.raises(DicomError, match=re.escape("absent.dcm")) as err:
        read_dicom(tmp_path / "absent.dcm")
    assert "not found" in str(err.value)


def test_dicom_error_survives_pickling():
    err = pickle.loads(pickle.dumps(DicomError("/data/a.dcm", "file not found")))
    assert isinstance(err, DicomError) and err.path == "/data/a.dcm"
    assert str(err) == "/data/a.dcm: file not found"


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def synthetic_breast():
    img, inside = phantom(h=1000, w=760, cy=500, cx=0, ry=380, rx=330)
    return (img // 4).astype(np.uint16), inside  # 14-bit values


@pytest.mark.parametrize("monochrome1, j2k", [(False, False), (True, True)])
def test_read_dicom_end_to_end(tmp_path, synthetic_breast, monochrome1, j2k):
    img, inside = synthetic_breast
    path = write_mammogram(tmp_path / "mammo.dcm", img, monochrome1=monochrome1, j2k=j2k)
    out = read_dicom(path, long_side=400)
    assert isinstance(out, DecodedImage)
    assert out.pixels.dtype == np.uint16 and max(out.pixels.shape) <= 400
    assert out.pixels.flags["C_CONTIGUOUS"]
    assert (out.laterality, out.view) == ("R", "MLO")
    assert set(out.timings) == {"read", "decode", "process"}
    # Bright breast (left, touching the edge) over a dark background (top right).
    h, w = out.pixels.shape
    assert out.pixels[h // 2, : w // 4].mean() > 4 * out.pixels[: h // 20, -w // 10:].mean()
    # Cropped to the breast (+2 % margins), aspect ratio kept through the resize.
    y0, y1, x0, x1 = box_of(inside)
    box_h, box_w = min(1000, y1 + 20) - max(0, y0 - 20), min(760, x1 + 15) - max(0, x0 - 15)
    assert h == 400 and abs(w - 400 * box_w / box_h) <= 4, (w, box_w, box_h)


def test_monochrome1_and_2_give_the_same_image(tmp_path, synthetic_breast):
    img, _ = synthetic_breast
    m2 = read_dicom(write_mammogram(tmp_path / "m2.dcm", img), long_side=400).pixels
    m1 = read_dicom(write_mammogram(tmp_path / "m1.dcm", img, monochrome1=True),
                    long_side=400).pixels
    assert m1.shape == m2.shape
    assert np.abs(m1.astype(np.int64) - m2).max() <= 1


def test_sigmoid_window_end_to_end(tmp_path, synthetic_breast):
    img, _ = synthetic_breast
    path = write_mammogram(tmp_path / "sig.dcm", img, window=(7000, 4000, "SIGMOID"))
    windowed = read_dicom(path, voi="window", long_side=1000, crop=False).pixels
    plain = read_dicom(path, voi="none", long_side=1000, crop=False).pixels
    assert windowed.shape == plain.shape and not np.array_equal(windowed, plain)
    # Sigmoid is monotonic: the order of grey values is kept.
    order = np.argsort(plain.ravel(), kind="stable")
    assert np.all(np.diff(windowed.ravel()[order].astype(np.int64)) >= -1)


def test_errors_never_quote_header_values(tmp_path, synthetic_breast):
    img, _ = synthetic_breast
    path = write_mammogram(tmp_path / "phi.dcm", img[:64, :64])
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(DicomError, match=re.escape("phi.dcm")) as err:
        read_dicom(path)
    assert "Doe" not in str(err.value) and "SECRET" not in str(err.value)
    # Header values: laterality and view only; the rest is pixels and derived geometry.
    assert {f for f in DecodedImage.__dataclass_fields__} == {
        "pixels", "laterality", "view", "timings", "transform", "j2k_level"}
