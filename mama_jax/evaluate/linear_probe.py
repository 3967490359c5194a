"""Linear probe on extracted embeddings (paper §4.2 LP, Tables 1-2; spec §4.2).

`run` reads the npz files the extract job writes (configs/extract.py), trains a
linear classifier per task on 1 / 10 / 100 % of the training patients and reports
metrics.summary + bootstrap intervals on the test images (and on the paper's test
subset when the dataset flags one).

The probe is a class-balanced multinomial logistic regression in JAX on
standardised features, fitted full-batch with L-BFGS (scipy's L-BFGS-B on a
jitted JAX loss and gradient; `optimizer="adam"`: optax Adam with `lr`). The
paper trains Linear(768 -> C) with SGD for 8000 steps under augmentation and a
class-balanced sampler; on frozen, un-augmented features that problem is convex,
so solving it to convergence gives the same classifier family without a step
count or learning-rate schedule to tune. The penalty 0.5 * weight_decay * |W|^2
on the mean loss is what PyTorch SGD's weight_decay adds.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize
import threadpoolctl
from absl import logging

from mama_jax.input import captions
from mama_jax.evaluate import metrics

REQUIRED_KEYS = ("image_emb", "pooled", "birads", "density", "cancer", "patient_id", "image_id")
FEATURES = ("pooled", "image_emb")
CI_METRICS = ("balanced_accuracy", "auc")
RESULT_FILE = "linear_probe.json"
_GRAD_TOL = 1e-6  # stop L-BFGS once every gradient entry of the (mean) loss is this small


# ----------------------------------------------------------------------------- data


def load_embeddings(path: str) -> dict[str, np.ndarray]:
    """The arrays of an extract-job npz, checked for the keys and shapes the probe needs."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such embeddings file; write it with the extract job "
                                "(configs/extract.py) or set config.train_file / config.test_file")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # zip, format or object-array errors all mean: not an extract npz
        raise ValueError(f"{path}: cannot read as an embeddings npz ({type(e).__name__}: {e})") from e
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing array {missing[0]!r} (all missing: {missing}; "
                         f"present: {sorted(data)})")
    n = len(data["image_id"])
    for k, v in data.items():
        if v.ndim == 0 or v.shape[0] != n:
            raise ValueError(f"{path}: array {k!r} has shape {v.shape}; expected {n} rows "
                             "like 'image_id'")
    for k in FEATURES:
        if data[k].ndim != 2:
            raise ValueError(f"{path}: array {k!r} must be [N, dim]; got shape {data[k].shape}")
    for k in ("birads", "density", "cancer"):
        if data[k].ndim != 1 or not np.issubdtype(data[k].dtype, np.integer):
            raise ValueError(f"{path}: array {k!r} must be int [N]; got {data[k].dtype} "
                             f"{data[k].shape}")
    return data


