"""Full fine-tune (FFT) of the pretrained vision tower plus a linear head (spec §4.2-4.3),
or, with config.protocol="linear", the paper's SGD linear probe: the same job with the
tower frozen (only the head trains), on config.train_fraction of the training patients.

Linear(Dv -> C) on g(x), the mean of the ViT's pre-norm states over all tokens (the
feature the linear probe reads); the tower trains too, except its final LayerNorm
(g never uses it) and mask token. SGD with momentum and PyTorch-style weight decay
(added to the gradient before momentum, on every parameter), warm-up + cosine;
class-balanced draws with replacement; the pretraining run's SimCLR-style augmentation.

Data parallel: parameters replicated over the largest device count that divides the
batch (all devices on multi-host runs). Checkpoints every N steps, on SIGTERM/SIGINT
and at the end; a rerun resumes from the latest; a non-finite loss stops the run
without saving. The LAST weights are then tested: WORKDIR/<name>.json (and the per-image
probabilities in WORKDIR/<name>_<split>.npz), <name> = finetune_<task> or
sgd_probe_<task>_<pct>pct. Run files (checkpoints, metrics.jsonl, TensorBoard) live in
WORKDIR/finetune/<task>/ or WORKDIR/sgd_probe/<task>_<pct>pct/.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from mama_jax import factory
from mama_jax.evaluate import extract, finetune_model, linear_probe, metrics, restore, zeroshot
from mama_jax.input import balanced_sampler, captions, pipeline
from mama_jax.train import checkpoint, loop, metrics_log, sharding

CI_METRICS = ("balanced_accuracy", "auc")
# Must match on a resume (same batches from the same start); run.json also records the rest.
RUN_KEYS = ("task", "protocol", "train_fraction", "batch_size", "seed", "pretrain_workdir",
            "pretrain_step")


# ----------------------------------------------------------------------------- checks

def _check_config(cfg) -> None:
    extract.require_pretrain_workdir(cfg)
    if cfg.task not in captions.CLASS_NAMES:
        raise ValueError(f"config.task: unknown task {cfg.task!r}; known: "
                         f"{', '.join(captions.CLASS_NAMES)}")
    for name in ("steps", "batch_size", "eval_batch_size", "log_every", "checkpoint_every"):
        if cfg[name] < 1:
            raise ValueError(f"config.{name} must be >= 1; got {cfg[name]}")
    if cfg.protocol not in finetune_model.PROTOCOLS:
        raise ValueError(f"config.protocol: unknown {cfg.protocol!r}; known: "
                         f"{', '.join(finetune_model.PROTOCOLS)}")
    if not 0 < cfg.train_fraction <= 1:
        raise ValueError(f"config.train_fraction must be in (0, 1]; got {cfg.train_fraction}")
    if cfg.bootstrap < 0:
        raise ValueError(f"config.bootstrap must be >= 0 (0 = no intervals); got {cfg.bootstrap}")


def _check_resume(run_dir: str, identity: dict) -> None:
    """A resume must draw the same batches from the same start: same task, batch, seed, model."""
    path = os.path.join(run_dir, finetune_model.RUN_FILE)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        for k in RUN_KEYS:
            if saved.get(k) != identity[k]:
                raise factory.ConfigError(
                    f"{run_dir} holds a fine-tune run with {k}={saved.get(k)!r}, this config has "
                    f"{identity[k]!r}: use another --workdir or restore config.{k}")
    with open(path, "w") as f:
        json.dump(identity, f, indent=2)


# ----------------------------------------------------------------------------- test

def predict(graphdef, params, data_cfg, split: str, batch_size: int, mesh, source):
    """Class probabilities [N, C] (record order) of every record of `split`."""
    n_proc, proc = jax.process_count(), jax.process_index()
    batch_size = -(-batch_size // mesh.size) * mesh.size  # whole per-device shards
    rep = sharding.replicated(mesh)

    @functools.partial(jax.jit, out_shardings=rep)  # every host gets the whole batch back
    def probs_of(params, batch):
        logits = nnx.merge(graphdef, *params)(batch["view1"])
        return {"probs": jax.nn.softmax(logits.astype(jnp.float32), -1), "index": batch["index"],
                "valid": batch["valid"]}

    keys = ("view1", "index", "valid")
    batches = pipeline.eval_iterator(data_cfg, None, split, process_index=proc, process_count=n_proc,
                                 batch_size=batch_size // n_proc, source=source)
    probs, index = [], []
    for batch in tqdm(batches, desc=f"finetune test {split}", unit="batch", disable=proc != 0):
        out = jax.device_get(probs_of(params, sharding.shard_batch({k: batch[k] for k in keys}, mesh)))
        probs.append(out["probs"][out["valid"]])
        index.append(out["index"][out["valid"]])
    probs, index = np.concatenate(probs), np.concatenate(index)
    if not np.array_equal(np.sort(index), np.arange(len(source))):
        raise RuntimeError(f"split {split!r}: predicted {len(index)} rows for {len(source)} records")
    return probs[np.argsort(index)]


def evaluate(probs, labels, flags, class_names, n_boot: int, seed: int) -> dict:
    """metrics.summary (+ bootstrap ci95) on every labelled image and on the flagged subset."""
    sets = {"test": labels >= 0}
    if flags is not None and ((flags > 0) & (labels >= 0)).any():
        sets["test_subset"] = (flags > 0) & (labels >= 0)
    out = {}
    for name, mask in sets.items():
        ev = metrics.summary(labels[mask], probs[mask], class_names=class_names)
        if n_boot:
            ev["ci95"] = {m: list(metrics.bootstrap_ci(labels[mask], probs[mask], m, n_boot=n_boot,
                                                       seed=seed)) for m in CI_METRICS}
        out[name] = ev
    return out


# ----------------------------------------------------------------------------- job

def _inputs(cfg):
    """Data config, sources, labels (checked before any compute) and test-subset flags."""
    task = cfg.task
    pretrain_cfg = restore.load_pretrain_config(cfg.pretrain_workdir)
    data_cfg = balanced_sampler.with_batch(extract.eval_data_config(cfg, pretrain_cfg),
                                           cfg.batch_size, cfg.seed, cfg.num_threads)
    sources, labels = {}, {}
    for split in (cfg.train_split, cfg.eval_split):
        sources[split] = pipeline.open_split(data_cfg.dataset_dir, split)
        # The rules the batches use (density 1..4 -> 0..3); "dataset has no <task> labels" if none.
        labels[split] = zeroshot.task_labels(extract.record_fields(sources[split], (task,)), task,
                                             f"{data_cfg.dataset_dir} split {split!r}")
    if cfg.train_fraction < 1:  # the images of a patient sample; the rest are unlabelled here
        train = labels[cfg.train_split]
        known = np.flatnonzero(train >= 0)
        patients = extract.record_fields(sources[cfg.train_split], ("patient_id",))["patient_id"]
        keep = known[linear_probe.sample_fraction(patients[known], cfg.train_fraction, cfg.seed)]
        labels[cfg.train_split] = np.full_like(train, -1)
        labels[cfg.train_split][keep] = train[keep]
    flag = f"in_{task}_test_subset"  # the paper's stratified EMBED test subsets
    flags = (extract.record_fields(sources[cfg.eval_split], (flag,))[flag]
             if flag in extract.FLAG_FIELDS else None)
    return pretrain_cfg, data_cfg, sources, labels, flags


def _train(cfg, state, ckpt, batches, mesh, folder: str, start: int, name: str) -> str | None:
    """Steps start .. cfg.steps-1 through the one loop; the signal's name if one stopped it."""
    lr_at = finetune_model.lr_schedule(cfg.optim, cfg.steps)
    writer = metrics_log.MetricsWriter(folder)
    job = loop.Job(
        name=name, next_batch=lambda: sharding.shard_batch(next(batches), mesh),
        step=lambda batch, step: state.step(batch["image"], batch["label"]),
        save=lambda done: state.save(ckpt, done),
        at_log=lambda done: {"lr": float(lr_at(done - 1))},  # the rate of the line's last step
        latest_checkpoint=lambda: f"step {ckpt.latest_step()} in {ckpt.directory}",
        writer=writer, samples_per_step=int(cfg.batch_size), loss_key="loss")
    try:
        outcome = loop.run(job, loop.Cadence(steps=cfg.steps, log_every=cfg.log_every,
                                             checkpoint_every=cfg.checkpoint_every), start)
    finally:
        writer.close()
    return outcome.stopped


