"""How strongly a sentence-to-patch map lights up a record's lesion boxes (the maps job's
lift and pointing-game scores; mama_jax/evaluate/maps.py draws the maps)."""

from __future__ import annotations

import math

import cv2
import numpy as np

from data_prep import schema  # the record contract: roi_boxes
from mama_jax.input.augment import canvas_layout
from mama_jax.input.study_index import record_text


def upsample(sim_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """The patch-grid map bilinearly upsampled to [height, width] (as drawn)."""
    sim_map = np.asarray(sim_map, np.float32)
    if sim_map.ndim != 2:
        raise ValueError(f"sim_map must be 2-D [gh, gw], got shape {sim_map.shape}")
    return cv2.resize(sim_map, (width, height), interpolation=cv2.INTER_LINEAR)


def record_boxes(record) -> list[tuple[int, int, int, int]]:
    """The record's lesion boxes (y0, x0, y1, x1) in stored-image pixels, y1/x1 exclusive.

    [] when it has none, or when the dataset was built before records carried roi_boxes.
    """
    text = record_text(record["roi_boxes"]).strip() if "roi_boxes" in record else ""
    return schema.parse_boxes(text, where=f"record field roi_boxes {text!r}")


def canvas_boxes(boxes, image_shape: tuple[int, int], size: int) -> list[tuple[int, int, int, int]]:
    """Stored-image boxes -> boxes on the size x size eval canvas (eval_geometry's layout),
    rounded outwards."""
    h, w, top, left = canvas_layout(int(image_shape[0]), int(image_shape[1]), size)
    sy, sx = h / image_shape[0], w / image_shape[1]
    return [(top + math.floor(y0 * sy), left + math.floor(x0 * sx),
             top + min(h, math.ceil(y1 * sy)), left + min(w, math.ceil(x1 * sx)))
            for y0, x0, y1, x1 in boxes]


def breast_mask(canvas01: np.ndarray) -> np.ndarray:
    """Breast pixels of an eval canvas (float [S, S] in [0, 1]): Otsu's threshold, which
    splits tissue from the dark background and padding."""
    u8 = np.clip(np.asarray(canvas01, np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)
    if u8.min() == u8.max():
        return np.ones(u8.shape, bool)
    _, mask = cv2.threshold(u8, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return mask.astype(bool)


def _cell_means(mask: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """Fraction of each patch cell covered by `mask` (cells split the canvas evenly)."""
    ys = np.round(np.linspace(0, mask.shape[0], gh + 1)).astype(int)
    xs = np.round(np.linspace(0, mask.shape[1], gw + 1)).astype(int)
    return np.array([[mask[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean() for j in range(gw)]
                     for i in range(gh)], np.float64)


def roi_scores(sim_map: np.ndarray, breast: np.ndarray, boxes) -> dict | None:
    """How strongly a map lights up the lesion boxes (None when no box reaches the breast).

    sim_map: patch cosines [gh, gw] over a square canvas; breast: bool [R, R] breast mask
    of that canvas; boxes: (y0, x0, y1, x1) canvas pixels, taken together (ROIs are not
    typed, so a mass and a calcification box of one image count as one lesion area) and
    cut to the breast: a box reaching past the skin line must not score the background.
      lift         mean heat in the boxes / mean heat over the breast, heat = the map
                   upsampled as drawn and min-max normalised over the breast; 1 = no
                   preference, above 1 = the lesion is lit.
      peak_rank    rank of the hottest box cell (a cell at least half breast that the cut
                   boxes touch) among it and the breast's other cells (also at least half
                   breast); 1 = the map's peak is on the lesion.
      peak_percentile  % of those other patches colder than that patch.
      hit          peak_rank == 1 (the pointing game); chance_hit is its rate for a map
                   of random values: box patches / all competing patches.
    """
    sim_map = np.asarray(sim_map, np.float32)
    breast = np.asarray(breast, bool)
    if not breast.any():
        breast = np.ones_like(breast)
    region = np.zeros(breast.shape, bool)
    for y0, x0, y1, x1 in boxes:
        region[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    region &= breast
    if not region.any():
        return None
    up = upsample(sim_map, *breast.shape)
    lo, hi = float(up[breast].min()), float(up[breast].max())
    heat = np.clip((up - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.ones_like(up)
    lift = float(heat[region].mean() / max(float(heat[breast].mean()), 1e-12))

    gh, gw = sim_map.shape
    # Competing cells are those at least half breast, box cells too where there are
    # any (a cell that is mostly background scores the background).
    breast_cells = _cell_means(breast, gh, gw) >= 0.5
    touched = _cell_means(region, gh, gw) > 0
    in_box = touched & breast_cells
    if not in_box.any():
        in_box = touched
    others = breast_cells & ~in_box
    peak = float(sim_map[in_box].max())
    rest = sim_map[others]
    rank = 1 + int((rest > peak).sum())
    return {"lift": lift, "peak_rank": rank,
            "peak_percentile": float(100.0 * (rest < peak).mean()) if rest.size else 100.0,
            "hit": rank == 1, "chance_hit": float(in_box.sum() / (in_box.sum() + others.sum())),
            "box_fraction": float(region.sum() / breast.sum())}


def summarise_scores(scores: list[dict]) -> dict:
    """Per query: n, mean and median lift, pointing-game hit rate (and its chance level),
    mean peak percentile."""
    out = {}
    for query in dict.fromkeys(s["query"] for s in scores):
        rows = [s for s in scores if s["query"] == query]
        lift = np.array([r["lift"] for r in rows])
        out[query] = {"n": len(rows), "mean_lift": float(lift.mean()),
                      "median_lift": float(np.median(lift)),
                      "hit_rate": float(np.mean([r["hit"] for r in rows])),
                      "chance_hit_rate": float(np.mean([r["chance_hit"] for r in rows])),
                      "mean_peak_percentile": float(np.mean([r["peak_percentile"] for r in rows]))}
    return out
