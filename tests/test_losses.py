"""mama_jax.losses against a float64 numpy re-derivation of paper eq. 1-4.

The numpy side (tests/loss_reference.py) is written from the paper / spec with
explicit loops, shares no code with the package, and supplies finite-difference
gradients.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mama_jax import losses, objective
from tests.loss_reference import (assert_close, local_inputs, np_clip, np_finite_diff,
                                   np_local_loss, np_local_scores, np_nt_xent)


# -------------------------------------------------------------- global losses


@pytest.mark.parametrize("directions", ["mean", "sum", "i2t"])
def test_clip_loss_value_and_grad(directions):
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    scale = np.log(1 / 0.07)
    want = np_clip(img, txt, scale, directions)
    fn = lambda i, t, s: losses.clip_loss(i, t, s, directions=directions)
    got, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(
        jnp.float32(img), jnp.float32(txt), jnp.float32(scale))
    assert_close(got, want, 1e-5, what=f"clip {directions} value")
    want_grads = np_finite_diff(lambda i, t, s: np_clip(i, t, s, directions),
                                [img, txt, np.array(scale)])
    for g, w, name in zip(grads, want_grads, ("img", "txt", "scale")):
        assert_close(g, w, 2e-5, 1e-4, what=f"clip {directions} d/d{name}")


def test_clip_directions_relations_and_errors():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    mean = losses.clip_loss(img, txt, 1.0)
    assert np.isclose(losses.clip_loss(img, txt, 1.0, directions="sum"), 2 * mean)
    # "i2t" ignores the text->image direction, so it is not symmetric in its inputs.
    assert not np.isclose(losses.clip_loss(img, txt, 1.0, directions="i2t"),
                          losses.clip_loss(txt, img, 1.0, directions="i2t"))
    with pytest.raises(ValueError, match="directions"):
        losses.clip_loss(img, txt, 1.0, directions="both")
    with pytest.raises(ValueError, match="text_emb"):
        losses.clip_loss(img, txt[:3], 1.0)


def test_nt_xent_matches_numpy_and_grad():
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    got, grads = jax.jit(jax.value_and_grad(losses.nt_xent_loss, argnums=(0, 1)))(
        jnp.float32(z1), jnp.float32(z2), 0.5)
    assert_close(got, np_nt_xent(z1, z2, 0.5), 1e-5, what="nt_xent value")
    want = np_finite_diff(lambda a, b: np_nt_xent(a, b, 0.5), [z1, z2])
    for g, w, name in zip(grads, want, ("z1", "z2")):
        assert_close(g, w, 2e-5, 1e-4, what=f"nt_xent d/d{name}")
    # Other temperatures are honoured (not a hard-coded 0.5).
    assert_close(losses.nt_xent_loss(z1, z2, 0.1), np_nt_xent(z1, z2, 0.1), 1e-4,
                 what="nt_xent tau=0.1")


def test_l2_normalize_zero_vector_has_finite_grad():
    g = jax.grad(lambda x: jnp.sum(losses.l2_normalize(x)))(jnp.zeros((2, 3)))
    assert np.all(np.isfinite(g))
    x = losses.l2_normalize(jnp.ones((2, 4), jnp.bfloat16))
    assert x.dtype == jnp.bfloat16 and np.allclose(np.float32(x), 0.5, atol=1e-2)


# -------------------------------------------------------------- local alignment


def test_local_similarity_matches_numpy_loops_and_ignores_padding():
    rng = np.random.default_rng(3)
    sent, mask, patch = local_inputs(rng, bt=5, bi=4, n_sent=3, n_patch=6, dim=8)
    want_v, want_t = np_local_scores(sent, mask, patch)
    similarity = jax.jit(losses.local_similarity, static_argnames="caption_chunk")
    # 1 divides Bt=5, 2 and 3 do not (filler captions), None = one chunk.
    results = {c: similarity(sent, mask, patch, caption_chunk=c) for c in (None, 1, 2, 3)}
    for chunk, (c_v, c_t) in results.items():
        assert c_v.shape == c_t.shape == (5, 4)
        assert_close(c_v, want_v, 1e-6, what=f"c_v chunk={chunk}")
        assert_close(c_t, want_t, 1e-6, what=f"c_t chunk={chunk}")
        assert_close(c_v, results[None][0], 1e-7, what=f"c_v chunk={chunk} vs None")
        assert_close(c_t, results[None][1], 1e-7, what=f"c_t chunk={chunk} vs None")
    # Ignoring the mask changes caption 0's scores: the padded sentence would win.
    c_v_nomask, c_t_nomask = losses.local_similarity(sent, np.ones_like(mask), patch)
    print("unmasked vs masked c_v, c_t [0,1]:", float(c_v_nomask[0, 1]), want_v[0, 1],
          float(c_t_nomask[0, 1]), want_t[0, 1])
    assert c_v_nomask[0, 1] - want_v[0, 1] > 0.1
    assert c_t_nomask[0, 1] - want_t[0, 1] > 0.05


def test_local_similarity_bad_input():
    sent, patch = np.zeros((2, 3, 4)), np.zeros((2, 5, 4))
    with pytest.raises(ValueError, match="sent_mask"):
        losses.local_similarity(sent, np.ones((2, 4), bool), patch)
    with pytest.raises(ValueError, match="patch_emb dim"):
        losses.local_similarity(sent, np.ones((2, 3), bool), np.zeros((2, 5, 6)))
    with pytest.raises(ValueError, match="caption_chunk"):
        losses.local_similarity(sent, np.ones((2, 3), bool), patch, caption_chunk=0)
    # A caption with no valid sentence scores 0 (not the mask fill value), with
    # finite gradients.
    rng = np.random.default_rng(10)
    sent, patch = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4))
    mask = np.array([[True, True, False], [False, False, False]])
    c_v, c_t = jax.jit(losses.local_similarity)(sent, mask, patch)
    assert np.all(np.asarray(c_v)[1] == 0.0) and np.all(np.asarray(c_t)[1] == 0.0)
    grad = jax.jit(jax.grad(lambda s: losses.local_loss(s, mask, patch, 1.0)))(jnp.float32(sent))
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[1] == 0.0)


def test_local_loss_value_and_grad():
    rng = np.random.default_rng(4)
    sent, mask, patch = local_inputs(rng, bt=4, bi=4, n_sent=3, n_patch=5, dim=4)
    scale = 1.5
    fn = lambda s, p, sc, d: losses.local_loss(s, mask, p, sc, directions=d, caption_chunk=3)
    grad_fn = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)), static_argnums=3)
    args = (jnp.float32(sent), jnp.float32(patch), jnp.float32(scale))
    got, grads = grad_fn(*args, "mean")
    got_sum, grads_sum = grad_fn(*args, "sum")
    assert_close(got, np_local_loss(sent, mask, patch, scale, "mean"), 1e-5,
                 what="local mean value")
    assert_close(got_sum, np_local_loss(sent, mask, patch, scale, "sum"), 1e-5,
                 what="local sum value")
    want_grads = np_finite_diff(lambda s, p, sc: np_local_loss(s, mask, p, sc),
                                [sent, patch, np.array(scale)])
    for g, g_sum, w, name in zip(grads, grads_sum, want_grads, ("sent", "patch", "scale")):
        assert_close(g, w, 3e-5, 1e-4, what=f"local mean d/d{name}")
        # "sum" adds the four CE terms that "mean" averages (D2): exactly 4x.
        assert_close(g_sum, 4 * w, 1.2e-4, 1e-4, what=f"local sum d/d{name}")
    # Padded sentences get exactly zero gradient.
    assert np.all(np.asarray(grads[0])[~mask] == 0.0)


def test_local_loss_memory_is_bounded_by_the_chunk():
    # XLA's own buffer plan for the backward pass: with 1-caption chunks (and the
    # chunk body rematerialised) the temporaries stay far below one full
    # [Bt, Bi, S, P] similarity block.
    b, n_sent, n_patch, dim = 32, 4, 32, 8
    sent, patch = jnp.zeros((b, n_sent, dim)), jnp.zeros((b, n_patch, dim))
    mask = jnp.ones((b, n_sent), bool)
    full_block = b * b * n_sent * n_patch * 4

    def temp_bytes(chunk):
        fn = jax.grad(lambda s, p: losses.local_loss(s, mask, p, 1.0, caption_chunk=chunk),
                      argnums=(0, 1))
        return jax.jit(fn).lower(sent, patch).compile().memory_analysis().temp_size_in_bytes

    small = temp_bytes(1)
    print(f"backward temp: chunk 1 {small / 2**20:.2f} MiB, one block {full_block / 2**20:.2f} MiB")
    # Measured: 0.13 MiB; without the remat 1.39 MiB; one chunk of all 32 captions 2.28 MiB.
    assert small < 0.5 * full_block


# ------------------------------------------------------------------------ eq. 4


def make_emb(rng, b=6, d=8, d_simclr=5, n_sent=3, n_patch=5):
    sent, mask, patch = local_inputs(rng, b, b, n_sent, n_patch, d)
    return {"img_global_1": rng.normal(size=(b, d)), "img_global_2": rng.normal(size=(b, d)),
            "txt_global": rng.normal(size=(b, d)), "simclr_1": rng.normal(size=(b, d_simclr)),
            "simclr_2": rng.normal(size=(b, d_simclr)), "patch_1": patch, "sent": sent,
            "sent_mask": mask}


def np_terms(emb, log_scale, local_scale, directions="mean", clip_directions=None):
    cd = clip_directions or directions
    return {"vv": np_nt_xent(emb["simclr_1"], emb["simclr_2"], 0.5),
            "vt_1": np_clip(emb["img_global_1"], emb["txt_global"], log_scale, cd),
            "vt_2": np_clip(emb["img_global_2"], emb["txt_global"], log_scale, cd),
            "local": np_local_loss(emb["sent"], emb["sent_mask"], emb["patch_1"],
                                   local_scale, directions)}


LOG_SCALE, LOCAL_SCALE, DELTA = float(np.log(1 / 0.07)), 2.0, 10
# step, delta and the scales are traced; one compile per options / emb structure.
mama_loss_jit = jax.jit(objective.mama_loss, static_argnames=("options", "mesh", "data_axes"))


def test_mama_loss_delta_schedule_under_jit():
    emb = make_emb(np.random.default_rng(5))
    ref = np_terms(emb, LOG_SCALE, LOCAL_SCALE)

    @jax.jit
    def total_at(step, emb):
        return objective.mama_loss(emb, step=step, delta=DELTA, logit_scale=LOG_SCALE,
                                local_scale=LOCAL_SCALE, options=objective.LossOptions())

    base = ref["vv"] + ref["vt_1"] + ref["vt_2"]
    for step, w in ((0, 0.0), (DELTA - 1, 0.0), (DELTA, 1.0), (DELTA + 5000, 1.0)):
        total, parts = total_at(jnp.int32(step), emb)
        assert float(parts["w"]) == w and float(parts["w_aux"]) == 1.0
        assert_close(total, base + w * ref["local"], 2e-5, what=f"total at step {step}")
        for key in ("vv", "vt_1", "vt_2", "local"):
            assert_close(parts[key], ref[key], 2e-5, what=f"{key} at step {step}")
    assert total_at._cache_size() == 1  # step is traced, never a recompile
    assert float(objective.local_weight(7, 8)) == 0.0 and float(objective.local_weight(8, 8)) == 1.0


def test_mama_loss_switches_remove_exactly_their_term():
    emb = make_emb(np.random.default_rng(6))
    ref = np_terms(emb, LOG_SCALE, LOCAL_SCALE)
    full = ref["vv"] + ref["vt_1"] + ref["vt_2"] + ref["local"]
    off = {"use_vv": "vv", "use_second_view_clip": "vt_2", "use_local": "local"}
    for switch, term in off.items():
        # The term's inputs are not needed when it is off.
        needed = {k: v for k, v in emb.items() if not (
            (term == "vv" and k.startswith("simclr")) or (term == "vt_2" and k == "img_global_2")
            or (term == "local" and k in ("patch_1", "sent", "sent_mask")))}
        options = objective.LossOptions(**{switch: False})
        total, parts = mama_loss_jit(
            needed, step=DELTA, delta=DELTA, logit_scale=LOG_SCALE, local_scale=LOCAL_SCALE,
            options=options)
        assert float(parts[term]) == 0.0
        assert_close(total, full - ref[term], 2e-5, what=f"total without {term}")
    with pytest.raises(KeyError, match="simclr_1"):
        objective.mama_loss({k: v for k, v in emb.items() if k != "simclr_1"}, step=0, delta=1,
                         logit_scale=1.0, local_scale=1.0)


def test_mama_loss_official_options():
    emb = make_emb(np.random.default_rng(7))
    ref = np_terms(emb, LOG_SCALE, LOCAL_SCALE, directions="sum")
    options = objective.LossOptions(aux_start_step=DELTA, directions="sum")
    kwargs = dict(delta=DELTA, logit_scale=LOG_SCALE, local_scale=LOCAL_SCALE, options=options)
    # D1: before delta only L_VT(v,t) trains; D2: summed directions.
    total, parts = mama_loss_jit(emb, step=DELTA - 1, **kwargs)
    assert float(parts["w_aux"]) == 0.0 and float(parts["w"]) == 0.0
    assert_close(total, ref["vt_1"], 2e-5, what="official total before delta")
    total, parts = mama_loss_jit(emb, step=DELTA, **kwargs)
    assert_close(total, sum(ref.values()), 5e-5, what="official total at delta")
    assert_close(parts["local"], ref["local"], 2e-5, what="official (summed) local")
    # clip_directions="i2t" changes only the two CLIP terms.
    i2t = np_terms(emb, LOG_SCALE, LOCAL_SCALE, clip_directions="i2t")
    _, parts = mama_loss_jit(emb, step=0, delta=DELTA, logit_scale=LOG_SCALE,
                             local_scale=LOCAL_SCALE,
                             options=objective.LossOptions(clip_directions="i2t"))
    for key in ("vt_1", "vt_2", "vv"):
        assert_close(parts[key], i2t[key], 2e-5, what=f"i2t {key}")
    with pytest.raises(ValueError, match="directions"):
        objective.LossOptions(directions="i2t")
    assert dataclasses.is_dataclass(options)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.use_vv = False


# -------------------------------------------------------------------- sharded


def auto_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def local_loss_and_scores(sent, mask, patch, scale, mesh=None, names=None):
    """Local loss, its gradients (sent, patch, scale) and (c_v, c_t), single or sharded."""
    def loss(s, p, sc):
        return losses.local_loss(s, mask, p, sc, caption_chunk=1, mesh=mesh, data_axes=names)
    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(sent, patch, scale)
    if mesh is None:
        scores = losses.local_similarity(sent, mask, patch)
    else:
        scores = losses.sharded_local_similarity(mesh, names, sent, mask, patch)
    return value, grads, scores


def test_sharded_local_loss_equals_single_device():
    assert jax.device_count() == 8, "conftest must force 8 CPU devices"
    rng = np.random.default_rng(8)
    sent, mask, patch = local_inputs(rng, bt=16, bi=16, n_sent=3, n_patch=5, dim=8)
    sent, patch, scale = np.float32(sent), np.float32(patch), jnp.float32(LOCAL_SCALE)
    want, want_grads, want_scores = jax.jit(local_loss_and_scores)(sent, mask, patch, scale)
    # 8 devices x 2 captions (chunk 1: a 2-step loop per device), then the batch
    # split over both axes of a (4, 2) mesh.
    for shape, names in (((8,), ("data",)), ((4, 2), ("data", "fsdp"))):
        mesh = auto_mesh(shape, names)
        batch = NamedSharding(mesh, P(names))
        placed = [jax.device_put(x, batch) for x in (sent, mask, patch)]
        fn = jax.jit(lambda s, m, p, sc: local_loss_and_scores(s, m, p, sc, mesh, names))
        got, got_grads, got_scores = fn(*placed, scale)
        assert_close(got, want, 1e-6, 1e-5, what=f"sharded local loss {shape}")
        for g, w, name in zip(got_grads, want_grads, ("sent", "patch", "scale")):
            assert_close(g, w, 1e-7, 1e-5, what=f"sharded local d/d{name} {shape}")
        # Patch gradients stay with their shard (reduce-scattered, not replicated).
        assert got_grads[1].sharding.is_equivalent_to(batch, 3)
        for g, w, name in zip(got_scores, want_scores, ("c_v", "c_t")):
            assert g.shape == (16, 16)
            assert g.sharding.is_equivalent_to(NamedSharding(mesh, P(names, None)), 2)
            assert_close(g, w, 1e-6, what=f"sharded {name} {shape}")
        with pytest.raises(ValueError, match="not divisible"):
            losses.sharded_local_similarity(mesh, names, sent[:12], mask[:12], patch[:12])


def test_sharded_global_losses_use_the_global_batch():
    mesh = auto_mesh((8,), ("data",))
    emb = make_emb(np.random.default_rng(9), b=16)
    emb = {k: (np.float32(v) if v.dtype != bool else v) for k, v in emb.items()}
    placed = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in emb.items()}

    got = jax.jit(losses.clip_loss)(placed["img_global_1"], placed["txt_global"], LOG_SCALE)
    want = losses.clip_loss(emb["img_global_1"], emb["txt_global"], LOG_SCALE)
    assert_close(got, want, 1e-6, 1e-6, what="sharded clip_loss")
    # A per-device loss (2 examples, 1 negative each) would differ clearly.
    per_device = np.mean([np_clip(emb["img_global_1"][i:i + 2], emb["txt_global"][i:i + 2],
                                  LOG_SCALE, "mean") for i in range(0, 16, 2)])
    assert abs(float(got) - per_device) > 0.1

    fn = jax.jit(lambda e, mesh=None: objective.mama_loss(
        e, step=DELTA, delta=DELTA, logit_scale=LOG_SCALE, local_scale=LOCAL_SCALE,
        mesh=mesh, data_axes="data")[1], static_argnames="mesh")
    got_parts, want_parts = fn(placed, mesh=mesh), fn(emb)
    for key in ("vv", "vt_1", "vt_2", "local", "total"):
        assert_close(got_parts[key], want_parts[key], 1e-6, 1e-5, what=f"sharded mama {key}")


def test_per_device_negatives_average_each_slice():
    """D3 official option: each device's CLIP / local loss uses only its own slice."""
    from jax.sharding import NamedSharding

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(7)
    B, d, S, Pn = 16, 8, 3, 5
    emb = {"img_global_1": rng.normal(size=(B, d)), "img_global_2": rng.normal(size=(B, d)),
           "txt_global": rng.normal(size=(B, d)), "simclr_1": rng.normal(size=(B, d)),
           "simclr_2": rng.normal(size=(B, d)), "patch_1": rng.normal(size=(B, Pn, d)),
           "sent": rng.normal(size=(B, S, d)), "sent_mask": rng.random((B, S)) < 0.8}
    emb["sent_mask"][:, 0] = True
    emb = {k: jax.device_put(jnp.asarray(v, jnp.bool_ if k == "sent_mask" else jnp.float32),
                             NamedSharding(mesh, P("data")))
           for k, v in emb.items()}
    opts = objective.LossOptions(negatives="per_device")
    _, parts = jax.jit(lambda e: objective.mama_loss(e, step=10, delta=0, logit_scale=1.0,
                                                  local_scale=1.5, options=opts, mesh=mesh,
                                                  data_axes="data"))(emb)
    host = {k: np.asarray(v) for k, v in emb.items()}
    slices = [slice(2 * i, 2 * i + 2) for i in range(8)]
    want_vt = np.mean([losses.clip_loss(host["img_global_1"][s], host["txt_global"][s], 1.0)
                       for s in slices])
    want_local = np.mean([losses.local_loss(host["sent"][s], host["sent_mask"][s],
                                            host["patch_1"][s], 1.5) for s in slices])
    global_vt = losses.clip_loss(host["img_global_1"], host["txt_global"], 1.0)
    np.testing.assert_allclose(parts["vt_1"], want_vt, rtol=1e-5)
    np.testing.assert_allclose(parts["local"], want_local, rtol=1e-5)
    assert abs(float(parts["vt_1"]) - float(global_vt)) > 1e-3  # really a different loss
    np.testing.assert_allclose(parts["vv"], losses.nt_xent_loss(host["simclr_1"], host["simclr_2"]),
                               rtol=1e-5)  # NT-Xent stays global
