"""Phantom mammograms whose pixels follow their labels (used by synthetic.py).

A breast silhouette against the chest wall (left edge for L, right edge for R;
MLO adds the pectoral muscle in the upper corner), fat plus fibroglandular
texture whose area and brightness grow with density, and optional lesions:
a mass whose size, outline and margin follow BI-RADS and the mass codes, and
calcification dots following the calcification codes. Everything is drawn from
the given rng in a fixed order, base image first, so two renders with the same
seed differ only where labels differ.
"""

from __future__ import annotations

import cv2
import numpy as np

MAX_VALUE = 4095  # 12 bits stored
BACKGROUND, FAT = 0.025, 0.30  # fractions of MAX_VALUE (MONOCHROME2: bright = dense)
GLAND_FRACTION = {1: 0.07, 2: 0.25, 3: 0.50, 4: 0.75, 5: 0.04}  # 5: normal male
GLAND_GAIN = {1: 0.16, 2: 0.20, 3: 0.24, 4: 0.28, 5: 0.14}
MASS_SIZE = {0: 0.035, 1: 0.03, 2: 0.025, 3: 0.035, 4: 0.05, 5: 0.065, 6: 0.07}  # radius / min(H, W)
MASS_GAIN = {"+": 0.42, "=": 0.32, "-": 0.22, "0": 0.30}
MASS_SHAPES = set("GROXQATNBFSVY")
ASYMMETRIES = set("TBFSVQ")  # fuzzy, low-contrast densities instead of a mass
EDGE = {"D": 0.04, "U": 0.25, "I": 0.30, "M": 0.08, "S": 0.12}  # margin blur / radius
CALC_TYPES = set("A9HFBIKPR")
CALC_DISTRIBUTIONS = set("GSRDLC")
CALC_SPREAD = {"C": 0.012, "G": 0.018, "R": 0.07}  # cluster sigma / min(H, W)


def render_mammogram(rng: np.random.Generator, *, height: int, width: int, density: int,
                     birads: int, laterality: str, view: str, mass: dict | None = None,
                     calcs: dict | None = None, return_rois: bool = False,
                     lesion_scale: float = 1.0, min_mass_radius: float = 0.0):
    """uint16 [height, width] image, MONOCHROME2 sense, values 0..4095.

    mass: {"shape": massshape code, "margin": massmargin code or None,
           "density": massdens code or None}; calcs: {"type": calcfind code,
    "distribution": calcdistri code, "number": count or None}. With return_rois,
    also the lesion boxes [(ymin, xmin, ymax, xmax), ...] in image pixels.
    lesion_scale multiplies the mass radius (1 = MASS_SIZE; see synthetic.generate);
    min_mass_radius (a fraction of min(height, width)) is a floor under it, so that a
    mass covers enough patches of a coarse model grid (synthetic.generate's localisation).
    """
    _check(height, width, density, birads, laterality, view, mass, calcs)
    if not 0.1 <= lesion_scale <= 10.0:
        raise ValueError(f"lesion_scale {lesion_scale!r} outside [0.1, 10]")
    if not 0.0 <= min_mass_radius <= 0.3:
        raise ValueError(f"min_mass_radius {min_mass_radius!r} outside [0, 0.3]")
    h, w = height, width
    img, tissue, thick = _base(rng, h, w, density, view)
    noise = rng.standard_normal((h, w), dtype=np.float32)  # detector noise
    noise *= 0.0015
    img += noise
    # --- lesions, drawn after everything the base image needs
    rois = []
    if mass is not None:
        rois.append(_add_mass(rng, img, tissue, thick, birads, mass, lesion_scale,
                              min_mass_radius))
    if calcs is not None:
        box = _add_calcs(rng, img, tissue, calcs)
        if box is not None:
            rois.append(box)
    img *= MAX_VALUE
    np.clip(img, 0, MAX_VALUE, out=img)
    out = (img + 0.5).astype(np.uint16)  # round half up; values are non-negative
    if laterality == "R":
        out = np.ascontiguousarray(out[:, ::-1])
        rois = [(y0, w - 1 - x1, y1, w - 1 - x0) for y0, x0, y1, x1 in rois]
    return (out, rois) if return_rois else out


