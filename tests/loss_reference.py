"""A float64 numpy re-derivation of MaMA's losses (paper eq. 1-4), written from the
paper / spec with explicit loops; it shares no code with mama_jax and supplies
finite-difference gradients. Used by test_losses.py."""

import numpy as np


def np_unit(v):
    return v / np.linalg.norm(v)


def np_logsumexp(values):
    values = np.asarray(values, np.float64)
    top = values.max()
    return top + np.log(np.sum(np.exp(values - top)))


def np_ce_diag(mat):
    """Mean over rows i of -log softmax(mat[i])[i]."""
    return np.mean([np_logsumexp(mat[i]) - mat[i, i] for i in range(mat.shape[0])])


def np_clip(img, txt, log_scale, directions):
    b = img.shape[0]
    sim = np.exp(log_scale) * np.array(
        [[np_unit(img[i]) @ np_unit(txt[j]) for j in range(b)] for i in range(b)])
    i2t, t2i = np_ce_diag(sim), np_ce_diag(sim.T)
    return {"mean": 0.5 * (i2t + t2i), "sum": i2t + t2i, "i2t": i2t}[directions]


def np_nt_xent(z1, z2, tau):
    b = z1.shape[0]
    z = [np_unit(v) for v in np.concatenate([z1, z2])]
    total = 0.0
    for a in range(2 * b):
        pos = (a + b) % (2 * b)
        others = [z[a] @ z[k] / tau for k in range(2 * b) if k != a]
        total += np_logsumexp(others) - z[a] @ z[pos] / tau
    return total / (2 * b)


def np_local_scores(sent, mask, patch):
    bt, n_sent, _ = sent.shape
    bi, n_patch, _ = patch.shape
    sent_u = [[np_unit(v) for v in caption] for caption in sent]
    patch_u = [[np_unit(v) for v in image] for image in patch]
    c_v, c_t = np.zeros((bt, bi)), np.zeros((bt, bi))
    for j in range(bt):
        valid = [s for s in range(n_sent) if mask[j, s]]
        for n in range(bi):
            sim = np.array([[sent_u[j][s] @ patch_u[n][p]
                             for p in range(n_patch)] for s in range(n_sent)])
            c_v[j, n] = np.mean([max(sim[s, p] for p in range(n_patch)) for s in valid])
            c_t[j, n] = np.mean([max(sim[s, p] for s in valid) for p in range(n_patch)])
    return c_v, c_t


def np_local_loss(sent, mask, patch, log_scale, directions="mean"):
    c_v, c_t = np_local_scores(sent, mask, patch)
    terms = [np_ce_diag(np.exp(log_scale) * c) for c in (c_v, c_v.T, c_t, c_t.T)]
    return sum(terms) / 4 if directions == "mean" else sum(terms)


def np_finite_diff(fn, arrays, h=1e-6):
    """Central differences of fn(*arrays) w.r.t. each array (float64)."""
    arrays = [np.array(a, np.float64) for a in arrays]
    grads = []
    for k, arr in enumerate(arrays):
        grad = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            plus = [a.copy() for a in arrays]
            minus = [a.copy() for a in arrays]
            plus[k][idx] += h
            minus[k][idx] -= h
            grad[idx] = (fn(*plus) - fn(*minus)) / (2 * h)
        grads.append(grad)
    return grads


def assert_close(got, want, atol, rtol=0.0, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    print(f"{what}: max abs diff {diff:.3g}")
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=what)


def local_inputs(rng, bt, bi, n_sent, n_patch, dim):
    sent = rng.normal(size=(bt, n_sent, dim))
    patch = rng.normal(size=(bi, n_patch, dim))
    mask = np.ones((bt, n_sent), bool)
    for j in range(bt):  # 1..S valid sentences, valid ones first like real captions
        mask[j, 1 + j % n_sent:] = False
    # Caption 0's padded last sentence is a copy of a patch of image 1 (cosine 1):
    # it would dominate both maxima if the mask were ignored.
    sent[0, -1] = 1e3 * patch[1, 2]
    assert not mask[0, -1]
    return sent, mask, patch
