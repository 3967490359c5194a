"""mama_jax.evaluate.metrics against sklearn, edge cases, and the bootstrap."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from mama_jax.evaluate import metrics


def _random_case(n, num_classes, seed, signal=1.5, ties=False):
    """Labels with unequal class frequencies and probabilities that carry some signal;
    `ties`: integer logits, so many images share exactly the same scores."""
    rng = np.random.default_rng(seed)
    freq = rng.dirichlet(np.ones(num_classes) * 2)
    y = rng.choice(num_classes, size=n, p=freq)
    logits = rng.normal(size=(n, num_classes)) + signal * np.eye(num_classes)[y]
    if ties:
        logits = np.round(logits)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p.astype(np.float32)


@pytest.mark.parametrize("num_classes,seed", [(2, 0), (2, 1), (4, 2), (7, 3)])
def test_summary_matches_sklearn(num_classes, seed):
    y, p = _random_case(400, num_classes, seed)
    pred = p.argmax(1)
    labels = list(range(num_classes))
    s = metrics.summary(y, p)
    assert s["n"] == 400 and s["num_classes"] == num_classes
    assert s["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert s["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert s["confusion"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    np.testing.assert_allclose(s["per_class_recall"],
                               skm.recall_score(y, pred, labels=labels, average=None))
    if num_classes == 2:
        assert s["auc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]))
        assert s["sensitivity"] == pytest.approx(skm.recall_score(y, pred, pos_label=1))
        assert s["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
        assert s["ppv"] == pytest.approx(skm.precision_score(y, pred, pos_label=1))
        assert s["npv"] == pytest.approx(skm.precision_score(y, pred, pos_label=0))
        assert s["f1"] == pytest.approx(skm.f1_score(y, pred))
    else:
        p64 = p.astype(np.float64) / p.astype(np.float64).sum(1, keepdims=True)
        assert s["auc"] == pytest.approx(
            skm.roc_auc_score(y, p64, multi_class="ovr", average="macro", labels=labels))
        assert "sensitivity" not in s
    assert s["warnings"] == []


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_class_absent_from_y_true_and_predictions():
    y, p = _random_case(300, 4, 5)
    keep = y != 2  # class 2 absent from y_true
    y, p = y[keep], p[keep]
    p[:, 3] = 0.0  # class 3 never predicted
    p /= p.sum(1, keepdims=True)
    pred = p.argmax(1)
    s = metrics.summary(y, p, class_names=["a", "b", "c", "d"])
    assert 3 not in set(pred) and 3 in set(y)
    assert s["per_class_recall"][3] == 0.0  # present, never predicted: counts as 0
    assert math.isnan(s["per_class_recall"][2])
    assert s["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    present = [0, 1, 3]
    expected = np.mean([skm.roc_auc_score(y == c, p[:, c]) for c in present])
    assert s["auc"] == pytest.approx(expected)
    assert len(s["confusion"]) == 4 and all(len(r) == 4 for r in s["confusion"])
    assert s["class_names"] == ["a", "b", "c", "d"]
    assert any("absent" in w for w in s["warnings"])


def test_single_class_auc_is_nan_with_warning():
    y = np.zeros(20, dtype=int)
    p = np.tile([0.7, 0.2, 0.1], (20, 1))
    s = metrics.summary(y, p)
    assert math.isnan(s["auc"])
    assert any("AUC undefined: only one class in y_true" in w for w in s["warnings"])
    assert s["accuracy"] == 1.0 and s["balanced_accuracy"] == 1.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="empty"):
        metrics.summary(np.zeros(0, int), np.zeros((0, 2)))
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(4,\)"):
        metrics.summary(np.zeros(4, int), np.full((5, 3), 1 / 3))
    with pytest.raises(ValueError, match="unknown labels"):
        metrics.summary(np.array([0, -1, 1]), np.full((3, 2), 0.5))
    with pytest.raises(ValueError, match="outside"):
        metrics.summary(np.array([0, 2]), np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="summing to 1"):
        metrics.summary(np.array([0, 1]), np.array([[2.0, 1.0], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.bootstrap_ci(np.array([0, 1]), np.full((2, 2), 0.5), "kappa")


@pytest.mark.parametrize("num_classes,ties", [(2, False), (2, True), (4, True)])
def test_bootstrap_equals_explicit_resamples(num_classes, ties):
    """The vectorised weighted metrics equal summary() recomputed on each resample."""
    y, p = _random_case(60, num_classes, 7, ties=ties)
    assert len(np.unique(p[:, 1])) < 45 or not ties  # ties exercise the half-credit term
    names = ["accuracy", "balanced_accuracy", "auc"] + (["sensitivity", "f1"] if num_classes == 2 else [])
    idx = np.concatenate(list(metrics._bootstrap_indices(len(y), 30, seed=3)))
    resampled = [metrics.summary(y[row], p[row]) for row in idx]
    for name in names:
        explicit = np.array([s[name] for s in resampled], dtype=float)
        explicit = explicit[np.isfinite(explicit)]
        lo, hi = np.percentile(explicit, [2.5, 97.5])
        got = metrics.bootstrap_ci(y, p, name, n_boot=30, seed=3)
        assert got == pytest.approx((lo, hi), abs=1e-12), name


def test_bootstrap_contains_estimate_narrows_and_is_deterministic():
    y_small, p_small = _random_case(100, 4, 11, signal=1.0)
    y_big, p_big = _random_case(3000, 4, 11, signal=1.0)
    for metric in ("bacc", "auc"):
        key = metrics.ALIASES.get(metric, metric)
        lo, hi = metrics.bootstrap_ci(y_big, p_big, metric, n_boot=300, seed=0)
        assert lo <= metrics.summary(y_big, p_big)[key] <= hi
        lo_s, hi_s = metrics.bootstrap_ci(y_small, p_small, metric, n_boot=300, seed=0)
        assert lo_s <= metrics.summary(y_small, p_small)[key] <= hi_s
        assert (hi - lo) < 0.5 * (hi_s - lo_s)
    a = metrics.bootstrap_ci(y_small, p_small, "auc", n_boot=100, seed=5)
    assert a == metrics.bootstrap_ci(y_small, p_small, "auc", n_boot=100, seed=5)
    assert a != metrics.bootstrap_ci(y_small, p_small, "auc", n_boot=100, seed=6)


def test_bootstrap_skips_undefined_resamples():
    # 1 positive in 30: about a third of resamples hold no positive, so AUC/sensitivity skip them
    y = np.zeros(30, dtype=int)
    y[0] = 1
    p = np.tile([0.6, 0.4], (30, 1))
    p[0] = [0.2, 0.8]
    lo, hi = metrics.bootstrap_ci(y, p, "auc", n_boot=200, seed=0)
    assert lo == hi == 1.0
    assert metrics.bootstrap_ci(y, p, "sensitivity", n_boot=200, seed=0) == (1.0, 1.0)
    y1 = np.zeros(10, dtype=int)
    assert all(math.isnan(v) for v in metrics.bootstrap_ci(y1, np.tile([0.9, 0.1], (10, 1)), "auc",
                                                            n_boot=20))
