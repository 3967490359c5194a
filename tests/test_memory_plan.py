"""benchmarks/memory_model.py (printed by memory_plan.py): sizes come from the real model, the activation formula agrees
with XLA, micro-batches trade tower activations for the cache, and the plan shards the state
over fsdp when a replicated copy does not fit."""

import math
import os
import re
import sys

import jax
import ml_collections
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import memory_model as mp  # noqa: E402
from configs import pretrain  # noqa: E402
from mama_jax.train import optim, sharding  # noqa: E402
from mama_jax.models import mama  # noqa: E402

# Tiny ViT; an LM 16 x 256 with BioMedLM's 28,896-row embedding, so that fsdp splits its
# stacked blocks and embedding (min 2**18 elements) and a split saves more than it gathers.
SIZE = dict(vit_preset="tiny", image_size=56, text_layers=16, text_hidden=256, text_heads=2,
            max_length=32)


@pytest.fixture(scope="module")
def tiny():
    state, size = mp.small_state(**SIZE)
    return mp.Workload.build(state, size["image_size"], size["max_length"])


def test_parameter_counts_match_the_real_model(tiny):
    # Real arrays, same config (initialised in one jit: eager init is slow on a CPU).
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: mama.MaMA(tiny.state.mcfg, rngs=nnx.Rngs(0))))
    real = nnx.merge(graphdef, jax.jit(lambda: nnx.state(mama.MaMA(tiny.state.mcfg, rngs=nnx.Rngs(0))))())
    _, trainable, rest = nnx.split(real, mama.trainable_filter(real.cfg), ...)
    assert len(jax.tree.leaves(nnx.state(real))) == (len(jax.tree.leaves(tiny.state.trainable))
                                                      + len(jax.tree.leaves(tiny.state.rest)))
    assert mp.count(tiny.state.trainable) == sum(x.size for x in jax.tree.leaves(trainable))
    assert mp.count(tiny.state.rest) == sum(x.size for x in jax.tree.leaves(rest))
    assert mp.bytes_per_device(tiny.state.rest, 1) == sum(x.nbytes for x in jax.tree.leaves(rest))
    # On a real 2-device fsdp mesh, device 0 holds what the plan says (and less than all).
    mesh = sharding.make_mesh(1, 2, devices=jax.devices()[:2])
    placed = jax.device_put(rest, sharding.state_shardings(rest, mesh))
    on_device_0 = sum(next(s.data.nbytes for s in x.addressable_shards if s.device == mesh.devices.flat[0])
                      for x in jax.tree.leaves(placed))
    assert mp.bytes_per_device(tiny.state.rest, 2) == on_device_0 < mp.bytes_per_device(tiny.state.rest, 1)


def test_optimizer_state_is_mu_and_nu(tiny):
    # The plan counts AdamW's moments as 2 x the trainable state; the real optimizer (the
    # local heads with their own late-start Adam) keeps that plus a few step counters.
    tx = optim.make_optimizer(ml_collections.ConfigDict(tiny.state.optim_cfg), tiny.state.trainable,
                              late_groups=[(mama.LOCAL_GROUP, tiny.state.delta)])
    real = jax.eval_shape(tx.init, tiny.state.trainable)
    planned = tiny.state.opt_state
    assert mp.count(planned) == 2 * mp.count(tiny.state.trainable)
    assert 0 <= mp.count(real) - mp.count(planned) <= 16
    assert 0 <= mp.nbytes(real) - mp.nbytes(planned) <= 64
    assert mp.bytes_per_device(planned, 2) == 2 * mp.bytes_per_device(tiny.state.trainable, 2)


def test_activation_formula_is_close_to_xla(tiny):
    for k in (1, 2):
        r = mp.xla_check(tiny, batch=2 * k, remat=True, micro_batches=k)
        assert r["xla_temp"] > 0
        assert 1 / 3 < r["ratio"] < 3, r
    r = mp.xla_check_heads(tiny, batch=16)
    assert r["xla_temp"] > 0 and 1 / 3 < r["ratio"] < 3, r
    # Remat keeps less per sample than no remat.
    assert tiny.towers[True]["saved_per_sample"] < tiny.towers[False]["saved_per_sample"]