def _base(rng: np.random.Generator, h: int, w: int, density: int, view: str):
    """Breast without lesions: (image, tissue mask without pectoral, thickness), full size.

    Everything here is smooth, so it is computed on a half-size grid and upsampled:
    4x less work, and the structure still scales with the image.
    """
    f = 2 if min(h, w) >= 256 else 1
    hs, ws = -(-h // f), -(-w // f)
    ys = np.arange(hs, dtype=np.float32)[:, None] * f
    xs = np.arange(ws, dtype=np.float32)[None, :] * f  # distance from the chest wall
    # silhouette: half-ellipse against the chest wall at x = 0 (flipped for R later)
    small = density == 5
    depth = w * rng.uniform(0.62, 0.85) * (0.6 if small else 1.0)
    if view == "MLO":
        half, cy = h * rng.uniform(0.44, 0.49), h * rng.uniform(0.50, 0.56)
    else:
        half, cy = h * rng.uniform(0.36, 0.44), h * rng.uniform(0.46, 0.54)
    half *= 0.7 if small else 1.0
    r = np.sqrt((xs / depth) ** 2 + ((ys - cy) / half) ** 2)
    thick = np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0))
    pect = np.zeros((hs, ws), bool)
    if view == "MLO":  # pectoral triangle, with tissue wrapping round it up to the axilla
        pw, ph = w * rng.uniform(0.22, 0.36), h * rng.uniform(0.45, 0.65)
        thick = np.maximum(thick, np.sqrt(np.clip(1.0 - xs / (1.5 * pw) - ys / (1.2 * ph), 0, 1)))
        pect = xs / pw + ys / ph < 1.0
    breast = thick > 0
    tissue = breast & ~pect
    # fibroglandular texture: smooth noise streaked towards the nipple, kept where it is
    # high and central; the kept fraction and its brightness grow with density.
    noise = _fractal_noise(rng, hs, ws)
    fine = _fractal_noise(rng, hs, ws, coarse=False)
    potential = noise - 1.6 * np.minimum(r, 1.3) ** 2
    level = np.quantile(potential[tissue], 1.0 - GLAND_FRACTION[density]) if tissue.any() else 0.0
    gland = 1.0 / (1.0 + np.exp((level - potential) / 0.15))
    img = FAT * (1.0 + 0.08 * fine) + GLAND_GAIN[density] * gland * (1.0 + 0.25 * fine)
    img *= 0.45 + 0.55 * np.sqrt(np.sqrt(thick))  # thinner towards the skin line
    if view == "MLO":
        img = np.where(pect, (0.55 + 0.03 * fine) * (0.8 + 0.2 * thick), img)
    img = np.where(breast, img, 0.0) + BACKGROUND
    full = (w, h)
    return (cv2.resize(img.astype(np.float32), full, interpolation=cv2.INTER_LINEAR),
            cv2.resize(tissue.astype(np.uint8), full, interpolation=cv2.INTER_NEAREST).astype(bool),
            cv2.resize(thick.astype(np.float32), full, interpolation=cv2.INTER_LINEAR))


