"""Image transforms: eval geometry (aspect kept, D9) and the SimCLR-style train views."""

import dataclasses

import numpy as np
import pytest

from mama_jax.input import augment, pipeline

S = 56


def Aug(**overrides):
    """The pipeline's own config; augment only reads its augmentation fields."""
    return pipeline.DataConfig(dataset_dir="", **overrides)


# Full canvas, no randomness left: train must reduce to the eval geometry.
PLAIN = Aug(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, vflip=0.0,
            jitter_prob=0.0, blur_prob=0.0)


def _noise(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 65536, shape).astype(np.uint16)


def _bbox(mask):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def test_eval_shape_dtype_range_and_padding():
    out = augment.eval_transform(_noise((120, 64)), S)
    assert out.shape == (S, S, 3) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    # 120x64 -> 56x30 centred: 13 padded columns left, 13 right, at -1 (black).
    assert augment.canvas_layout(120, 64, S) == (56, 30, 0, 13)
    assert np.all(out[:, :13] == -1.0) and np.all(out[:, 43:] == -1.0)


@pytest.mark.parametrize("shape,rect", [((300, 200), (60, 240, 50, 150)),    # tall block
                                        ((100, 400), (20, 80, 100, 300))])   # wide image
def test_eval_keeps_aspect_ratio(shape, rect):
    image = np.zeros(shape, np.uint16)
    r0, r1, c0, c1 = rect
    image[r0:r1, c0:c1] = 65535
    out = augment.eval_transform(image, S)[..., 0]
    top, bottom, left, right = _bbox(out > 0.0)  # over half bright
    k = S / max(shape)
    assert abs((bottom - top) - (r1 - r0) * k) <= 1.5
    assert abs((right - left) - (c1 - c0) * k) <= 1.5
    # The white block sits where the centred, unstretched layout puts it.
    _, _, off_y, off_x = augment.canvas_layout(*shape, S)
    assert abs(top - (off_y + r0 * k)) <= 1.0 and abs(left - (off_x + c0 * k)) <= 1.0


def test_eval_whole_image_is_a_rectangle_of_the_right_proportions():
    out = augment.eval_transform(np.full((200, 80), 65535, np.uint16), S)[..., 0]
    top, bottom, left, right = _bbox(out > -1.0)
    assert (bottom - top, right - left) == (56, 22)
    assert np.all(out[top:bottom, left:right] == 1.0)


def test_eval_upscales_small_images():
    out = augment.eval_transform(np.full((20, 10), 65535, np.uint16), S)[..., 0]
    assert _bbox(out > 0)[1] - _bbox(out > 0)[0] == S


def test_bad_images_are_rejected():
    with pytest.raises(ValueError, match="uint16"):
        augment.eval_transform(np.zeros((10, 10), np.float32), S)
    with pytest.raises(ValueError, match="2-D"):
        augment.train_transform(np.zeros((10, 10, 3), np.uint16), S, np.random.default_rng(0), Aug())
    with pytest.raises(ValueError, match="image_size"):
        augment.eval_transform(np.zeros((10, 10), np.uint16), 0)


def test_train_view_shape_range_and_determinism():
    image = _noise((112, 80))
    a = augment.train_transform(image, S, np.random.default_rng(7), Aug())
    b = augment.train_transform(image, S, np.random.default_rng(7), Aug())
    c = augment.train_transform(image, S, np.random.default_rng(8), Aug())
    assert a.shape == (S, S, 3) and a.dtype == np.float32
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("shape", [(112, 72), (168, 99)])  # shrink by exactly 2 and 3
def test_full_canvas_train_view_equals_eval_view(shape):
    image = _noise(shape)
    train = augment.train_transform(image, S, np.random.default_rng(0), PLAIN)
    np.testing.assert_allclose(train, augment.eval_transform(image, S), atol=1e-4)


