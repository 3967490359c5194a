"""Exact accumulation (mama_jax/train/grad_cache.py): k micro-batches give the one-pass step's loss,
gradients and update on the same global batch, with text dropout on, on 1 device and on
8 (data 8, and data 4 x fsdp 2)."""

import jax
import numpy as np
import pytest

from configs import demo
from mama_jax import factory
from mama_jax.train import grad_cache, pretrain, sharding
from mama_jax.input import pipeline
from tests.tolerances import assert_adam_first_step_close, assert_grads_close, flat

K = 4


def _config(dataset_dir, global_batch):
    cfg = demo.get_config("test")
    cfg.data.dataset_dir = dataset_dir
    cfg.data.global_batch_size = global_batch
    cfg.loss.delta = 0  # the local loss (and its BatchNorm over the batch) from the first step
    cfg.optim.init_lr = cfg.optim.lr  # the first update moves by lr, not warm-up's 1e-8
    return cfg


@pytest.fixture(scope="module")
def tokenizer(tiny_dataset, tmp_path_factory):
    return factory.tokenizer(_config(tiny_dataset, 16), str(tmp_path_factory.mktemp("tok")))


def test_split_micro_takes_every_devices_block_and_join_undoes_it():
    rows = np.arange(16)
    micro = np.asarray(grad_cache.split_micro(rows, 2, 4))  # 4 devices hold rows [4d, 4d+4)
    np.testing.assert_array_equal(micro, [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]])
    np.testing.assert_array_equal(grad_cache.join_micro(micro, 4), rows)
    images = np.arange(16 * 3).reshape(16, 3)
    np.testing.assert_array_equal(grad_cache.join_micro(grad_cache.split_micro(images, 4, 2), 2),
                                  images)


def test_micro_batches_must_split_into_whole_per_device_batches(tiny_dataset, tokenizer):
    with pytest.raises(ValueError, match="config.train.micro_batches=4"):
        grad_cache.check_micro_batches(16, 4, 8)
    cfg = _config(tiny_dataset, 16)
    cfg.train.micro_batches = 3
    with pytest.raises(ValueError, match="global_batch_size=16"):
        pretrain.Run.create(cfg, factory.model(cfg, tokenizer), sharding.make_mesh(1, 1, jax.devices()[:1]))


@pytest.mark.parametrize("devices, fsdp, global_batch", [(1, 1, 16), (8, 1, 32), (8, 2, 32)],
                         ids=["1-device", "data8", "data4-fsdp2"])
def test_k_micro_batches_equal_the_one_pass_step(tiny_dataset, tokenizer, devices, fsdp,
                                                 global_batch):
    """On 8 devices each micro-batch needs one sample per device: global batch 32 there."""
    cfg = _config(tiny_dataset, global_batch)
    mesh = sharding.make_mesh(devices // fsdp, fsdp, devices=jax.devices()[:devices])
    batch = next(pipeline.train_iterator(factory.data_config(cfg), tokenizer))
    batch = sharding.shard_batch({k: batch[k] for k in pretrain.STEP_INPUTS}, mesh)
    key = jax.random.key(11)
    assert factory.model(cfg, tokenizer).text.cfg.uses_dropout

    results = {}
    for k in (1, K):
        cfg.train.micro_batches = k
        run = pretrain.Run.create(cfg, factory.model(cfg, tokenizer), mesh)
        total, parts, grads = run.loss_and_grads(batch, 0, key)
        out = run.step(batch, 0, key)
        results[k] = dict(total=float(total), step_total=float(out["total"]),
                          local=float(parts["local"]), grads=flat(grads),
                          params=flat(run.trainable), lr=float(out["lr"]),
                          stats={n: v for n, v in flat(run.rest).items()
                                 if n.endswith(("/mean", "/var"))})
    one, acc = results[1], results[K]
    assert one["local"] > 0 and np.isfinite(one["total"])
    assert acc["total"] == pytest.approx(one["total"], rel=1e-5)
    assert acc["step_total"] == pytest.approx(one["step_total"], rel=1e-5)
    assert acc["step_total"] == pytest.approx(acc["total"], rel=1e-5)
    assert_grads_close(acc["grads"], one["grads"])
    assert one["lr"] == pytest.approx(cfg.optim.lr)
    assert_adam_first_step_close(acc["params"], one["params"], one["grads"], lr=one["lr"])
    # The heads' BatchNorm statistics are the whole batch's (each micro-batch's own under
    # independent accumulation); 0.1 x the batch mean and variance enter the running ones.
    assert one["stats"].keys() == acc["stats"].keys() and any("txt_local" in n for n in one["stats"])
    for name, value in one["stats"].items():
        np.testing.assert_allclose(acc["stats"][name], value, rtol=1e-5, atol=1e-7, err_msg=name)
