"""data_prep.geometry: breast crop, long-side resize, the transform and lesion boxes carried through it."""

import numpy as np
import pytest

from data_prep import geometry, schema
from data_prep.synthetic_render import render_mammogram
from tests.data_prep.phantoms import box_of, phantom


def test_map_box_scales_edges_and_rounds_outwards():
    t = geometry.CropResize(crop=(10, 110, 20, 70), height=50, width=25)  # scale 0.5 both ways
    assert t.map_box((10, 20, 110, 70)) == (0, 0, 50, 25)        # the whole crop
    assert t.map_box((30, 40, 50, 60)) == (10, 10, 20, 20)       # exact halves
    assert t.map_box((31, 41, 32, 42)) == (10, 10, 11, 11)       # a pixel stays a pixel
    assert t.map_box((0, 0, 20, 30)) == (0, 0, 5, 5)             # clipped to the crop
    assert t.map_box((0, 0, 10, 20)) is None                     # outside the crop
    assert t.map_box((200, 0, 300, 30)) is None


def test_crop_and_resize_matches_the_two_steps_and_reports_them():
    img = np.zeros((400, 300), np.uint16)
    img[50:350, 0:200] = 30000
    pixels, t = geometry.crop_and_resize(img, 100)
    cropped, box = geometry.crop_breast(img)
    np.testing.assert_array_equal(pixels, geometry.resize_long_side(cropped, 100))
    assert t.crop == box and (t.height, t.width) == pixels.shape
    whole, t = geometry.crop_and_resize(img, 1000, crop=False)
    assert whole.shape == img.shape and t.crop == (0, 400, 0, 300)


@pytest.mark.parametrize("laterality", ["L", "R"])
def test_a_mass_box_lands_on_the_mass_in_the_stored_image(laterality):
    rng = np.random.default_rng(4)
    mass = {"shape": "R", "margin": "D", "density": "+"}
    img, rois = render_mammogram(rng, height=640, width=512, density=2, birads=5,
                                 laterality=laterality, view="CC", mass=mass, return_rois=True)
    y0, x0, y1, x1 = rois[0]                       # inclusive, source pixels
    pixels, t = geometry.crop_and_resize(img, 160)
    assert t.crop != (0, 640, 0, 512)              # the crop really moved the origin
    by0, bx0, by1, bx1 = t.map_box((y0, x0, y1 + 1, x1 + 1))
    # Re-derivation from the recorded crop and the stored size.
    sy = pixels.shape[0] / (t.crop[1] - t.crop[0])
    sx = pixels.shape[1] / (t.crop[3] - t.crop[2])
    assert abs(by0 - (y0 - t.crop[0]) * sy) <= 1 and abs(bx1 - (x1 + 1 - t.crop[2]) * sx) <= 1
    # The brightest smoothed spot of the stored image is the mass, inside the box...
    inside = pixels[by0:by1, bx0:bx1].astype(np.float64)
    ring = pixels[max(by0 - 6, 0):by1 + 6, max(bx0 - 6, 0):bx1 + 6].astype(np.float64)
    ring_mean = (ring.sum() - inside.sum()) / (ring.size - inside.size)
    assert inside.mean() > 1.15 * ring_mean
    # ...and a box shifted by its own size sits on plainer tissue.
    h = by1 - by0
    shifted = pixels[by0 + h:by1 + h, bx0:bx1] if by1 + h <= pixels.shape[0] else \
        pixels[by0 - h:by1 - h, bx0:bx1]
    assert inside.mean() > shifted.mean()


def test_boxes_text_round_trip_and_errors():
    boxes = [(1, 2, 3, 4), (10, 0, 12, 9)]
    assert schema.format_boxes(boxes) == "1,2,3,4;10,0,12,9"
    assert schema.parse_boxes("1,2,3,4;10,0,12,9") == boxes
    assert schema.parse_boxes("") == [] and schema.format_boxes([]) == ""
    for bad in ("1,2,3", "1,2,a,4", "5,2,3,4", "1,2,3,2", "-1,0,2,2"):
        with pytest.raises(ValueError, match="roi_boxes"):
            schema.parse_boxes(bad)
    row = schema.empty_row()
    row.update(split="train", dicom_path="x", roi_boxes="3,3,1,1")
    with pytest.raises(ValueError, match="roi_boxes"):
        schema.validate_row(row)


# ----------------------------------------------------------------------------- crop and resize

@pytest.mark.parametrize("cx", [400, 0])  # free-standing, and touching the chest-wall edge
def test_crop_breast_finds_ellipse(cx):
    img, inside = phantom(cx=cx)
    cropped, (y0, y1, x0, x1) = geometry.crop_breast(img, margin=0.02)
    by0, by1, bx0, bx1 = box_of(inside)
    my, mx = round(0.02 * 1200), round(0.02 * 900)
    want = (max(0, by0 - my), min(1200, by1 + my), max(0, bx0 - mx), min(900, bx1 + mx))
    assert np.abs(np.array((y0, y1, x0, x1)) - np.array(want)).max() <= 6, ((y0, y1, x0, x1), want)
    np.testing.assert_array_equal(cropped, img[y0:y1, x0:x1])


def test_crop_breast_keeps_whole_image_when_nothing_found():
    flat = np.full((300, 200), 1234, np.uint16)
    cropped, box = geometry.crop_breast(flat)
    assert box == (0, 300, 0, 200) and cropped.shape == flat.shape
    with pytest.raises(ValueError, match="2-D"):
        geometry.crop_breast(np.zeros((4, 4, 3), np.uint16))


@pytest.mark.parametrize("shape, want", [((3000, 2000), (1036, 691)), ((2000, 3000), (691, 1036))])
def test_resize_long_side_keeps_aspect(shape, want):
    out = geometry.resize_long_side(np.zeros(shape, np.uint16), 1036)
    assert out.shape == want and out.dtype == np.uint16
    assert abs(out.shape[0] / out.shape[1] - shape[0] / shape[1]) < 0.01


def test_resize_long_side_is_area_mean_and_never_upscales():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 60000, (64, 48)).astype(np.uint16)
    out = geometry.resize_long_side(img, 32)  # exact factor 2: area = 2x2 block mean
    want = img.astype(np.float64).reshape(32, 2, 24, 2).mean(axis=(1, 3))
    assert out.shape == (32, 24)
    assert np.abs(out - want).max() <= 0.5 + 1e-9
    assert geometry.resize_long_side(img, 64) is img and geometry.resize_long_side(img, 500) is img
    with pytest.raises(ValueError, match="long_side"):
        geometry.resize_long_side(img, 0)
