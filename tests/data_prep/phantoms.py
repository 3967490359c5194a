"""A breast-like test image with a known outline (shared by the geometry and DICOM tests)."""

import numpy as np


def phantom(h=1200, w=900, cy=600, cx=400, ry=400, rx=300, seed=0):
    """Dark noisy background, bright textured ellipse, and a small bright marker."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    img = rng.normal(800, 100, (h, w))
    img[inside] = 30000 + 8000 * np.sin(xx[inside] / 9.0) * np.cos(yy[inside] / 13.0)
    img[40:60, w - 60:w - 40] = 60000  # a lead marker: must not widen the box
    return np.clip(img, 0, 65535).astype(np.uint16), inside


def box_of(mask):
    ys, xs = np.nonzero(mask)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
