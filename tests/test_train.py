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
from mama_jax import factory
from mama_jax.train import checkpoint, loop, metrics_log, optim, pretrain, sharding
from mama_jax.input import pipeline
from mama_jax.models import mama
from tests import tolerances

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
    batch = next(pipeline.train_iterator(factory.data_config(cfg), tok))
    return cfg, tok, {k: batch[k] for k in pretrain.STEP_INPUTS}


def _flat(state):
    return {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(state)}


def _run_steps(cfg, tok, batch, mesh, n):
    run = pretrain.Run.create(cfg, factory.model(cfg, tok), mesh)
    before = _flat(nnx.state(run.model()))
    outs = [run.step(sharding.shard_batch(batch, mesh), i, jax.random.key(i)) for i in range(n)]
    return [float(o["total"]) for o in outs], before, _flat(nnx.state(run.model()))


def test_sharded_step_equals_single_device(setup):
    cfg, tok, batch = setup
    cfg = cfg.copy_and_resolve_references()
    cfg.optim.init_lr = cfg.optim.lr  # a first update of lr, not warm-up's 1e-8
    key = jax.random.key(0)
    results = {}
    for name, mesh in (("one", sharding.make_mesh(1, 1, devices=jax.devices()[:1])),
                       ("eight", sharding.make_mesh(4, 2))):  # batch over data x fsdp, params split
        run = pretrain.Run.create(cfg, factory.model(cfg, tok), mesh)
        sharded = sharding.shard_batch(batch, mesh)
        _, _, grads = run.loss_and_grads(sharded, 0, key)
        out = run.step(sharded, 0, key)
        results[name] = (float(out["total"]), tolerances.flat(grads), tolerances.flat(run.trainable),
                         float(out["lr"]))
    (loss_1, grads_1, after_1, lr), (loss_8, grads_8, after_8, _) = results["one"], results["eight"]
    assert loss_8 == pytest.approx(loss_1, rel=1e-5)
    tolerances.assert_grads_close(grads_8, grads_1)
    tolerances.assert_adam_first_step_close(after_8, after_1, grads_1, lr=lr)


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


STEPS, MICRO = 12, 4


def test_micro_batched_run_counts_updates_and_resumes_after_sigkill_and_sigterm(tiny_dataset,
                                                                               tmp_path):
    """train.steps counts optimizer updates whatever train.micro_batches is: 12 steps of 4
    micro-batches are 12 updates, each logged with the schedule's learning rate at that
    update, the local loss on from update delta; a SIGKILL and a SIGTERM in the middle
    still give the straight run's per-step losses."""
    micro = f"--config.train.micro_batches={MICRO}"
    straight = tmp_path / "straight"
    subprocess.run(_main(straight, tiny_dataset, micro, f"--config.train.steps={STEPS}"),
                   check=True, cwd=ROOT, env=_env(), capture_output=True, timeout=600)
    expected = pretrain.per_step_losses(str(straight))
    assert sorted(expected) == list(range(1, STEPS + 1))
    cfg = _config(tiny_dataset, steps=STEPS)
    cfg.train.micro_batches = MICRO
    lr = optim.schedule(cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.total_steps,
                        cfg.optim.init_lr, cfg.optim.end_lr)
    for n, row in metrics_log.read_metrics(str(straight)).items():  # row n: update n, count n - 1
        assert row["lr"] == pytest.approx(float(lr(n - 1)), rel=1e-6), n
        assert row["w"] == (1.0 if n - 1 >= cfg.loss.delta else 0.0), n
        on = row["local"] if n - 1 >= cfg.loss.delta else 0.0  # logged unweighted either way
        assert row["total"] == pytest.approx(row["vt_1"] + row["vv"] + row["vt_2"] + on, rel=1e-5)
    # The optimizer itself counted 12 updates.
    tok = factory.tokenizer(cfg, str(straight))
    run = pretrain.Run.create(cfg, factory.model(cfg, tok), sharding.make_mesh(1, 1, jax.devices()[:1]))
    ckpt = checkpoint.Checkpointer(str(straight / "checkpoints"), async_save=False)
    run.restore(ckpt, STEPS)
    ckpt.close()
    counts = {jax.tree_util.keystr(p): int(c)
              for p, c in jax.tree_util.tree_leaves_with_path(run.opt_state)
              if jax.tree_util.keystr(p).endswith(("count", "['count']"))}
    late = {p: c for p, c in counts.items() if "['inner']" in p}  # the local heads' own Adam
    assert late and set(late.values()) == {STEPS - cfg.loss.delta}, counts
    assert {c for p, c in counts.items() if p not in late} == {STEPS}, counts

    # Killed hard right after the step-6 checkpoint is committed.
    resumed = tmp_path / "resumed"
    ckpt_dir = resumed / "checkpoints" / "6"
    proc = subprocess.Popen(_main(resumed, tiny_dataset, micro, "--config.train.steps=1000"),
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert _wait_for(ckpt_dir.exists, proc), "no step-6 checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Whatever it managed after step 6 is dropped, so the resume starts exactly there.
    for entry in (resumed / "checkpoints").iterdir():
        if entry.name.isdigit() and int(entry.name) > 6:
            shutil.rmtree(entry)
    lines_before = _lines(resumed / "metrics.jsonl")

    # Resumed, then stopped with SIGTERM once past step 12: it saves where it is.
    proc = subprocess.Popen(_main(resumed, tiny_dataset, micro, "--config.train.steps=1000",
                                  "--config.train.checkpoint_every=1000"),
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)

    def past_twelve():  # steps 7..12 logged by this process
        return _lines(resumed / "metrics.jsonl") >= lines_before + STEPS - 6

    assert _wait_for(past_twelve, proc), "resumed run did not reach step 12"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    logged = pretrain.per_step_losses(str(resumed))
    for step in range(1, STEPS + 1):
        assert logged[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step
    latest = checkpoint.Checkpointer(str(resumed / "checkpoints")).latest_step()
    assert latest == max(logged) and latest >= STEPS


@pytest.mark.parametrize("checkpoint_every, last_good", [(1, 2), (4, None)])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dataset, tmp_path,
                                                                  monkeypatch, checkpoint_every,
                                                                  last_good):
    """Step 3 gives NaN. Every 4 steps: the loop reads step 3's loss after it has queued
    step 4, and must still stop before step 4's checkpoint."""
    real_step = pretrain.Run.step

    def poisoned(self, global_batch, opt_step, key):
        out = real_step(self, global_batch, opt_step, key)
        return dict(out, total=out["total"] * np.nan) if opt_step == 2 else out

    monkeypatch.setattr(pretrain.Run, "step", poisoned)
    cfg = _config(tiny_dataset, checkpoint_every=checkpoint_every, log_every=100)
    with pytest.raises(loop.NonFiniteLossError, match="step 3: loss is nan"):
        pretrain.train(cfg, str(tmp_path))
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == last_good


def test_missing_dataset_dir_names_the_field(tmp_path):
    cfg = demo.get_config("test")
    with pytest.raises(factory.ConfigError, match="config.data.dataset_dir"):
        pretrain.train(cfg, str(tmp_path))


def test_unknown_config_key_is_rejected(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mama_jax.main", "--config=configs/demo.py",
                           f"--workdir={tmp_path}", "--config.optim.learning_rate=1e-3"],
                          cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode != 0
    assert b"learning_rate" in proc.stderr


def _adam_update(grads, lr, b1, b2, eps=1e-8):
    """numpy Adam at count t = len(grads): -lr m_hat / (sqrt(v_hat) + eps)."""
    m = v = 0.0
    for g in grads:
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    t = len(grads)
    return -lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + 1e-8)


