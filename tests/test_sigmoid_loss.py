"""The sigmoid (SigLIP) image-text loss, loss.clip_kind="sigmoid".

Against a float64 numpy re-derivation with explicit loops (value and finite-difference
gradients); the ring of 8 devices (tests/conftest.py forces 8 CPU devices) against one
device; the compiled ring holding only [B/n, B/n] logits blocks; and a few pretraining
steps with the option on.
"""
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from configs import demo
from mama_jax import factory, losses, losses_sigmoid, objective, run_model
from mama_jax.train import metrics_log, optim, pretrain
from mama_jax.models import mama, text, vit
from tests import tolerances
from tests.loss_reference import assert_close, np_finite_diff

SIGLIP_INIT = (math.log(10.0), -10.0)
# Away from the init the negatives' sigmoids are not saturated, so d/db is not tiny.
MIDWAY = (1.3, -2.5)


def np_sigmoid_loss(img, txt, log_scale, bias):
    """Zhai et al. 2023, Algorithm 1: -1/|B| Σ_i Σ_j log σ(z_ij (t x_i·y_j + b)), t = e^t'."""
    b = img.shape[0]
    x = [v / np.linalg.norm(v) for v in img]
    y = [v / np.linalg.norm(v) for v in txt]
    total = 0.0
    for i in range(b):
        for j in range(b):
            z = 1.0 if i == j else -1.0
            u = z * (np.exp(log_scale) * (x[i] @ y[j]) + bias)
            total += np.logaddexp(0.0, -u)  # -log σ(u), stable in float64
    return total / b


def auto_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def embeddings(rng, batch, dim):
    return rng.normal(size=(batch, dim)), rng.normal(size=(batch, dim))


# ------------------------------------------------------------ numpy reference


@pytest.mark.parametrize("scale_bias", [SIGLIP_INIT, MIDWAY], ids=["siglip_init", "midway"])
def test_sigmoid_loss_matches_numpy_value_and_grads(scale_bias):
    img, txt = embeddings(np.random.default_rng(0), 6, 8)
    log_scale, bias = scale_bias
    want = np_sigmoid_loss(img, txt, log_scale, bias)
    got, grads = jax.jit(jax.value_and_grad(losses_sigmoid.sigmoid_loss, argnums=(0, 1, 2, 3)))(
        jnp.float32(img), jnp.float32(txt), jnp.float32(log_scale), jnp.float32(bias))
    # float32 sums 36 terms of size <= ~20: about 1e-6 relative rounding.
    assert_close(got, want, 0.0, 1e-5, what="sigmoid value")
    want_grads = np_finite_diff(np_sigmoid_loss, [img, txt, np.array(log_scale), np.array(bias)])
    for g, w, name in zip(grads, want_grads, ("img", "txt", "t'", "b")):
        # Relative to the array's largest entry: float32 rounding scales with it, and
        # central differences in float64 (h = 1e-6) are exact to ~1e-9.
        assert_close(g, w, 1e-4 * float(np.max(np.abs(w))), 1e-4, what=f"sigmoid d/d{name}")