def test_micro_batches_trade_tower_activations_for_the_cache(tiny):
    batch, per_device = 16, 8  # over 2 devices
    one = mp.plan_one(tiny, 2, 1, batch, 1, True, 1.0, 0.75)
    two = mp.plan_one(tiny, 2, 1, batch, 2, True, 1.0, 0.75)
    assert (one.per_device_batch, one.micro_batch) == (per_device, per_device)
    assert (two.per_device_batch, two.micro_batch) == (per_device, per_device // 2)
    # The cache is the real tower_features outputs of the whole per-device batch, x 2 for
    # their gradients; the one-pass step has none.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: mama.MaMA(tiny.state.mcfg, rngs=nnx.Rngs(0))))
    images = jax.ShapeDtypeStruct((per_device, tiny.image_size, tiny.image_size, 3), "float32")
    tokens = jax.ShapeDtypeStruct((per_device, tiny.max_length), "int32")
    feats = jax.eval_shape(
        lambda s, b: nnx.merge(graphdef, s).tower_features(b, train=True, rngs=nnx.Rngs(dropout=0)),
        state, {"view1": images, "view2": images, "input_ids": tokens, "attention_mask": tokens})
    assert set(feats) == {"pooled_1", "pooled_2", "patch_1", "text_pooled", "sent_in", "sent_mask"}
    feature_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(feats))
    assert two.parts["cache"] * mp.GIB == pytest.approx(2 * feature_bytes, rel=1e-12)
    assert one.parts["cache"] == 0
    # Only one micro-batch's tower activations exist; the heads still see the whole batch.
    assert two.parts["towers"] < one.parts["towers"]
    assert two.parts["heads"] <= one.parts["heads"]
    assert two.parts["towers"] + two.parts["heads"] < one.parts["towers"] + one.parts["heads"]
    # Besides the summed gradients, one micro-batch's tower gradients (ViT + LoRA, fp32).
    tower_params = sum(x.size * x.dtype.itemsize for name in ("vision", "text")
                       for x in jax.tree.leaves(tiny.state.trainable[name]))
    assert (two.parts["grads"] - one.parts["grads"]) * mp.GIB == pytest.approx(tower_params, rel=1e-9)
    assert two.parts["local_loss"] == one.parts["local_loss"]  # always the whole global batch
    with pytest.raises(ValueError, match="does not split"):
        mp.plan_one(tiny, 2, 1, batch, 3, True, 1.0, 0.75)  # 8 per device in 3 micro-batches


def test_plan_takes_the_fewest_micro_batches_that_fit(tiny):
    batch, fraction = 64, 0.75
    one = mp.plan_one(tiny, 1, 1, batch, 1, True, 1.0, fraction)
    two = mp.plan_one(tiny, 1, 1, batch, 2, True, 1.0, fraction)
    assert two.total_gib < one.total_gib
    gpu = (one.total_gib + two.total_gib) / 2 / fraction
    best = mp.best_plan(mp.candidates(tiny, 1, batch, gpu, fraction))
    assert (best.micro_batches, best.micro_batch) == (2, batch // 2)
    # The command runs that plan with flags configs/pretrain.py knows.
    cmd = mp.command(best, fraction, {"image_size": tiny.image_size})
    assert "--config.train.micro_batches=2" in cmd and "--config.mesh.fsdp=1" in cmd
    assert "--config.data.global_batch_size=64" in cmd and "--config.data.image_size=56" in cmd
    cfg = pretrain.get_config()
    for section, key in re.findall(r"--config\.(\w+)\.(\w+)=", cmd):
        assert key in cfg[section], (section, key)


def test_plan_shards_over_fsdp_when_replicated_state_does_not_fit(tiny):
    batch, fraction = 16, 0.75
    whole = mp.plan_one(tiny, 2, 1, batch, 1, False, 1.0, fraction)
    split = mp.plan_one(tiny, 1, 2, batch, 1, False, 1.0, fraction)
    assert split.total_gib < whole.total_gib
    gpu = (whole.total_gib + split.total_gib) / 2 / fraction
    best = mp.best_plan(mp.candidates(tiny, 2, batch, gpu, fraction))
    assert best is not None and best.fits
    assert (best.fsdp, best.micro_batches, best.remat) == (2, 1, False)
    # With room to spare the replicated layout (no fsdp traffic) wins.
    roomy = mp.best_plan(mp.candidates(tiny, 2, batch, 2 * whole.total_gib / fraction, fraction))
    assert roomy.fsdp == 1
    with pytest.raises(ValueError, match="does not split"):
        mp.plan_one(tiny, 2, 1, 15, 1, False, 1.0, fraction)
