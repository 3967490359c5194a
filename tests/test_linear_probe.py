"""Linear probe: the classifier, patient sampling, and run() on hand-written embedding files."""

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from configs import linear_probe as lp_config
from mama_jax.evaluate import linear_probe as lp
from mama_jax.evaluate import metrics

DIM = 16


def _clusters(n, num_classes, seed, spread=1.0, freq=None):
    """Gaussian clusters with unequal class sizes, features on unequal scales and offsets."""
    rng = np.random.default_rng(seed)
    freq = freq if freq is not None else np.linspace(2, 1, num_classes) / np.linspace(2, 1, num_classes).sum()
    y = rng.choice(num_classes, size=n, p=freq)
    centers = np.random.default_rng(99).normal(size=(num_classes, DIM)) * 3
    scale = np.linspace(0.5, 4, DIM)
    x = (centers[y] + spread * rng.normal(size=(n, DIM))) * scale + 10
    return x.astype(np.float32), y


def test_probe_separates_clusters_and_beats_shuffled_labels():
    x, y = _clusters(400, 4, 0)
    xt, yt = _clusters(400, 4, 1)
    kw = dict(epochs=200, lr=1e-2, weight_decay=1e-3, seed=0)
    bacc = metrics.summary(yt, lp.predict_proba(lp.train_probe(x, y, 4, **kw), xt))["balanced_accuracy"]
    shuffled = np.random.default_rng(2).permutation(y)
    control = metrics.summary(yt, lp.predict_proba(lp.train_probe(x, shuffled, 4, **kw), xt))
    assert bacc > 0.9
    assert control["balanced_accuracy"] < 0.5 < bacc


def test_probe_matches_sklearn_balanced_logistic_regression():
    """Same objective as sklearn's: its C = 1 / (weight_decay * sum of sample weights)."""
    x, y = _clusters(400, 4, 3, spread=3.0, freq=[0.55, 0.25, 0.15, 0.05])
    wd = 1e-2
    params = lp.train_probe(x, y, 4, epochs=500, lr=1e-2, weight_decay=wd, seed=0)
    z = (x - params["mean"]) / params["std"]
    ref = LogisticRegression(C=1 / (wd * len(y)), class_weight="balanced", tol=1e-10,
                             max_iter=10_000).fit(z, y)
    np.testing.assert_allclose(lp.predict_proba(params, x), ref.predict_proba(z), atol=2e-3)
    # unbalanced loss moves the decision towards the frequent class
    plain = lp.train_probe(x, y, 4, epochs=500, lr=1e-2, weight_decay=wd, seed=0, balanced=False)
    n_first = [(lp.predict_proba(p, x).argmax(1) == 0).sum() for p in (plain, params)]
    assert n_first[0] > n_first[1]
    # the Adam option solves the same convex problem
    adam = lp.train_probe(x, y, 4, epochs=1500, lr=2e-2, weight_decay=wd, seed=0, optimizer="adam")
    np.testing.assert_allclose(lp.predict_proba(adam, x), ref.predict_proba(z), atol=2e-2)


def test_sample_fraction_is_by_patient_deterministic_and_nested():
    patients = np.repeat([f"p{i:02d}" for i in range(40)], 3)
    patients = np.random.default_rng(0).permutation(patients)
    small = lp.sample_fraction(patients, 0.1, seed=0)
    large = lp.sample_fraction(patients, 0.5, seed=0)
    assert len(np.unique(patients[small])) == 4 and small.sum() == 12  # whole patients
    assert not set(patients[small]) & set(patients[~small])
    assert np.array_equal(small, lp.sample_fraction(patients, 0.1, seed=0))
    assert not np.array_equal(small, lp.sample_fraction(patients, 0.1, seed=1))
    assert set(patients[small]) <= set(patients[large])
    assert lp.sample_fraction(patients, 1e-6, seed=0).sum() == 3  # at least one patient
    assert lp.sample_fraction(patients, 1.0, seed=0).all()
    with pytest.raises(ValueError, match="fraction"):
        lp.sample_fraction(patients, 0.0, seed=0)