def test_sigmoid_loss_is_the_mean_over_images_of_the_sum_over_texts():
    """The paper's normalisation, 1/|B| (not 1/|B|²): a batch of two copies of the same
    pairs keeps each image's positive and doubles its negatives."""
    img, txt = embeddings(np.random.default_rng(1), 4, 5)
    one = losses_sigmoid.sigmoid_loss(img, txt, *MIDWAY)
    both = losses_sigmoid.sigmoid_loss(np.concatenate([img, img]), np.concatenate([txt, txt]),
                                       *MIDWAY)
    logits = np.exp(MIDWAY[0]) * (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (
        txt / np.linalg.norm(txt, axis=1, keepdims=True)).T + MIDWAY[1]
    # Each image gains its own text again as a negative, plus every other text once more.
    extra = np.mean(np.sum(np.logaddexp(0.0, logits), axis=1))
    assert_close(both, one + extra, 1e-5, 1e-5, what="doubled batch")


def test_sigmoid_loss_bad_input():
    img, txt = embeddings(np.random.default_rng(2), 4, 5)
    with pytest.raises(ValueError, match="text_emb"):
        losses_sigmoid.sigmoid_loss(img, txt[:3], *SIGLIP_INIT)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        losses_sigmoid.sharded_sigmoid_loss(auto_mesh((8,), ("data",)), "data", img, txt,
                                            *SIGLIP_INIT)


# ------------------------------------------------------------ the ring


def _value_and_grads(fn, img, txt, scale_bias):
    grad_fn = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
    out = grad_fn(img, txt, *map(jnp.float32, scale_bias))
    return float(out[0]), [np.asarray(g, np.float64) for g in out[1]]


@pytest.mark.parametrize("shape,names", [((8,), ("data",)), ((4, 2), ("data", "fsdp"))])
def test_ring_of_8_devices_equals_one_device(shape, names):
    assert jax.device_count() == 8, "conftest must force 8 CPU devices"
    img, txt = embeddings(np.random.default_rng(3), 16, 8)
    mesh = auto_mesh(shape, names)
    placed = [jax.device_put(jnp.float32(x), NamedSharding(mesh, P(names))) for x in (img, txt)]
    want, want_grads = _value_and_grads(losses_sigmoid.sigmoid_loss, jnp.float32(img),
                                        jnp.float32(txt), MIDWAY)
    got, got_grads = _value_and_grads(
        lambda i, t, s, b: losses_sigmoid.sharded_sigmoid_loss(mesh, names, i, t, s, b),
        *placed, MIDWAY)
    # The same sums in another order: rounding only.
    assert_close(got, want, 0.0, tolerances.GRAD_RTOL, what="ring value")
    names_ = ("img", "txt", "t'", "b")
    tolerances.assert_grads_close(dict(zip(names_, got_grads)), dict(zip(names_, want_grads)))
    # Each device alone (2 pairs) would give a clearly different loss.
    alone = np.mean([np_sigmoid_loss(img[k:k + 2], txt[k:k + 2], *MIDWAY) for k in range(0, 16, 2)])
    assert abs(got - alone) > 0.1


def test_ring_holds_only_blocks_of_the_logits():
    """The compiled loss and gradient on 8 devices: [B/n, B/n] logit blocks passed by
    collective-permute; no [B, B] or [B/n, B] logits, no all-gather of the texts."""
    batch, dim, n = 32, 24, 8  # distinct sizes, so a shape names what it is
    mesh = auto_mesh((n,), ("data",))
    fn = jax.jit(jax.value_and_grad(
        lambda i, t, s, b: losses_sigmoid.sharded_sigmoid_loss(mesh, "data", i, t, s, b),
        argnums=(0, 1, 2, 3)))
    spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    hlo = fn.lower(spec, spec, scalar, scalar).compile().as_text()
    shapes = set(re.findall(r"f32\[(\d+),(\d+)\]", hlo))
    local = batch // n
    assert (str(local), str(local)) in shapes, sorted(shapes)
    for rows, cols in ((batch, batch), (local, batch), (batch, local)):
        assert (str(rows), str(cols)) not in shapes, f"f32[{rows},{cols}] in {sorted(shapes)}"
    assert (str(batch), str(dim)) not in shapes  # no device gathers every embedding
    assert "collective-permute" in hlo and "all-gather" not in hlo


# ------------------------------------------------------------ eq. 4 wiring


def _emb(rng, batch):
    d, sentences, patches = 8, 3, 5
    emb = {k: rng.normal(size=(batch, d)) for k in
           ("img_global_1", "img_global_2", "txt_global", "simclr_1", "simclr_2")}
    emb.update(patch_1=rng.normal(size=(batch, patches, d)),
               sent=rng.normal(size=(batch, sentences, d)),
               sent_mask=np.ones((batch, sentences), bool))
    return {k: jnp.asarray(v) if v.dtype == bool else jnp.float32(v) for k, v in emb.items()}


def test_mama_loss_sigmoid_replaces_both_clip_terms_on_and_off_the_mesh():
    emb = _emb(np.random.default_rng(4), 16)
    sigmoid = objective.LossOptions(clip_kind="sigmoid")
    mesh = auto_mesh((8,), ("data",))
    placed = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in emb.items()}

    def parts(e, options, mesh=None):
        return objective.mama_loss(e, step=0, delta=10, logit_scale=MIDWAY[0], local_scale=1.0,
                                logit_bias=MIDWAY[1], options=options, mesh=mesh,
                                data_axes="data")[1]

    one = jax.jit(lambda e: parts(e, sigmoid))(emb)
    ring = jax.jit(lambda e: parts(e, sigmoid, mesh))(placed)
    softmax = jax.jit(lambda e: parts(e, objective.LossOptions()))(emb)
    for key, images in (("vt_1", "img_global_1"), ("vt_2", "img_global_2")):
        want = np_sigmoid_loss(np.asarray(emb[images]), np.asarray(emb["txt_global"]), *MIDWAY)
        assert_close(one[key], want, 0.0, 1e-5, what=key)
        assert_close(ring[key], want, 0.0, 1e-5, what=f"ring {key}")
        assert abs(float(softmax[key]) - want) > 0.1
    assert_close(one["vv"], softmax["vv"], 0.0, 1e-6, what="L_VV unchanged")
    # The official per-device negatives (D3) apply to the sigmoid terms too.
    official = objective.LossOptions(clip_kind="sigmoid", negatives="per_device")
    per_device = jax.jit(lambda e: parts(e, official, mesh))(placed)
    host = {k: np.asarray(v) for k, v in emb.items()}
    want = np.mean([np_sigmoid_loss(host["img_global_1"][k:k + 2], host["txt_global"][k:k + 2],
                                    *MIDWAY) for k in range(0, 16, 2)])
    assert_close(per_device["vt_1"], want, 0.0, 1e-5, what="per-device vt_1")
    with pytest.raises(ValueError, match="logit_bias"):
        objective.mama_loss(emb, step=0, delta=10, logit_scale=1.0, local_scale=1.0, options=sigmoid)


