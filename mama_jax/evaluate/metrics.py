"""Classification metrics of the paper (§4.2, spec §4.3): accuracy, balanced accuracy,
AUC (binary: class-1 probability; multi-class: macro one-vs-rest), confusion matrix,
and at C == 2 sensitivity / specificity / PPV / NPV / F1 at the argmax; plus a
percentile bootstrap over images.

Point estimates come from sklearn. The bootstrap evaluates the same definitions on
resample *counts* with vectorised numpy (a resample is a weighting of the original
images), so 1000 resamples of a 7k-image test set take seconds, not minutes.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score

BINARY_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1")
SCALAR_METRICS = ("accuracy", "balanced_accuracy", "auc") + BINARY_METRICS
ALIASES = {"bacc": "balanced_accuracy", "acc": "accuracy"}
_ROW_SUM_TOL = 1e-3  # float32 softmax rows sum to 1 within ~1e-6; anything further is not probabilities


def _check_inputs(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D [N]; got shape {y.shape}")
    if y.size == 0:
        raise ValueError("empty input: y_true has no images")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise ValueError(f"y_true must hold integer class indices; got dtype {y.dtype}")
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be [N, C] with N = len(y_true); got probs shape {p.shape} "
                         f"for y_true shape {y.shape}")
    if p.shape[1] < 2:
        raise ValueError(f"probs must have at least 2 classes; got shape {p.shape}")
    y = y.astype(np.int64)
    p = p.astype(np.float64)
    unknown = int((y == -1).sum())
    if unknown:
        raise ValueError(f"y_true holds {unknown} unknown labels (-1): filter them out before "
                         "computing metrics")
    bad = (y < 0) | (y >= p.shape[1])
    if bad.any():
        raise ValueError(f"y_true holds labels outside 0..{p.shape[1] - 1} (probs shape {p.shape}): "
                         f"{sorted(set(y[bad].tolist()))[:10]}")
    if not np.isfinite(p).all():
        raise ValueError("probs holds NaN or inf")
    if (p < 0).any() or np.abs(p.sum(1) - 1.0).max() > _ROW_SUM_TOL:
        raise ValueError(f"probs rows must be probabilities summing to 1; row sums span "
                         f"[{p.sum(1).min():.4g}, {p.sum(1).max():.4g}], min entry {p.min():.4g}")
    return y, p


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def summary(y_true, probs, *, class_names=None) -> dict:
    """All metrics of one prediction set; undefined ones are NaN with a reason in `warnings`."""
    y, p = _check_inputs(y_true, probs)
    n, num_classes = p.shape
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
    pred = p.argmax(1)
    cm = confusion_matrix(y, pred, labels=np.arange(num_classes))
    support = cm.sum(1)
    present = np.flatnonzero(support > 0)
    recall = [_ratio(cm[c, c], support[c]) for c in range(num_classes)]
    warnings = []
    absent = [c for c in range(num_classes) if support[c] == 0]
    if absent:
        warnings.append(f"classes absent from y_true: {absent}; balanced accuracy and AUC "
                        f"average over the {len(present)} present classes")

    per_class_auc = [float("nan")] * num_classes
    if len(present) < 2:
        auc = float("nan")
        warnings.append(f"AUC undefined: only one class in y_true (class {int(present[0])})")
    elif num_classes == 2:
        auc = float(roc_auc_score(y, p[:, 1]))
        per_class_auc = [auc, auc]
    else:
        for c in present:
            per_class_auc[c] = float(roc_auc_score(y == c, p[:, c]))
        auc = float(np.mean([per_class_auc[c] for c in present]))

    out = {
        "n": int(n),
        "num_classes": int(num_classes),
        "accuracy": float(np.trace(cm) / n),
        "balanced_accuracy": float(np.mean([recall[c] for c in present])),
        "auc": auc,
        "per_class_recall": recall,
        "per_class_auc": per_class_auc,
        "support": support.tolist(),
        "confusion": cm.tolist(),  # rows: true class, columns: predicted class
        "warnings": warnings,
    }
    if class_names is not None:
        out["class_names"] = list(class_names)
    if num_classes == 2:
        tn, fp, fn, tp = (int(v) for v in cm.ravel())
        out.update(sensitivity=_ratio(tp, tp + fn), specificity=_ratio(tn, tn + fp),
                   ppv=_ratio(tp, tp + fp), npv=_ratio(tn, tn + fn),
                   f1=_ratio(2 * tp, 2 * tp + fp + fn))
    return out


# ----------------------------------------------------------------------------- bootstrap


def _bootstrap_indices(n: int, n_boot: int, seed: int):
    """Resampled image indices in chunks [b, n] (bounded memory), deterministic per seed."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, 2_000_000 // n))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        yield rng.integers(0, n, size=(b, n))
        done += b


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """[b, n] resample indices -> [b, n] multiplicity of each image in each resample."""
    b = idx.shape[0]
    flat = (idx + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def _weighted_auc(is_pos: np.ndarray, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC (ties count 1/2, as sklearn's trapezoid) per row of weights w [b, n]."""
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # tie groups of equal scores
    ws = w[:, order]
    pos = is_pos[order]
    gp = np.add.reduceat(ws * pos, starts, axis=1)
    gn = np.add.reduceat(ws * ~pos, starts, axis=1)
    below = np.cumsum(gn, axis=1) - gn
    num = (gp * (below + 0.5 * gn)).sum(1)
    den = gp.sum(1) * gn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _weighted_metric(metric: str, y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """`metric` on each resample given by weights w [b, n]; NaN where undefined."""
    num_classes = p.shape[1]
    if metric == "auc":
        if num_classes == 2:
            return _weighted_auc(y == 1, p[:, 1], w)
        per_class = np.stack([_weighted_auc(y == c, p[:, c], w) for c in range(num_classes)], 1)
        defined = np.isfinite(per_class)
        count = defined.sum(1)
        total = np.where(defined, per_class, 0.0).sum(1)
        # macro over the classes present in the resample; one present class leaves none defined
        return np.where(count >= 2, total / np.maximum(count, 1), np.nan)

    pred = p.argmax(1)
    cells = np.zeros((y.shape[0], num_classes * num_classes))
    cells[np.arange(y.shape[0]), y * num_classes + pred] = 1.0
    cm = (w @ cells).reshape(-1, num_classes, num_classes)
    diag = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(2)
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "accuracy":
            return diag.sum(1) / cm.sum((1, 2))
        if metric == "balanced_accuracy":
            recall = np.where(support > 0, diag / np.maximum(support, 1e-300), 0.0)
            return recall.sum(1) / (support > 0).sum(1)
        tn, fp, fn, tp = cm[:, 0, 0], cm[:, 0, 1], cm[:, 1, 0], cm[:, 1, 1]
        num, den = {"sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp),
                    "ppv": (tp, tp + fp), "npv": (tn, tn + fn),
                    "f1": (2 * tp, 2 * tp + fp + fn)}[metric]
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_ci(y_true, probs, metric: str, *, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of `metric`, resampling images with
    replacement; resamples where the metric is undefined (e.g. one class) are skipped.
    (NaN, NaN) when no resample defines it."""
    metric = ALIASES.get(metric, metric)
    y, p = _check_inputs(y_true, probs)
    if metric not in SCALAR_METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(SCALAR_METRICS)} "
                         f"(aliases {', '.join(ALIASES)})")
    if metric in BINARY_METRICS and p.shape[1] != 2:
        raise ValueError(f"metric {metric!r} needs 2 classes; probs shape {p.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    n = y.shape[0]
    values = np.concatenate([_weighted_metric(metric, y, p, _counts(idx, n))
                             for idx in _bootstrap_indices(n, n_boot, seed)])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def json_safe(x):
    """Results -> strict JSON values: numpy -> Python, tuples -> lists, NaN/inf -> null
    (e.g. the AUC of a split where one class is present)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