def test_large_shrink_is_area_filtered_not_point_sampled():
    # Shrinking noise ~4x: an area filter averages ~16 pixels per output pixel, plain
    # bilinear sampling only 2-4, which would leave the view much noisier than eval's.
    image = _noise((224, 150))
    train = augment.train_transform(image, S, np.random.default_rng(0), PLAIN)[..., 0]
    ref = augment.eval_transform(image, S)[..., 0]
    inside = ref > -1.0
    assert 0.8 < train[inside].std() / ref[inside].std() < 1.2
    assert np.abs(train - ref)[inside].mean() < 0.1


@pytest.mark.parametrize("flip,axis", [("hflip", 1), ("vflip", 0)])
def test_flips_flip(flip, axis):
    image = _noise((90, 70), seed=3)
    base = augment.train_transform(image, S, np.random.default_rng(1), PLAIN)
    flipped = augment.train_transform(image, S, np.random.default_rng(1),
                                      dataclasses.replace(PLAIN, **{flip: 1.0}))
    assert not np.allclose(base, flipped, atol=0.05)
    np.testing.assert_allclose(flipped, np.flip(base, axis=axis), atol=2e-3)


def _high_frequency_energy(x):
    return float(np.mean(np.diff(x, axis=0) ** 2) + np.mean(np.diff(x, axis=1) ** 2))


def test_blur_reduces_high_frequency_energy():
    image = _noise((S, S), seed=5)
    sharp_cfg = dataclasses.replace(PLAIN, blur_prob=0.0, blur_sigma=(1.5, 2.0))
    blur_cfg = dataclasses.replace(sharp_cfg, blur_prob=1.0)
    for seed in range(3):
        sharp = augment.train_transform(image, S, np.random.default_rng(seed), sharp_cfg)[..., 0]
        blurred = augment.train_transform(image, S, np.random.default_rng(seed), blur_cfg)[..., 0]
        assert _high_frequency_energy(blurred) < 0.2 * _high_frequency_energy(sharp)
        assert abs(blurred.mean() - sharp.mean()) < 0.02  # blur moves no mass


def test_jitter_changes_intensity_within_range():
    image = np.full((S, S), 30000, np.uint16)
    cfg = dataclasses.replace(PLAIN, jitter_prob=1.0)
    means = [augment.train_transform(image, S, np.random.default_rng(s), cfg).mean() for s in range(20)]
    plain = augment.eval_transform(image, S).mean()
    assert np.ptp(means) > 0.3 and any(abs(m - plain) > 0.1 for m in means)
    out = augment.train_transform(_noise((S, S)), S, np.random.default_rng(0), cfg)
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_random_resized_crop_box_follows_scale_and_ratio():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(500):
        top, left, h, w = augment.random_resized_crop_box(rng, 100, (0.2, 0.6), (0.5, 2.0))
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 100
        areas.append(h * w / 1e4)
        ratios.append(w / h)
    assert 0.18 <= min(areas) and max(areas) <= 0.63
    assert 0.45 <= min(ratios) and max(ratios) <= 2.2
    assert np.std(areas) > 0.05  # really random
    # No box can meet ratio 3..4 at scale 1: torchvision's fallback, ratio clamped.
    assert augment.random_resized_crop_box(rng, 90, (1.0, 1.0), (3.0, 4.0)) == (30, 0, 30, 90)


def test_small_crops_sample_the_stored_resolution():
    # Columns alternate 0 / max in the stored image (long side 2S): the eval canvas
    # averages them to flat grey, a 10% crop taken from the stored pixels still shows them.
    image = np.zeros((2 * S, 2 * S), np.uint16)
    image[:, ::2] = 65535
    assert augment.eval_transform(image, S).std() < 0.01
    cfg = dataclasses.replace(PLAIN, crop_scale=(0.1, 0.1))
    crop = augment.train_transform(image, S, np.random.default_rng(0), cfg)[..., 0]
    assert crop.std() > 0.3
    assert np.abs(np.diff(crop, axis=0)).max() < 1e-3  # rows stay identical: no stray sampling


def test_crop_inside_the_padding_is_black():
    image = np.full((2 * S, 6), 65535, np.uint16)  # a thin strip in the middle of the canvas
    out = augment._warp_crop(image, (0, 0, 10, 10), S, False, False)  # top-left corner: padding
    assert out.shape == (S, S) and np.all(out == 0.0)
