"""Figures of the evaluation report: confusion matrices, ROC curves, loss curves (PNG)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LOSS_TERMS = ("total", "vt_1", "vt_2", "vv", "local")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def confusion_png(confusion, class_names, path: str, title: str) -> str:
    cm = np.asarray(confusion, np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"{title}: confusion matrix must be square, got shape {cm.shape}")
    names = list(class_names) if class_names and len(class_names) == len(cm) else \
        [str(i) for i in range(len(cm))]
    recall = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = 2.5 + 0.6 * len(cm)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(cm)):
        for j in range(len(cm)):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if recall[i, j] > 0.5 else "black", fontsize=8)
    short = [n if len(n) <= 18 else n[:16] + "…" for n in names]
    ax.set_xticks(range(len(cm)), short, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(cm)), short, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="row fraction (recall)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def roc_png(labels, probs, class_names, path: str, title: str) -> str | None:
    """ROC curves (binary: class 1; else one-vs-rest per present class); None if undefined."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
    if probs.ndim != 2 or len(labels) != len(probs):
        raise ValueError(f"{title}: probs {probs.shape} do not match labels {labels.shape}")
    keep = labels >= 0
    labels, probs = labels[keep], probs[keep]
    classes = [1] if probs.shape[1] == 2 else list(range(probs.shape[1]))
    curves = [c for c in classes if 0 < (labels == c).sum() < len(labels)]
    if not curves:
        return None
    names = list(class_names) if class_names else [str(c) for c in range(probs.shape[1])]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for c in curves:
        fpr, tpr, _ = roc_curve(labels == c, probs[:, c])
        auc = roc_auc_score(labels == c, probs[:, c])
        ax.plot(fpr, tpr, label=f"{names[c][:24]} (AUC {100 * auc:.1f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def loss_png(rows: dict[int, dict], path: str) -> str | None:
    steps = sorted(rows)
    terms = [t for t in LOSS_TERMS if any(t in rows[s] for s in steps)]
    if not terms:
        return None
    scales = [t for t in ("logit_scale", "local_scale") if any(t in rows[s] for s in steps)]
    fig, axes = plt.subplots(1, 2 if scales else 1, figsize=(10 if scales else 5.5, 4), squeeze=False)
    for t in terms:
        xs = [s for s in steps if _finite(rows[s].get(t))]
        axes[0, 0].plot(xs, [rows[s][t] for s in xs], label=t)
    axes[0, 0].set_xlabel("step")
    axes[0, 0].set_ylabel("loss")
    axes[0, 0].set_title("pretraining losses")
    axes[0, 0].legend(fontsize=8)
    for t in scales:  # logged as log-temperatures; the similarity multiplier is exp()
        xs = [s for s in steps if _finite(rows[s].get(t))]
        axes[0, 1].plot(xs, [math.exp(rows[s][t]) for s in xs], label=f"exp({t})")
    if scales:
        axes[0, 1].set_xlabel("step")
        axes[0, 1].set_title("learned scales")
        axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


VAL_ZS_PREFIX = "val_zs/"  # pretraining's validation zero-shot keys: val_zs/<task>/<metric>
VAL_ZS_METRICS = (("bacc", "balanced accuracy"), ("auc", "AUC"))


def val_zeroshot_series(rows: dict[int, dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{metric: {task: [(step, value), ...]}} of the val_zs/<task>/<metric> keys logged."""
    series: dict[str, dict[str, list]] = {}
    for step in sorted(rows):
        for key, value in rows[step].items():
            parts = key.split("/")
            if key.startswith(VAL_ZS_PREFIX) and len(parts) == 3 and _finite(value):
                series.setdefault(parts[2], {}).setdefault(parts[1], []).append((step, value))
    return series


def val_zeroshot_png(rows: dict[int, dict], path: str) -> str | None:
    """bACC and AUC of each task on the validation split against the pretraining step;
    None when the run logged none."""
    series = val_zeroshot_series(rows)
    if not series:
        return None
    fig, axes = plt.subplots(1, len(VAL_ZS_METRICS), figsize=(10, 4), squeeze=False)
    for ax, (metric, label) in zip(axes[0], VAL_ZS_METRICS):
        for task, points in sorted(series.get(metric, {}).items()):
            ax.plot(*zip(*[(s, 100 * v) for s, v in points]), marker="o", label=task)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{label} (%)")
        ax.set_title(f"validation zero-shot {label}")
        if series.get(metric):
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- sections
