"""Full fine-tune: balanced sampler, schedule and SGD against numpy, a short run end to end,
SIGTERM / NaN stop + resume == the straight run, clear errors; the SGD linear probe."""

import json
import math
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from configs import finetune as finetune_config
from configs import report as report_config
from mama_jax import factory
from mama_jax.train import checkpoint, loop, metrics_log
from mama_jax.evaluate import extract, finetune, finetune_model, linear_probe, report, restore
from mama_jax.input import balanced_sampler, pipeline


# ----------------------------------------------------------------------------- sampler

def test_balanced_sampler_draws_classes_uniformly_and_is_deterministic_per_step():
    # 900 / 90 / 10 images of classes 0, 2, 5; 50 unlabelled; the other classes absent.
    labels = np.array([0] * 900 + [2] * 90 + [5] * 10 + [-1] * 50)
    labels = np.random.default_rng(0).permutation(labels)
    sampler = balanced_sampler.BalancedSampler(labels, seed=3)
    draws = np.concatenate([sampler.indices(step, 36) for step in range(300)])
    assert (labels[draws] >= 0).all()  # unlabelled records are never drawn
    freq = np.array([(labels[draws] == c).mean() for c in (0, 2, 5)])
    np.testing.assert_allclose(freq, 1 / 3, atol=0.03)
    # with replacement: the 10 class-5 images are drawn ~360 times, each of them
    rare = np.bincount(draws[labels[draws] == 5], minlength=len(labels))[labels == 5]
    assert rare.min() > 10
    # P(record) = 1 / (classes * count[class]), the weighted sampler's normalised weights
    p = sampler.probabilities(len(labels))
    np.testing.assert_allclose(p[labels == 5], 1 / 30)
    np.testing.assert_allclose(p[labels == 0], 1 / 2700)
    assert p[labels == -1].sum() == 0 and p.sum() == pytest.approx(1.0)
    # a function of (seed, step): same batch on a resume, new batch each step and seed
    np.testing.assert_array_equal(sampler.indices(7, 36), sampler.indices(7, 36))
    np.testing.assert_array_equal(
        sampler.indices(7, 36), balanced_sampler.BalancedSampler(labels, seed=3).indices(7, 36))
    assert not np.array_equal(sampler.indices(7, 36), sampler.indices(8, 36))
    assert not np.array_equal(sampler.indices(7, 36),
                              balanced_sampler.BalancedSampler(labels, seed=4).indices(7, 36))
    with pytest.raises(ValueError, match="no labelled records"):
        balanced_sampler.BalancedSampler(np.full(5, -1), seed=0)


# ----------------------------------------------------------------------------- optimiser

def test_config_defaults_and_schedule_match_the_paper():
    cfg = finetune_config.get_config()
    o = cfg.optim
    assert (o.lr, o.momentum, o.weight_decay, o.warmup_steps, o.init_lr, o.end_lr) == \
        (5e-4, 0.9, 1e-3, 100, 1e-5, 1e-5)
    assert (cfg.steps, cfg.batch_size, cfg.dtype) == (8000, 36, "bfloat16")
    lr = finetune_model.lr_schedule(o, cfg.steps)
    steps = np.arange(0, 8001)
    expected = np.where(
        steps < 100, 1e-5 + (5e-4 - 1e-5) * steps / 100,
        1e-5 + 0.5 * (5e-4 - 1e-5) * (1 + np.cos(np.pi * (steps - 100) / (8000 - 100))))
    np.testing.assert_allclose(np.asarray(jax.jit(lr)(steps)), expected, rtol=1e-5,
                               atol=1e-10)
    assert float(lr(100)) == pytest.approx(5e-4) and float(lr(8000)) == pytest.approx(1e-5)


def test_optimizer_is_torch_sgd_with_momentum_and_weight_decay():
    """torch.optim.SGD: d = g + wd * p; buf = d (first step) then m * buf + d; p -= lr * buf."""
    o = finetune_config.get_config().optim
    o.warmup_steps, o.init_lr = 0, o.lr
    tx = finetune_model.make_optimizer(o, steps=8000)
    rng = np.random.default_rng(0)
    p = rng.normal(size=5).astype(np.float32)
    params, state = {"w": jax.numpy.asarray(p)}, None
    state = tx.init(params)
    ref, buf = p.astype(np.float64), None
    lr = finetune_model.lr_schedule(o, 8000)
    for step in range(3):
        g = rng.normal(size=5).astype(np.float32)
        upd, state = tx.update({"w": jax.numpy.asarray(g)}, state, params)
        params = {"w": params["w"] + upd["w"]}
        d = g + o.weight_decay * ref
        buf = d if buf is None else o.momentum * buf + d
        ref = ref - float(lr(step)) * buf
    np.testing.assert_allclose(np.asarray(params["w"]), ref, rtol=1e-6)