def sample_fraction(patient_ids, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over images: every image of round(fraction * patients) patients
    (at least one), drawn with `seed`. The same seed gives nested samples across
    fractions (the 1 % patients are among the 10 % ones)."""
    ids = np.asarray(patient_ids)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    if ids.size == 0:
        raise ValueError("sample_fraction: no images to sample from")
    patients = np.unique(ids)  # sorted, so the draw does not depend on image order
    k = max(1, int(round(fraction * len(patients))))
    chosen = patients[np.random.default_rng(seed).permutation(len(patients))[:k]]
    return np.isin(ids, chosen)


# ----------------------------------------------------------------------------- probe


def _bucket(n: int) -> int:
    """n rounded up to 1/8 of its power of two (at most 12.5 % padding), at least 64."""
    step = 2 ** max(3, n.bit_length() - 4)
    return max(64, -(-n // step) * step)


def _loss_fn(p, z, onehot, sample_weight, weight_decay):
    logp = jax.nn.log_softmax(z @ p["w"] + p["b"])
    ce = -(onehot * logp).sum(-1)
    return (sample_weight * ce).sum() / sample_weight.sum() + 0.5 * weight_decay * jnp.sum(p["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("dim", "num_classes"))
def _flat_value_and_grad(flat, data, *, dim, num_classes):
    """Loss and gradient in scipy's layout: one flat float64 vector [W.ravel(), b] in and out."""
    def loss(f):
        f = f.astype(jnp.float32)
        p = {"w": f[:dim * num_classes].reshape(dim, num_classes), "b": f[dim * num_classes:]}
        return _loss_fn(p, *data)
    return jax.value_and_grad(loss)(flat)


def _fit_lbfgs(params, data, steps):
    """scipy's L-BFGS-B driving a jitted JAX loss: compiling only the loss takes well
    under a second, where a jitted optax L-BFGS loop with its zoom line search takes
    ~15 s per data shape on CPU (and every fraction is a new shape)."""
    dim, num_classes = params["w"].shape

    def fun(flat):
        value, grad = _flat_value_and_grad(flat, data, dim=dim, num_classes=num_classes)
        return float(value), np.asarray(grad, np.float64)

    flat0 = np.concatenate([np.asarray(params["w"]).ravel(), np.asarray(params["b"])])
    # L-BFGS-B's own algebra is O(10 * params): threaded BLAS only spins (40x slower
    # on a busy 2-core machine), so it runs single-threaded; JAX's threads are untouched.
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        res = scipy.optimize.minimize(fun, flat0.astype(np.float64), jac=True, method="L-BFGS-B",
                                      options={"maxiter": steps, "gtol": _GRAD_TOL})
    w = res.x[:dim * num_classes].reshape(dim, num_classes)
    return {"w": w.astype(np.float32), "b": res.x[dim * num_classes:].astype(np.float32)}, \
        float(res.fun), int(res.nit)


@functools.partial(jax.jit, static_argnames=("steps", "lr"))
def _fit_adam(params, data, *, steps, lr):
    opt = optax.adam(lr)

    def body(_, carry):
        p, state = carry
        grad = jax.grad(_loss_fn)(p, *data)
        upd, state = opt.update(grad, state, p)
        return optax.apply_updates(p, upd), state

    params, _ = jax.lax.fori_loop(0, steps, body, (params, opt.init(params)))
    return params, _loss_fn(params, *data)


def train_probe(x, y, num_classes: int, *, epochs: int, lr: float, weight_decay: float,
                seed: int, balanced: bool = True, optimizer: str = "lbfgs") -> dict:
    """Fit softmax(W z + b), z = standardised x, on labels y in 0..num_classes-1.

    epochs: full-batch iterations (L-BFGS or Adam steps; L-BFGS stops early once
    converged). balanced: per-image loss weight n / (classes present * count[y]),
    sklearn's "balanced". Returns numpy params for predict_proba plus the fit's
    final loss and iteration count.
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"train_probe: x must be [N, dim] and y [N]; got {x.shape} and {y.shape}")
    if x.shape[0] == 0:
        raise ValueError("train_probe: no training images")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"train_probe: y must hold class indices 0..{num_classes - 1}; got "
                         f"{y.dtype} values {sorted(set(y.tolist()))[:10]}")
    if not np.isfinite(x).all():
        raise ValueError("train_probe: x holds NaN or inf")
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"optimizer must be 'lbfgs' or 'adam'; got {optimizer!r}")
    mean = x.mean(0)
    std = x.std(0)
    std = np.where(std > 1e-6, std, 1.0)  # a constant feature carries nothing; do not amplify noise
    counts = np.bincount(y, minlength=num_classes)
    if balanced:
        weight = len(y) / (np.count_nonzero(counts) * counts[y])
    else:
        weight = np.ones(len(y))
    rng = np.random.default_rng(seed)
    params = {"w": (0.01 * rng.standard_normal((x.shape[1], num_classes))).astype(np.float32),
              "b": np.zeros(num_classes, np.float32)}
    # Rows padded to a size bucket with weight 0 (no effect on the loss), so the
    # fractions and tasks share a few compiled programs instead of one per sample size.
    rows = _bucket(len(y))
    z = np.zeros((rows, x.shape[1]), np.float32)
    z[:len(y)] = (x - mean) / std
    onehot = np.zeros((rows, num_classes), np.float32)
    onehot[np.arange(len(y)), y] = 1.0
    data = (jnp.asarray(z), jnp.asarray(onehot),
            jnp.asarray(np.pad(weight, (0, rows - len(y))), jnp.float32), jnp.float32(weight_decay))
    if optimizer == "lbfgs":
        fitted, loss, iters = _fit_lbfgs(params, data, int(epochs))
    else:
        fitted, loss = _fit_adam(params, data, steps=int(epochs), lr=float(lr))
        loss, iters = float(loss), int(epochs)
    out = {"mean": mean, "std": std, "w": np.asarray(fitted["w"]), "b": np.asarray(fitted["b"]),
           "train_loss": float(loss), "iterations": int(iters)}
    if not (np.isfinite(out["w"]).all() and np.isfinite(out["b"]).all()):
        raise FloatingPointError(f"train_probe: {optimizer} diverged (non-finite weights); "
                                 "lower lr or raise weight_decay")
    return out


def predict_proba(params: dict, x) -> np.ndarray:
    """Class probabilities [N, C] of the fitted probe."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] != params["w"].shape[0]:
        raise ValueError(f"predict_proba: x must be [N, {params['w'].shape[0]}]; got {x.shape}")
    logits = ((x - params["mean"]) / params["std"]) @ params["w"] + params["b"]
    logits -= logits.max(1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


# ----------------------------------------------------------------------------- job


def _task_labels(data: dict, task: str, num_classes: int, path: str) -> np.ndarray:
    labels = data[task].astype(np.int64)
    if not (labels >= 0).any():
        raise ValueError(f"{path}: dataset has no {task} labels (all {len(labels)} are -1); "
                         f"drop {task!r} from config.tasks")
    if labels.max() >= num_classes or labels.min() < -1:
        raise ValueError(f"{path}: {task} labels must be -1 or 0..{num_classes - 1}; got "
                         f"range [{labels.min()}, {labels.max()}]")
    return labels


def _check_config(cfg) -> None:
    if cfg.feature not in FEATURES:
        raise ValueError(f"config.feature={cfg.feature!r}; known: {', '.join(FEATURES)}")
    if not cfg.tasks:
        raise ValueError("config.tasks is empty: name at least one of "
                         f"{', '.join(captions.CLASS_NAMES)}")
    for task in cfg.tasks:
        if task not in captions.CLASS_NAMES:
            raise ValueError(f"config.tasks: unknown task {task!r}; known: "
                             f"{', '.join(captions.CLASS_NAMES)}")
    for f in cfg.fractions:
        if not 0 < f <= 1:
            raise ValueError(f"config.fractions: {f} is not in (0, 1]")
    if cfg.bootstrap < 0:
        raise ValueError(f"config.bootstrap must be >= 0 (0 = no intervals); got {cfg.bootstrap}")


def _evaluate(params, feats, labels, class_names, n_boot, seed) -> dict:
    probs = predict_proba(params, feats)
    out = metrics.summary(labels, probs, class_names=class_names)
    if n_boot:
        out["ci95"] = {m: list(metrics.bootstrap_ci(labels, probs, m, n_boot=n_boot, seed=seed))
                       for m in CI_METRICS}
    return out


def run(cfg, workdir: str) -> dict:
    """Probe every task x fraction; writes WORKDIR/linear_probe.json and returns its content."""
    _check_config(cfg)
    train_path = cfg.train_file or os.path.join(workdir, "embeddings_train.npz")
    test_path = cfg.test_file or os.path.join(workdir, "embeddings_test.npz")
    train, test = load_embeddings(train_path), load_embeddings(test_path)
    feature = cfg.feature
    if train[feature].shape[1] != test[feature].shape[1]:
        raise ValueError(f"{feature!r} width differs: {train[feature].shape[1]} in {train_path}, "
                         f"{test[feature].shape[1]} in {test_path} (embeddings of different models?)")

    result: dict = {
        "train_file": train_path, "test_file": test_path, "feature": feature,
        "pretrain_workdir": cfg.pretrain_workdir,
        "probe": {"model": "multinomial logistic regression, class-balanced, standardised features",
                  "optimizer": cfg.optimizer, "epochs": cfg.epochs, "lr": cfg.lr,
                  "weight_decay": cfg.weight_decay, "seed": cfg.seed, "bootstrap": cfg.bootstrap},
        "tasks": {},
    }
    headline: dict = {}
    for task in cfg.tasks:
        class_names = list(captions.CLASS_NAMES[task])
        num_classes = len(class_names)
        y_train = _task_labels(train, task, num_classes, train_path)
        y_test = _task_labels(test, task, num_classes, test_path)
        known_train = np.flatnonzero(y_train >= 0)
        eval_sets = {"test": y_test >= 0}
        flag = f"in_{task}_test_subset"  # the paper's sub-sampled test set (§4.2)
        if flag in test and ((test[flag] > 0) & (y_test >= 0)).any():
            eval_sets["test_subset"] = (test[flag] > 0) & (y_test >= 0)
        task_out = {"num_classes": num_classes, "class_names": class_names,
                    "n_train_labelled": int(len(known_train)),
                    "n_eval": {k: int(m.sum()) for k, m in eval_sets.items()}, "fractions": {}}
        for fraction in cfg.fractions:
            pick = known_train[sample_fraction(train["patient_id"][known_train], fraction, cfg.seed)]
            y = y_train[pick]
            counts = np.bincount(y, minlength=num_classes)
            warnings = []
            if np.count_nonzero(counts) < num_classes:
                warnings.append(
                    f"train sample at fraction {fraction} holds {np.count_nonzero(counts)} of "
                    f"{num_classes} classes (counts {counts.tolist()}); absent classes are "
                    "never predicted" + ("; with a single class the probe cannot discriminate "
                                         "(its AUC is noise)" if np.count_nonzero(counts) == 1 else ""))
                logging.warning("linear probe %s: %s", task, warnings[-1])
            params = train_probe(train[feature][pick], y, num_classes, epochs=cfg.epochs, lr=cfg.lr,
                                 weight_decay=cfg.weight_decay, seed=cfg.seed,
                                 optimizer=cfg.optimizer)
            frac_out = {
                "fraction": fraction, "n_train_images": int(len(pick)),
                "n_train_patients": int(len(np.unique(train["patient_id"][pick]))),
                "train_class_counts": counts.tolist(), "train_loss": params["train_loss"],
                "iterations": params["iterations"], "warnings": warnings, "eval": {},
            }
            for name, mask in eval_sets.items():
                ev = _evaluate(params, test[feature][mask], y_test[mask], class_names,
                               cfg.bootstrap, cfg.seed)
                frac_out["eval"][name] = ev
                pct = f"{100 * fraction:g}%"
                headline[f"{task}/lp{pct}/{name}/bacc"] = ev["balanced_accuracy"]
                headline[f"{task}/lp{pct}/{name}/auc"] = ev["auc"]
            logging.info("linear probe %s @ %g: bACC %.4f AUC %.4f (test)", task, fraction,
                         frac_out["eval"]["test"]["balanced_accuracy"], frac_out["eval"]["test"]["auc"])
            task_out["fractions"][str(fraction)] = frac_out
        result["tasks"][task] = task_out
    result = metrics.json_safe({**headline, **result})
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RESULT_FILE)
    with open(f"{path}.tmp", "w") as f:
        json.dump(result, f, indent=2, allow_nan=False)
    os.replace(f"{path}.tmp", path)
    return result