def _latest_pretrain_step(pretrain_workdir: str) -> int:
    ckpt = checkpoint.Checkpointer(os.path.join(pretrain_workdir, "checkpoints"), async_save=False)
    step = ckpt.latest_step()
    ckpt.close()
    if step is None:
        raise FileNotFoundError(f"{pretrain_workdir}/checkpoints: no checkpoint to fine-tune from")
    return int(step)


def _last_logged(folder: str, key: str):
    path = os.path.join(folder, "metrics.jsonl")
    rows = metrics_log.read_metrics_file(path) if os.path.exists(path) else {}
    return rows[max(rows)].get(key) if rows else None


def run(cfg, workdir: str) -> dict:
    """Fine-tune (or SGD-probe) on config.task, then test the last weights; returns the
    content of WORKDIR/<name>.json (finetune_model.run_name)."""
    _check_config(cfg)
    task = cfg.task
    class_names = list(captions.CLASS_NAMES[task])
    pretrain_cfg, data_cfg, sources, labels, flags = _inputs(cfg)
    train_labels, test_labels = labels[cfg.train_split], labels[cfg.eval_split]

    if cfg.dtype:  # compute dtype only: parameters stay fp32, so the checkpoint still fits
        pretrain_cfg.model.dtype = cfg.dtype
    pretrain_step = _latest_pretrain_step(cfg.pretrain_workdir)
    name = finetune_model.run_name(task, cfg.protocol, cfg.train_fraction)
    folder = finetune_model.run_dir(workdir, task, cfg.protocol, cfg.train_fraction)
    os.makedirs(folder, exist_ok=True)
    _check_resume(folder, {"task": task, "protocol": cfg.protocol,
                           "train_fraction": float(cfg.train_fraction),
                           "batch_size": int(cfg.batch_size), "seed": int(cfg.seed),
                           "pretrain_workdir": os.path.abspath(cfg.pretrain_workdir),
                           "pretrain_step": int(pretrain_step), "num_classes": len(class_names),
                           "dtype": pretrain_cfg.model.dtype})

    vision, _ = restore.restore_vision(cfg.pretrain_workdir, step=pretrain_step,
                                       dtype=pretrain_cfg.model.dtype)
    net = finetune_model.Classifier(vision, len(class_names), rngs=nnx.Rngs(cfg.seed))
    del vision
    mesh = finetune_model.data_parallel_mesh(cfg.batch_size)
    state = finetune_model.State(net, finetune_model.make_optimizer(cfg.optim, cfg.steps), mesh,
                                 cfg.protocol)
    del net
    ckpt = checkpoint.Checkpointer(os.path.join(folder, "checkpoints"), keep=cfg.keep_checkpoints)
    try:
        start = min(ckpt.latest_step() or 0, cfg.steps)
        if start:
            state.restore(ckpt, start)
            logging.info("%s: resumed from step %d", name, start)
        batches = balanced_sampler.train_batches(
            data_cfg, sources[cfg.train_split], train_labels,
            balanced_sampler.BalancedSampler(train_labels, cfg.seed), start, cfg.steps,
            process_index=jax.process_index(), process_count=jax.process_count())
        stopped = _train(cfg, state, ckpt, batches, mesh, folder, start, name)
    finally:
        ckpt.close()  # waits for the last asynchronous save
    if stopped:
        return {"task": task, "stopped": stopped}

    probs = predict(state.graphdef, (state.trainable, state.rest), data_cfg, cfg.eval_split,
                    cfg.eval_batch_size, mesh, sources[cfg.eval_split])
    evals = evaluate(probs, test_labels, flags, class_names, cfg.bootstrap, cfg.seed)
    kind = "fft" if cfg.protocol == "fft" else f"sgd_probe_{100 * cfg.train_fraction:g}pct"
    headline = {f"{task}/{kind}/{split}/{short}": ev[m] for split, ev in evals.items()
                for short, m in (("bacc", "balanced_accuracy"), ("auc", "auc"))}
    known_train = train_labels[train_labels >= 0]
    counts = np.bincount(known_train, minlength=len(class_names))
    warnings = ([f"the training sample holds {np.count_nonzero(counts)} of {len(class_names)} "
                 "classes"] if np.count_nonzero(counts) < len(class_names) else [])
    result = metrics.json_safe({
        **headline, "task": task, "step": int(cfg.steps), "pretrain_step": int(pretrain_step),
        "pretrain_workdir": cfg.pretrain_workdir, "dataset_dir": data_cfg.dataset_dir,
        "train_split": cfg.train_split, "eval_split": cfg.eval_split, "run_dir": folder,
        "protocol": cfg.protocol, "train_fraction": float(cfg.train_fraction),
        "finetune": {"model": ("ViT (final norm frozen) + Linear on g(x)" if cfg.protocol == "fft"
                               else "frozen ViT + Linear on g(x) (SGD linear probe)")
                     + ", class-balanced sampling", "steps": cfg.steps, "batch_size": cfg.batch_size,
                     "dtype": pretrain_cfg.model.dtype, "devices": int(mesh.size),
                     "seed": cfg.seed, "bootstrap": cfg.bootstrap, "optim": cfg.optim.to_dict()},
        "tasks": {task: {"num_classes": len(class_names), "class_names": class_names,
                         "n_train_labelled": int(len(known_train)),
                         "train_class_counts": counts.tolist(), "warnings": warnings,
                         "n_eval": {k: int(v["n"]) for k, v in evals.items()},
                         "train_loss": _last_logged(folder, "loss"), "eval": evals}},
    })
    if jax.process_index() == 0:
        known = np.flatnonzero(test_labels >= 0)
        image_id = extract.record_fields(sources[cfg.eval_split], ("image_id",))["image_id"]
        np.savez(os.path.join(workdir, f"{name}_{cfg.eval_split}.npz"), index=known,
                 image_id=image_id[known], label=test_labels[known], probs=probs[known])
        path = os.path.join(workdir, f"{name}.json")
        with open(f"{path}.tmp", "w") as f:
            json.dump(result, f, indent=2, allow_nan=False)
        os.replace(f"{path}.tmp", path)  # never a half-written result under the real name
    logging.info("%s: bACC %.4f AUC %.4f (test)", name,
                 evals["test"]["balanced_accuracy"], evals["test"]["auc"])
    return result