# ----------------------------------------------------------------------------- runs

def _config(pretrained_workdir, **overrides):
    cfg = finetune_config.get_config("test")
    cfg.pretrain_workdir = pretrained_workdir
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def straight(pretrained_workdir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("finetune_straight"))
    return workdir, finetune.run(_config(pretrained_workdir), workdir)


def _flat(module):
    return {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(module))}


def test_short_run_writes_finite_metrics_and_moves_the_vit(straight, pretrained_workdir):
    workdir, result = straight
    with open(os.path.join(workdir, "finetune_birads.json")) as f:
        saved = json.load(f)
    assert saved["step"] == 4 and saved["task"] == "birads"
    entry = saved["tasks"]["birads"]
    assert entry["num_classes"] == 7 and set(entry["eval"]) == {"test", "test_subset"}
    for name, ev in entry["eval"].items():
        for key in ("balanced_accuracy", "auc", "accuracy"):
            assert math.isfinite(ev[key]), (name, key)
        assert saved[f"birads/fft/{name}/bacc"] == ev["balanced_accuracy"]
        assert saved[f"birads/fft/{name}/auc"] == ev["auc"]
        assert len(ev["ci95"]["auc"]) == 2 and np.array(ev["confusion"]).shape == (7, 7)
    logged = metrics_log.read_metrics(os.path.join(workdir, "finetune", "birads"))
    assert sorted(logged) == [1, 2, 3, 4]
    assert all(math.isfinite(row["loss"]) for row in logged.values())
    assert entry["train_loss"] == logged[4]["loss"]

    tuned, step = finetune_model.restore_classifier(workdir, "birads")
    assert step == 4
    pretrained, _, _ = restore.restore_model(pretrained_workdir)
    before, after = _flat(pretrained.vision), _flat(tuned.vision)
    assert before.keys() == after.keys()
    moved = [k for k in before if not np.array_equal(before[k], after[k])]
    assert "patch_embed/kernel" in moved and any(k.startswith("blocks/") for k in moved)
    # the final norm (unused by g) and the mask token stay as pretrained
    assert not [k for k in moved if k.startswith(("norm/", "mask_token"))]
    # g(x) is the probe's pooled feature: MaMA.image_features on the same tower
    images = np.random.default_rng(0).normal(size=(2, 56, 56, 3)).astype(np.float32)
    head = finetune_model.Classifier(pretrained.vision, 7, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(head.features(images), pretrained.image_features(images)[0],
                               rtol=1e-5, atol=1e-6)
    # the saved probabilities are the classifier's on the eval-transformed test images
    with np.load(os.path.join(workdir, "finetune_birads_test.npz")) as z:
        probs, index = z["probs"], z["index"]
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and len(index) == entry["n_eval"]["test"]


def test_sigterm_nan_stop_then_resume_reproduce_the_straight_run(straight, pretrained_workdir,
                                                                 tmp_path, monkeypatch):
    straight_dir, straight_result = straight
    workdir = str(tmp_path)
    ckpt_dir = os.path.join(workdir, "finetune", "birads", "checkpoints")
    real_step, steps_done = finetune_model.State.step, []

    def interrupted(self, images, labels):  # as if the scheduler preempted the job in step 2
        out = real_step(self, images, labels)
        steps_done.append("a")
        if len(steps_done) == 2:
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(finetune_model.State, "step", interrupted)
    assert finetune.run(_config(pretrained_workdir), workdir) == {"task": "birads",
                                                                  "stopped": "SIGTERM"}
    assert not os.path.exists(os.path.join(workdir, "finetune_birads.json"))  # no test yet
    assert checkpoint.Checkpointer(ckpt_dir).latest_step() == 2

    def poisoned(self, images, labels):  # resumed at step 3, whose loss turns NaN
        out = real_step(self, images, labels)
        steps_done.append("b")
        return dict(out, loss=out["loss"] * np.nan)

    monkeypatch.setattr(finetune_model.State, "step", poisoned)
    with pytest.raises(loop.NonFiniteLossError, match="step 3: loss is nan"):
        finetune.run(_config(pretrained_workdir, checkpoint_every=1), workdir)
    assert checkpoint.Checkpointer(ckpt_dir).latest_step() == 2  # the bad step is not saved

    monkeypatch.setattr(finetune_model.State, "step", real_step)
    resumed = finetune.run(_config(pretrained_workdir), workdir)
    assert steps_done == ["a", "a", "b"]
    expected = metrics_log.read_metrics(os.path.join(straight_dir, "finetune", "birads"))
    logged = metrics_log.read_metrics(os.path.join(workdir, "finetune", "birads"))
    assert sorted(logged) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert logged[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-6), step
    with np.load(os.path.join(straight_dir, "finetune_birads_test.npz")) as a, \
            np.load(os.path.join(workdir, "finetune_birads_test.npz")) as b:
        np.testing.assert_allclose(b["probs"], a["probs"], rtol=1e-5, atol=1e-6)
    assert resumed["birads/fft/test/auc"] == pytest.approx(straight_result["birads/fft/test/auc"])

    # a resume must draw the same batches: another batch size is refused, by name
    with pytest.raises(factory.ConfigError, match="batch_size"):
        finetune.run(_config(pretrained_workdir, batch_size=4), workdir)


# ----------------------------------------------------------------------------- errors

def test_task_without_labels_and_bad_configs_are_clear_errors(pretrained_workdir, tiny_dataset,
                                                              monkeypatch, tmp_path):
    with pytest.raises(factory.ConfigError, match="pretrain_workdir"):
        finetune.run(finetune_config.get_config("test"), str(tmp_path))
    with pytest.raises(ValueError, match="unknown task 'mass'"):
        finetune.run(_config(pretrained_workdir, task="mass"), str(tmp_path))
    with pytest.raises(ValueError, match="unknown preset"):
        finetune_config.get_config("fast")

    real_open = pipeline.open_split

    def unlabelled(dataset_dir, split):
        source = real_open(dataset_dir, split)
        return [{**source[i], "cancer": np.int32(-1)} for i in range(len(source))]

    monkeypatch.setattr(pipeline, "open_split", unlabelled)
    with pytest.raises(ValueError, match="dataset has no cancer labels"):
        finetune.run(_config(pretrained_workdir, task="cancer"), str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "finetune"))  # stopped before any work


