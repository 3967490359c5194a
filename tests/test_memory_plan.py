"""benchmarks/memory_plan.py: sizes come from the real model, the activation formula agrees
with XLA, and the plan shards the state over fsdp when a replicated copy does not fit."""

import os
import sys

import jax
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import memory_plan as mp  # noqa: E402
from mama_jax import optim, sharding  # noqa: E402
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
    tx = optim.make_optimizer(mp._Fields(dict(tiny.state.optim_cfg, grad_accum=2)), trainable,
                              local_group=mama.LOCAL_GROUP, local_start=tiny.state.delta)
    assert mp.count(tiny.state.opt_state(2)) == sum(x.size for x in jax.tree.leaves(tx.init(trainable)))
    # grad_accum adds MultiSteps' accumulator: one more copy of the trainable state.
    assert mp.count(tiny.state.opt_state(2)) >= mp.count(tiny.state.opt_state(1)) + mp.count(trainable)


def test_activation_formula_is_close_to_xla(tiny):
    r = mp.xla_check(tiny.state, tiny.image_size, tiny.max_length, batch=2, remat=True)
    assert r["xla_temp"] > 0
    assert 1 / 3 < r["ratio"] < 3, r
    # Remat keeps less per sample than no remat, and the ViT attention dominates a layer.
    assert tiny.act[True]["saved_per_sample"] < tiny.act[False]["saved_per_sample"]


def test_plan_shards_over_fsdp_when_replicated_state_does_not_fit(tiny):
    batch, fraction = 16, 0.75
    whole = mp.plan_one(tiny, 2, 1, batch, 1, False, 1.0, fraction)
    split = mp.plan_one(tiny, 1, 2, batch, 1, False, 1.0, fraction)
    assert split.total_gib < whole.total_gib
    gpu = (whole.total_gib + split.total_gib) / 2 / fraction
    best = mp.best_plan(mp.candidates(tiny, 2, batch, gpu, fraction))
    assert best is not None and best.fits
    assert (best.fsdp, best.grad_accum, best.remat) == (2, 1, False)
    # With room to spare the replicated layout (no fsdp traffic) wins.
    roomy = mp.best_plan(mp.candidates(tiny, 2, batch, 2 * whole.total_gib / fraction, fraction))
    assert roomy.fsdp == 1
    with pytest.raises(ValueError, match="does not split"):
        mp.plan_one(tiny, 2, 1, 15, 1, False, 1.0, fraction)
