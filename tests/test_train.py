"""Pretraining: sharded step == single device, LoRA trains / base frozen, resume, SIGTERM, NaN."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from mama_jax import checkpoint, data, factory, optim, sharding, train
from mama_jax.models import mama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(dataset_dir, **train_overrides):
    cfg = demo.get_config("test")
    cfg.data.dataset_dir = dataset_dir
    cfg.train.update(train_overrides)
    return cfg


@pytest.fixture(scope="module")
def setup(tiny_dataset, tmp_path_factory):
    cfg = _config(tiny_dataset)
    tok = factory.tokenizer(cfg, str(tmp_path_factory.mktemp("work")))
    batch = next(data.train_iterator(factory.data_config(cfg), tok))
    return cfg, tok, {k: batch[k] for k in train.STEP_INPUTS}


def _flat(state):
    return {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(state)}


def _run_steps(cfg, tok, batch, mesh, n):
    run = train.Run.create(cfg, factory.model(cfg, tok), mesh)
    before = _flat(nnx.state(run.model()))
    outs = [run.step(sharding.shard_batch(batch, mesh), i, jax.random.key(i)) for i in range(n)]
    return [float(o["total"]) for o in outs], before, _flat(nnx.state(run.model()))


def test_sharded_step_equals_single_device(setup):
    cfg, tok, batch = setup
    one = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    eight = sharding.make_mesh(4, 2)  # batch over data x fsdp, parameters split over fsdp
    loss_1, _, after_1 = _run_steps(cfg, tok, batch, one, 1)
    loss_8, _, after_8 = _run_steps(cfg, tok, batch, eight, 1)
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
    assert after_1.keys() == after_8.keys()
    for name in after_1:
        np.testing.assert_allclose(after_8[name], after_1[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_lora_trains_and_the_decoder_base_stays_bit_identical(setup):
    cfg, tok, batch = setup
    cfg = cfg.copy_and_resolve_references()
    cfg.model.train_text_base = False  # the paper's setting (the demo trains its tiny decoder)
    losses, before, after = _run_steps(cfg, tok, batch, sharding.make_mesh(1, 1, jax.devices()[:1]), 3)
    assert all(np.isfinite(losses))
    lora = [k for k in before if k.startswith("text/") and ("lora_a" in k or "lora_b" in k)]
    base = [k for k in before if k.startswith("text/") and k not in lora]
    assert lora and base
    for k in lora:
        assert not np.array_equal(before[k], after[k]), f"{k} did not train"
    for k in base:
        assert np.array_equal(before[k], after[k]), f"frozen {k} changed"
    # D8: local heads and the local temperature do not move before delta (= 2 here).
    frozen_until_delta = [k for k in before if k.split("/")[0] in mama.LOCAL_GROUP
                          and "batch_stats" not in k and not k.endswith(("mean", "var"))]
    assert frozen_until_delta
    # ViT trains; its final norm and mask token never do.
    assert not np.array_equal(before["vision/patch_embed/kernel"], after["vision/patch_embed/kernel"])
    assert np.array_equal(before["vision/norm/scale"], after["vision/norm/scale"])


def _main(workdir, dataset_dir, *overrides):
    return [sys.executable, "-m", "mama_jax.main", "--config=configs/demo.py:test",
            f"--workdir={workdir}", f"--config.data.dataset_dir={dataset_dir}", *overrides]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return env


def _lines(path):
    return sum(1 for _ in open(path)) if path.exists() else 0


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(0.02)
    return False


def test_resume_after_sigkill_and_sigterm_reproduces_the_straight_run(tiny_dataset, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_main(straight, tiny_dataset), check=True, cwd=ROOT, env=_env(),
                   capture_output=True, timeout=600)
    expected = train.per_step_losses(str(straight))
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]

    # Killed hard right after the step-3 checkpoint is committed.
    resumed = tmp_path / "resumed"
    ckpt_dir = resumed / "checkpoints" / "3"
    proc = subprocess.Popen(_main(resumed, tiny_dataset, "--config.train.steps=1000"), cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(ckpt_dir.exists, proc), "no step-3 checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Whatever it managed after step 3 is dropped, so the resume starts exactly there.
    for entry in (resumed / "checkpoints").iterdir():
        if entry.name.isdigit() and int(entry.name) > 3:
            shutil.rmtree(entry)
    lines_before = _lines(resumed / "metrics.jsonl")

    # Resumed, then stopped with SIGTERM once past step 6: it saves where it is.
    proc = subprocess.Popen(_main(resumed, tiny_dataset, "--config.train.steps=1000",
                                  "--config.train.checkpoint_every=1000"),
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)

    def past_six():  # steps 4, 5, 6 logged by this process
        return _lines(resumed / "metrics.jsonl") >= lines_before + 3

    assert _wait_for(past_six, proc), "resumed run did not reach step 6"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    logged = train.per_step_losses(str(resumed))
    for step in range(1, 7):
        assert logged[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step
    latest = checkpoint.Checkpointer(str(resumed / "checkpoints")).latest_step()
    assert latest == max(logged) and latest >= 6


@pytest.mark.parametrize("checkpoint_every, last_good", [(1, 2), (4, None)])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dataset, tmp_path,
                                                                  monkeypatch, checkpoint_every,
                                                                  last_good):
    """Step 3 gives NaN. Every 4 steps: the loop reads step 3's loss after it has queued
    step 4, and must still stop before step 4's checkpoint."""
    real_step = train.Run.step

    def poisoned(self, global_batch, opt_step, key):
        out = real_step(self, global_batch, opt_step, key)
        return dict(out, total=out["total"] * np.nan) if opt_step == 2 else out

    monkeypatch.setattr(train.Run, "step", poisoned)
    cfg = _config(tiny_dataset, checkpoint_every=checkpoint_every, log_every=100)
    with pytest.raises(train.NonFiniteLossError, match="step 3: loss is nan"):
        train.train(cfg, str(tmp_path))
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == last_good


def test_missing_dataset_dir_names_the_field(tmp_path):
    cfg = demo.get_config("test")
    with pytest.raises(factory.ConfigError, match="config.data.dataset_dir"):
        train.train(cfg, str(tmp_path))


def test_unknown_config_key_is_rejected(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mama_jax.main", "--config=configs/demo.py",
                           f"--workdir={tmp_path}", "--config.optim.learning_rate=1e-3"],
                          cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode != 0
    assert b"learning_rate" in proc.stderr


def test_grad_accumulation_applies_the_mean_gradient_every_k_steps():
    cfg = demo.get_config("test")
    params = {"w": jnp.asarray([0.5, -1.0, 2.0]), "bias": jnp.zeros(3)}
    grads = [{"w": jnp.asarray([1.0, 2.0, 3.0]), "bias": jnp.ones(3)},
             {"w": jnp.asarray([3.0, 0.0, -1.0]), "bias": -jnp.ones(3)}]
    cfg.optim.grad_accum = 1
    plain = optim.make_optimizer(cfg.optim, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    expected, _ = plain.update(mean, plain.init(params), params)
    cfg.optim.grad_accum = 2
    accum = optim.make_optimizer(cfg.optim, params)
    state = accum.init(params)
    first, state = accum.update(grads[0], state, params)
    assert all(not np.any(u) for u in jax.tree.leaves(first))  # nothing moves mid-accumulation
    second, state = accum.update(grads[1], state, params)
    for got, want in zip(jax.tree.leaves(second), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