def _write_split(path, n_patients, seed, with_flags):
    """Per patient 3 images sharing a density and a BI-RADS class; features carry both."""
    rng = np.random.default_rng(seed)
    density = np.repeat(rng.integers(0, 4, n_patients), 3)
    birads = np.repeat(rng.integers(0, 7, n_patients), 3)
    n = 3 * n_patients
    density[::7] = -1  # some unknown labels
    signal = np.zeros((n, 12), np.float32)
    signal[np.arange(n), np.maximum(density, 0)] = 3.0
    signal[np.arange(n), 4 + np.maximum(birads, 0)] = 3.0
    pooled = signal + rng.normal(size=(n, 12)).astype(np.float32)
    arrays = dict(
        image_emb=rng.normal(size=(n, 6)).astype(np.float32), pooled=pooled,
        birads=birads.astype(np.int32), density=density.astype(np.int32),
        cancer=np.full(n, -1, np.int32),
        patient_id=np.repeat([f"{seed}-{i}" for i in range(n_patients)], 3),
        image_id=np.array([f"{seed}-img{i}" for i in range(n)]))
    if with_flags:
        arrays["in_density_test_subset"] = (np.arange(n) % 2).astype(np.int32)
        arrays["in_birads_test_subset"] = np.zeros(n, np.int32)  # empty: no subset evaluated
    np.savez(path, **arrays)


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    _write_split(root / "embeddings_train.npz", 60, 0, with_flags=False)
    _write_split(root / "embeddings_test.npz", 30, 1, with_flags=True)
    return root


def test_run_end_to_end(embeddings, tmp_path):
    cfg = lp_config.get_config("test")
    cfg.train_file = str(embeddings / "embeddings_train.npz")
    cfg.test_file = str(embeddings / "embeddings_test.npz")
    cfg.fractions = (0.01, 1.0)
    result = lp.run(cfg, str(tmp_path))
    with open(tmp_path / "linear_probe.json") as f:
        assert json.load(f) == result
    assert set(result["tasks"]) == {"density", "birads"}
    dens = result["tasks"]["density"]
    assert dens["num_classes"] == 4 and len(dens["class_names"]) == 4
    assert set(dens["fractions"]) == {"0.01", "1.0"}
    full = dens["fractions"]["1.0"]
    train = np.load(cfg.train_file)
    assert full["n_train_images"] == int((train["density"] >= 0).sum())
    assert set(full["eval"]) == {"test", "test_subset"}
    assert set(result["tasks"]["birads"]["fractions"]["1.0"]["eval"]) == {"test"}  # empty flag
    ev = full["eval"]["test"]
    assert ev["n"] == dens["n_eval"]["test"] and len(ev["confusion"]) == 4
    assert ev["balanced_accuracy"] > 0.8  # the features carry the class
    for m in ("balanced_accuracy", "auc"):
        lo, hi = ev["ci95"][m]
        assert lo <= ev[m] <= hi
    tiny = dens["fractions"]["0.01"]  # one patient: one class
    assert tiny["n_train_patients"] == 1 and tiny["n_train_images"] <= 3
    assert any("1 of 4 classes" in w for w in tiny["warnings"])
    assert 0.0 <= tiny["eval"]["test"]["balanced_accuracy"] <= 1.0
    assert result["density/lp100%/test/bacc"] == ev["balanced_accuracy"]


def test_run_rejects_task_without_labels(embeddings, tmp_path):
    cfg = lp_config.get_config("test")
    cfg.tasks = ("cancer",)
    cfg.train_file = str(embeddings / "embeddings_train.npz")
    cfg.test_file = str(embeddings / "embeddings_test.npz")
    with pytest.raises(ValueError, match="embeddings_train.npz: dataset has no cancer labels"):
        lp.run(cfg, str(tmp_path))


def test_load_embeddings_names_file_and_missing_key(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, pooled=np.zeros((2, 3), np.float32), image_id=np.array(["a", "b"]))
    with pytest.raises(ValueError, match=r"bad\.npz: missing array 'image_emb'"):
        lp.load_embeddings(str(path))
    with pytest.raises(FileNotFoundError, match="embeddings_train.npz"):
        lp.run(lp_config.get_config("test"), str(tmp_path))