def test_sgd_probe_trains_the_head_only_on_a_patient_sample_and_reaches_the_report(
        pretrained_workdir, tiny_dataset, tmp_path):
    """protocol=linear: the paper's SGD probe through the same loop, tower frozen."""
    workdir = str(tmp_path)
    result = finetune.run(_config(pretrained_workdir, protocol="linear", train_fraction=0.1),
                          workdir)
    with open(os.path.join(workdir, "sgd_probe_birads_10pct.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(result))
    assert saved["protocol"] == "linear" and saved["train_fraction"] == 0.1
    entry = saved["tasks"]["birads"]
    for split, ev in entry["eval"].items():
        assert saved[f"birads/sgd_probe_10pct/{split}/bacc"] == ev["balanced_accuracy"]
    assert not os.path.exists(os.path.join(workdir, "finetune_birads.json"))

    # The training images are those of a tenth of the labelled patients (linear_probe's sample).
    source = pipeline.open_split(tiny_dataset, "train")
    fields = extract.record_fields(source, ("patient_id", "birads"))
    labelled = fields["birads"] >= 0
    picked = linear_probe.sample_fraction(fields["patient_id"][labelled], 0.1, 0)
    assert entry["n_train_labelled"] == int(picked.sum()) < int(labelled.sum())

    # Only the head moved: the tower is the pretrained one, bit for bit.
    probe, step = finetune_model.restore_classifier(workdir, "birads", protocol="linear",
                                                    fraction=0.1)
    pretrained, _, _ = restore.restore_model(pretrained_workdir)
    assert step == 4
    before, after = _flat(pretrained.vision), _flat(probe.vision)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    init = finetune_model.Classifier(pretrained.vision, 7, rngs=nnx.Rngs(0))
    assert not np.array_equal(np.asarray(init.head.kernel[...]), np.asarray(probe.head.kernel[...]))
    # The frozen tower is written once, not with every step.
    ckpts = os.path.join(finetune_model.run_dir(workdir, "birads", "linear", 0.1), "checkpoints")
    assert os.path.isdir(os.path.join(ckpts, "frozen"))

    # The report lists the SGD probe in its own rows, next to the (absent) L-BFGS probe.
    report.run(report_config.get_config(), workdir)
    with open(os.path.join(workdir, "report.md")) as f:
        text = f.read()
    bacc = 100 * entry["eval"]["test"]["balanced_accuracy"]
    rows = [line for line in text.splitlines() if line.startswith("| MaMA (this run), SGD probe")]
    assert rows and any(f"{bacc:.2f}" in r for r in rows), rows

    with pytest.raises(ValueError, match="config.protocol"):
        finetune.run(_config(pretrained_workdir, protocol="frozen"), workdir)
    with pytest.raises(ValueError, match="config.train_fraction"):
        finetune.run(_config(pretrained_workdir, train_fraction=0.0), workdir)