def test_unknown_or_conflicting_clip_kind_names_the_field():
    cfg = demo.get_config("test")
    assert cfg.loss.clip_kind == "softmax" and factory.loss_options(cfg).clip_kind == "softmax"
    cfg.loss.clip_kind = "hinge"
    with pytest.raises(factory.ConfigError, match=r"config\.loss\.clip_kind='hinge'"):
        factory.loss_options(cfg)
    cfg.loss.clip_kind, cfg.loss.clip_directions = "sigmoid", "i2t"
    with pytest.raises(factory.ConfigError, match=r"config\.loss\.clip_directions"):
        factory.loss_options(cfg)
    with pytest.raises(ValueError, match="clip_kind"):
        objective.LossOptions(clip_kind="hinge")
    assert mama.CLIP_KINDS == losses.CLIP_KINDS


# ------------------------------------------------------------ the model and its record


def _tiny_model_config(clip_kind):
    return mama.MaMAConfig(vit=vit.vit_config("tiny"), text=text.text_config("tiny"), sep_id=3,
                           embed_dim=16, local_hidden=16, simclr_out=16, clip_kind=clip_kind)


def test_only_sigmoid_models_carry_the_siglip_bias_and_it_is_not_decayed():
    softmax = run_model.abstract_model(_tiny_model_config("softmax"))
    assert not hasattr(softmax, "logit_bias")
    model = mama.MaMA(_tiny_model_config("sigmoid"), rngs=nnx.Rngs(0))
    assert float(model.logit_scale[...]) == pytest.approx(math.log(10.0))
    assert float(model.logit_bias[...]) == -10.0
    assert float(model.local_scale[...]) == pytest.approx(math.log(1 / 0.07))  # unchanged
    _, trainable, _ = nnx.split(model, mama.trainable_filter(model.cfg), ...)
    assert "logit_bias" in trainable
    decay = optim.decay_mask(trainable)
    assert not decay["logit_bias"].get_value() and not decay["logit_scale"].get_value()


def test_model_record_keeps_clip_kind_and_old_records_still_resume(tmp_path):
    mcfg = _tiny_model_config("sigmoid")
    described = mama.config_to_dict(mcfg)
    assert described["mama"]["clip_kind"] == "sigmoid"
    assert mama.config_from_dict(json.loads(json.dumps(described))) == mcfg
    # A run recorded before the option (no clip_kind in model.json) trained softmax terms:
    # resuming it with the softmax model is accepted, with the sigmoid one refused.
    old = mama.config_to_dict(_tiny_model_config("softmax"))
    del old["mama"]["clip_kind"]
    os.makedirs(run_model.folder(str(tmp_path)))
    with open(os.path.join(run_model.folder(str(tmp_path)), run_model.CONFIG_FILE), "w") as f:
        json.dump(old, f)
    run_model.write(str(tmp_path), _tiny_model_config("softmax"), tok=None)
    assert run_model.read_config(str(tmp_path)).clip_kind == "softmax"
    with pytest.raises(run_model.RunModelError, match="another architecture"):
        run_model.write(str(tmp_path), mcfg, tok=None)


# ------------------------------------------------------------ end to end


def test_a_few_sigmoid_pretraining_steps_train_and_record_the_bias(tiny_dataset, tmp_path):
    cfg = demo.get_config("test")
    cfg.data.dataset_dir = tiny_dataset
    cfg.loss.clip_kind = "sigmoid"
    cfg.train.update(dict(steps=3, checkpoint_every=3))
    workdir = str(tmp_path / "run")
    pretrain.train(cfg, workdir)  # 8 forced devices: the ring has 7 hops
    rows = metrics_log.read_metrics(workdir)
    assert sorted(rows) == [1, 2, 3]
    for row in rows.values():
        assert all(math.isfinite(row[k]) for k in ("total", "vt_1", "vt_2", "logit_bias"))
    assert rows[1]["logit_bias"] != rows[3]["logit_bias"]  # the bias trains
    assert run_model.read_config(workdir).clip_kind == "sigmoid"
    assert hasattr(run_model.abstract_model(run_model.read_config(workdir)), "logit_bias")
