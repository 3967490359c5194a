"""Tolerances for comparing two training runs, derived from the maths rather than one machine.

Losses and gradients of the same computation laid out differently (devices, processes,
micro-batches) differ by rounding only: they compare at a tight relative tolerance.
Parameters after Adam steps do not: Adam divides by sqrt(v), so where a gradient is near
zero (or zero by symmetry, like an attention key bias) rounding decides the step's sign.
A parameter comparison is therefore judged against what the gradient difference can move
through Adam, or against what an update can move at all.
"""

from __future__ import annotations

import math

import numpy as np
from flax import nnx

GRAD_RTOL = 1e-5
# Leaves whose true gradient is zero (attention key biases: softmax ignores them) carry only
# rounding noise; they are judged against this share of the whole gradient's norm instead.
ZERO_GRAD_FLOOR = 1e-4


def flat(state) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v, np.float64) for p, v in nnx.to_flat_state(state)}


def leaf_grad_tolerances(grads: dict, rtol: float = GRAD_RTOL) -> dict[str, float]:
    """The allowed norm of each leaf's gradient difference: rtol x its norm (floored)."""
    total = math.sqrt(sum(float(np.sum(g ** 2)) for g in grads.values()))
    return {k: rtol * max(float(np.linalg.norm(g)), ZERO_GRAD_FLOOR * total) for k, g in grads.items()}


def assert_grads_close(got: dict, want: dict, rtol: float = GRAD_RTOL) -> None:
    assert got.keys() == want.keys()
    total = math.sqrt(sum(float(np.sum(g ** 2)) for g in want.values()))
    diff = math.sqrt(sum(float(np.sum((got[k] - want[k]) ** 2)) for k in want))
    assert diff <= rtol * total, f"gradient difference {diff:.3g} vs norm {total:.3g}"
    for k, tol in leaf_grad_tolerances(want, rtol).items():
        d = float(np.linalg.norm(got[k] - want[k]))
        assert d <= tol, f"{k}: gradient difference {d:.3g} > {tol:.3g}"


def assert_adam_first_step_close(got: dict, want: dict, grads: dict, lr: float, eps: float = 1e-8,
                                 rtol: float = GRAD_RTOL) -> None:
    """Parameters after one Adam(W) step from the same start, on gradients that agree within
    `rtol` (assert_grads_close). Adam's first step moves an element by lr g/(|g| + eps)
    (+ decay, the same on both sides); that map's slope is eps / (|g| + eps)^2, so a gradient
    difference d moves the step by at most lr min(2, d eps / (|g| - d + eps)^2)."""
    tolerances = leaf_grad_tolerances(grads, rtol)
    for k in want:
        d = tolerances[k]  # bounds every element's gradient difference too
        g = np.abs(grads[k])
        step = lr * np.minimum(2.0, d * eps / (np.maximum(g - d, 0.0) + eps) ** 2)
        rounding = 1e-6 * (np.abs(want[k]) + lr)
        excess = np.abs(got[k] - want[k]) - step - rounding
        worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.ndim else ()
        assert np.all(excess <= 0), (f"{k}{list(worst)}: {got[k][worst]} vs {want[k][worst]}, "
                                     f"allowed {step[worst] + rounding[worst]:.3g}")


def adam_step_bound(t: int, b1: float = 0.9, b2: float = 0.999) -> float:
    """The largest |m_hat / sqrt(v_hat)| Adam can reach at count t, whatever the gradients
    (Cauchy-Schwarz on the two moving averages): 1 at t = 1, about 1 for small t."""
    ratio = b1 * b1 / b2
    return ((1 - b1) / (1 - b1 ** t) * math.sqrt((1 - b2 ** t) / (1 - b2))
            * math.sqrt(sum(ratio ** j for j in range(t))))


def assert_within_adam_reach(got: dict, want: dict, lrs: list[float], weight_decay: float) -> None:
    """Two runs from the same start after len(lrs) AdamW steps: each element differs by at
    most what both runs' updates can move it (sum of lr_t (bound_t + wd |p|)), twice."""
    bound = max(adam_step_bound(t) for t in range(1, len(lrs) + 1))
    for k in want:
        reach = 2 * sum(lrs) * (bound + weight_decay * (np.abs(want[k]) + 1.0)) + 1e-6 * np.abs(want[k])
        assert np.all(np.abs(got[k] - want[k]) <= reach), k