def test_local_heads_start_with_a_fresh_adam_at_delta_and_the_vit_keeps_its_count():
    cfg = demo.get_config("test").optim
    cfg.update(dict(weight_decay=0.0, lr=1e-3, init_lr=1e-3, end_lr=1e-3))  # constant lr
    delta = 5
    params = {"img_local": {"fc1": {"kernel": jnp.zeros(3)}}, "vision": {"w": jnp.zeros(3)}}
    tx = optim.make_optimizer(cfg, params, late_groups=[(mama.LOCAL_GROUP, delta)])
    state = tx.init(params)
    rng = np.random.default_rng(0)
    seen = []
    for step in range(delta + 1):
        g = rng.normal(size=3).astype(np.float32) * (step + 1)
        seen.append(g)
        grads = {"img_local": {"fc1": {"kernel": jnp.asarray(g)}}, "vision": {"w": jnp.asarray(g)}}
        updates, state = tx.update(grads, state, params)
        local, vit = np.asarray(updates["img_local"]["fc1"]["kernel"]), np.asarray(updates["vision"]["w"])
        # optax forms the bias corrections 1 - b^t in fp32: 1 - 0.999 carries a relative
        # error of about 6e-8 / 1e-3 = 6e-5 (half of it after the square root).
        np.testing.assert_allclose(vit, _adam_update(seen, 1e-3, cfg.b1, cfg.b2), rtol=1e-4)
        if step < delta:
            assert not np.any(local), step  # frozen: no move before delta
    # At delta: a fresh Adam's first step, lr x g / (|g| + eps), not one at count delta + 1.
    np.testing.assert_allclose(local, _adam_update([seen[-1]], 1e-3, cfg.b1, cfg.b2), atol=1e-6)
    assert np.max(np.abs(local - _adam_update(seen, 1e-3, cfg.b1, cfg.b2))) > 1e-4


def test_late_groups_neither_move_nor_decay_before_their_start():
    cfg = demo.get_config("test").optim
    cfg.update(dict(weight_decay=0.5, lr=1e-2, init_lr=1e-2))
    params = {"simclr": {"kernel": jnp.ones(2)}, "vision": {"kernel": jnp.ones(2)}}
    tx = optim.make_optimizer(cfg, params, late_groups=[(mama.SIMCLR_GROUP, 3)])
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    for step in range(4):
        updates, state = tx.update(zero, state, params)
        moved = bool(np.any(np.asarray(updates["simclr"]["kernel"])))
        assert moved == (step >= 3), step  # from its start only weight decay moves it here
        assert np.all(np.asarray(updates["vision"]["kernel"]) < 0)  # decayed from step 0


def test_late_start_groups_follow_delta_and_the_official_aux_schedule():
    cfg = demo.get_config("test")
    assert pretrain.late_start_groups(cfg) == [(mama.LOCAL_GROUP, cfg.loss.delta)]
    cfg.loss.aux_start_step = 8000  # D1: L_VV (the SimCLR head's only loss) from 8000 too
    assert pretrain.late_start_groups(cfg) == [(mama.LOCAL_GROUP, cfg.loss.delta),
                                            (mama.SIMCLR_GROUP, 8000)]



def test_random_init_lands_in_the_training_shardings(setup):
    """factory.model with a mesh initialises straight into Run's shardings: every array
    is already spread over the 8 devices as the step wants it, not built on device 0."""
    cfg, tok, _ = setup
    mesh = sharding.make_mesh(4, 2)
    state = nnx.state(factory.model(cfg, tok, mesh))
    expected = sharding.state_shardings(state, mesh)
    for (path, leaf), want in zip(nnx.to_flat_state(state), jax.tree.leaves(expected)):
        assert leaf.sharding == want, path
        assert len(leaf.sharding.device_set) == 8, path