def cview_of(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A synthesised-2D ("C-view") look-alike of a 2D image: smoother, other noise."""
    img = cv2.GaussianBlur(pixels.astype(np.float32), (0, 0), 1.2)
    img += rng.normal(0.0, 4.0, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, MAX_VALUE).astype(np.uint16)


def _check(height, width, density, birads, laterality, view, mass, calcs) -> None:
    if height < 32 or width < 32:
        raise ValueError(f"image size {height}x{width}: both sides must be >= 32")
    if density not in GLAND_FRACTION:
        raise ValueError(f"density {density!r} not in 1..5")
    if birads not in MASS_SIZE:
        raise ValueError(f"birads {birads!r} not in 0..6")
    if laterality not in ("L", "R"):
        raise ValueError(f"laterality {laterality!r} not L/R")
    if view not in ("CC", "MLO"):
        raise ValueError(f"view {view!r} not CC/MLO")
    if mass is not None and mass.get("shape") not in MASS_SHAPES:
        raise ValueError(f"mass shape code {mass.get('shape')!r} unknown")
    if calcs is not None and calcs.get("type") not in CALC_TYPES:
        raise ValueError(f"calcification type code {calcs.get('type')!r} unknown")
    if calcs is not None and calcs.get("distribution") not in CALC_DISTRIBUTIONS:
        raise ValueError(f"calcification distribution code {calcs.get('distribution')!r} unknown")


def _fractal_noise(rng: np.random.Generator, h: int, w: int, coarse: bool = True) -> np.ndarray:
    """Zero-mean, unit-variance smooth noise: upsampled white noise at several scales.

    Built from small grids, so the cost hardly grows with the image size and the
    structure scales with it. Cells are longer along x (streaks towards the nipple).
    """
    cells = (0.25, 0.12, 0.06, 0.03) if coarse else (0.015, 0.008)
    out = np.zeros((h, w), np.float32)
    m = min(h, w)
    for i, cell in enumerate(cells):
        size = max(cell * m, 2.0)
        grid = rng.standard_normal((int(h / size) + 2, int(w / (1.8 * size)) + 2), dtype=np.float32)
        out += (0.75 ** i) * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    out -= out.mean()
    return out / (out.std() + 1e-6)


def _pick_point(rng: np.random.Generator, inside: np.ndarray, margin: float) -> tuple[int, int]:
    """A random pixel inside the breast tissue, at least about `margin` px from its outline.

    Searched on a coarse copy of the mask (the cost would otherwise dominate big images).
    """
    k = max(1, min(inside.shape) // 128)
    coarse = np.ascontiguousarray(inside[::k, ::k]).astype(np.uint8)
    depth = cv2.distanceTransform(coarse, cv2.DIST_L2, 3)
    deep = depth > margin / k + 1
    ys, xs = np.nonzero(deep if deep.any() else coarse)
    if ys.size == 0:
        raise ValueError("no breast tissue to place a lesion in")
    i = int(rng.integers(0, ys.size))
    return int(ys[i]) * k + int(rng.integers(0, k)), int(xs[i]) * k + int(rng.integers(0, k))


def _add_mass(rng, img, tissue, thick, birads, mass, lesion_scale=1.0,
              min_radius=0.0) -> tuple[int, int, int, int]:
    """Add a mass (or asymmetry / distortion) in place; return its box."""
    h, w = img.shape
    scale = min(h, w) / 512.0
    shape, margin, dens = mass["shape"], mass.get("margin"), mass.get("density")
    radius = MASS_SIZE[birads] * min(h, w) * rng.uniform(0.8, 1.2) * lesion_scale
    radius = max(radius, min_radius * min(h, w))
    fuzzy = shape in ASYMMETRIES
    if fuzzy:
        radius *= 1.8
    cy, cx = _pick_point(rng, tissue, 0.6 * radius)
    reach = int(np.ceil(radius * (3.2 if margin == "S" or shape == "A" else 1.8)))
    y0, y1, x0, x1 = max(cy - reach, 0), min(cy + reach + 1, h), max(cx - reach, 0), min(cx + reach + 1, w)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    theta, turn = np.arctan2(dy, dx), rng.uniform(0, np.pi)
    u, v = dx * np.cos(turn) + dy * np.sin(turn), -dx * np.sin(turn) + dy * np.cos(turn)
    aspect = rng.uniform(1.35, 1.8) if shape in "ONY" else rng.uniform(1.1, 1.4) if shape in "XA" else 1.0
    rho = np.sqrt(u * u + (v * aspect) ** 2)
    bound = np.full_like(rho, radius)
    if shape in "XA":  # irregular outline: low angular harmonics
        for k in range(2, 6):
            amplitude = radius * rng.uniform(0.05, 0.14) / (k - 1) ** 0.5
            bound += amplitude * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    if margin == "M":  # microlobulated: small high harmonics
        bound += radius * 0.07 * np.cos(rng.integers(9, 13) * theta + rng.uniform(0, 2 * np.pi))
    edge = radius * (0.5 if fuzzy else EDGE.get(margin, 0.10))
    prof = 1.0 / (1.0 + np.exp(-(bound - rho) / edge))
    prof *= 0.75 + 0.25 * np.clip(1.0 - (rho / bound) ** 2, 0.0, 1.0)
    if dens == "0" or shape in "NY":  # fat-containing centre (e.g. lymph node hilum)
        prof *= 1.0 - 0.6 / (1.0 + np.exp(-(0.45 * bound - rho) / (0.08 * radius)))
    gain = 0.18 if fuzzy else MASS_GAIN.get(dens, 0.32)
    if shape == "A":  # distortion: spicules around a faint centre
        prof *= 0.35
    if margin == "S" or shape == "A":
        spikes = np.zeros_like(prof)
        width = max(0.9 * scale, 0.06 * radius)
        oy, ox = cy - y0, cx - x0  # centre in box coordinates
        for _ in range(int(rng.integers(8, 17))):
            phi, length = rng.uniform(0, 2 * np.pi), radius * rng.uniform(1.4, 3.0)
            c, s_ = np.float32(np.cos(phi)), np.float32(np.sin(phi))
            # only the spicule's own bounding box is evaluated
            pad = 3 * width
            ey, ex = length * s_, length * c  # spicule tip relative to the centre
            rows = slice(max(int(oy + min(0, ey) - pad), 0), max(int(oy + max(0, ey) + pad) + 1, 0))
            cols = slice(max(int(ox + min(0, ex) - pad), 0), max(int(ox + max(0, ex) + pad) + 1, 0))
            ddy, ddx = dy[rows], dx[:, cols]
            along = ddx * c + ddy * s_
            across = np.abs(ddy * c - ddx * s_)
            t = np.clip(along / length, 0.0, 1.0)
            line = np.exp(-(across / (width * (1.0 - 0.7 * t))) ** 2) * (1.0 - t)
            line[(along <= 0) | (along >= length)] = 0.0
            np.maximum(spikes[rows, cols], line, out=spikes[rows, cols])
        prof = np.maximum(prof, 0.8 * spikes)
    img[y0:y1, x0:x1] += gain * prof * (0.6 + 0.4 * thick[y0:y1, x0:x1])
    ys, xs = np.nonzero(prof > 0.1)
    return (y0 + int(ys.min()), x0 + int(xs.min()), y0 + int(ys.max()), x0 + int(xs.max()))


def _add_calcs(rng, img, tissue, calcs) -> tuple[int, int, int, int] | None:
    """Add calcification dots in place; return their box (None when diffuse)."""
    h, w = img.shape
    kind, dist = calcs["type"], calcs["distribution"]
    m = min(h, w)
    scale = m / 512.0
    n = int(calcs.get("number") or rng.integers(5, 16))
    cy, cx = _pick_point(rng, tissue, 0.05 * m)
    if dist == "D":
        ys_in, xs_in = np.nonzero(tissue)
        pick = rng.integers(0, ys_in.size, n)
        pts = np.stack([ys_in[pick], xs_in[pick]], 1).astype(np.float32)
    elif dist == "S":  # segmental: elongated along the ducts (towards the nipple)
        pts = rng.normal(0, 1, (n, 2)) * (0.025 * m, 0.09 * m) + (cy, cx)
    elif dist == "L":
        along, turn = rng.uniform(-0.05 * m, 0.05 * m, n), rng.uniform(0, np.pi)
        pts = np.stack([along * np.sin(turn), along * np.cos(turn)], 1) + (cy, cx)
        pts += rng.normal(0, 0.004 * m, (n, 2))
    else:
        pts = rng.normal(0, CALC_SPREAD[dist] * m, (n, 2)) + (cy, cx)
    if kind in "FB":  # fine linear (branching): each calcification is a short chain of dots
        steps = rng.uniform(0, 2 * np.pi, len(pts))
        chain = [pts + k * 1.6 * scale * np.stack([np.sin(steps), np.cos(steps)], 1) for k in range(4)]
        pts = np.concatenate(chain)
    sigma = {"P": 0.7, "A": 0.6, "H": 1.6, "9": 2.0, "R": 1.8}.get(kind, 0.0) * scale
    sigmas = rng.uniform(0.6, 1.5, len(pts)) * scale if sigma == 0 else np.full(len(pts), sigma)
    amp = {"A": 0.12, "H": 0.5, "9": 0.5, "R": 0.5}.get(kind, 0.42)
    yi, xi = np.rint(pts[:, 0]).astype(int), np.rint(pts[:, 1]).astype(int)
    ok = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
    ok[ok] = tissue[yi[ok], xi[ok]]
    yi, xi, sigmas = yi[ok], xi[ok], sigmas[ok]
    if yi.size == 0:
        return None
    pad = int(np.ceil(4 * sigmas.max())) + 1
    y0, x0 = max(int(yi.min()) - pad, 0), max(int(xi.min()) - pad, 0)
    y1, x1 = min(int(yi.max()) + pad + 1, h), min(int(xi.max()) + pad + 1, w)
    for lo, hi in ((0, 1.0), (1.0, 1.7), (1.7, np.inf)):  # blur impulses in three size bands
        sel = (sigmas / scale >= lo) & (sigmas / scale < hi)
        if sel.any():
            s = max(float(sigmas[sel].mean()), 0.5)  # at least a visible dot on small images
            k = 2 * int(np.ceil(3 * s)) + 1
            peak = float(cv2.getGaussianKernel(k, s, cv2.CV_32F)[k // 2, 0]) ** 2
            impulses = np.zeros((y1 - y0, x1 - x0), np.float32)
            np.add.at(impulses, (yi[sel] - y0, xi[sel] - x0), amp / peak)  # a lone dot peaks at amp
            img[y0:y1, x0:x1] += cv2.GaussianBlur(impulses, (k, k), s, borderType=cv2.BORDER_CONSTANT)
    if dist == "D":
        return None
    pad = int(np.ceil(3 * sigmas.max()))
    return (max(int(yi.min()) - pad, 0), max(int(xi.min()) - pad, 0),
            min(int(yi.max()) + pad, h - 1), min(int(xi.max()) + pad, w - 1))
