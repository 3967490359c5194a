"""The export job: a pretraining run (+ its probe and fine-tune runs) -> a package.

  python -m mama_jax.main --config=configs/export.py --workdir=runs/mama/export_job \
      --config.pretrain_workdir=runs/mama [--config.out_dir=DIR] [--config.step=N] \
      [--config.probe_workdir=runs/mama/eval] [--config.finetune_workdir=runs/mama/eval]

Heads: the linear probe of a probe job (configs/linear_probe.py) is fitted again on
100 % of its training embeddings with the settings its linear_probe.json records (the
job keeps metrics, not weights; the fit is deterministic, so this is the probe the job
scored at fraction 1.0); the fine-tuned classifiers are restored from the fine-tune
runs' last checkpoints. Decode settings: the data_prep reader options of the training
records (see configs/export.py).
"""

from __future__ import annotations

import glob
import json
import logging
import os

import numpy as np

from mama_jax.export import heads as heads_lib
from mama_jax.export.package import CONFIG_FILE, HEADS_DIR, VIT_HF_DIR, write_package


def _dataset_build_dir(dataset_dir: str) -> str:
    """data_prep build --out of a TFDS version folder (OUT/tfds/mammography/<name>/<version>)."""
    return os.path.abspath(os.path.join(dataset_dir, *[os.pardir] * 4))


def build_decode_options(dataset_dir: str) -> dict | None:
    """{long_side, voi, j2k_reduce} the build decoded its images with, from its manifest
    (every entry records them); None for a build made before they were recorded."""
    from data_prep import prepare

    from mama_jax import factory

    out = _dataset_build_dir(dataset_dir)
    entries = [e for e in prepare.read_manifest(out).values() if e.get("status") == "written"]
    if not entries:
        raise factory.ConfigError(
            f"{os.path.join(out, prepare.MANIFEST)}: no build manifest with written images next to "
            f"the dataset {dataset_dir}; pass --config.decode_long_side=<the build's --long-side>")
    options = {tuple(sorted(e["options"].items())) for e in entries if "options" in e}
    if len(options) == 1 and all("options" in e for e in entries):
        return dict(next(iter(options)))
    if len(options) > 1:
        raise factory.ConfigError(
            f"{os.path.join(out, prepare.MANIFEST)}: images decoded with different options "
            f"({len(options)} sets); pass --config.decode_long_side / decode_voi / decode_j2k_reduce")
    # Older builds: the reader never upscales, so the longest stored side reads every image
    # as the build did; it is the build's --long-side whenever one crop was larger.
    return {"long_side": max(max(int(e["height"]), int(e["width"])) for e in entries)}


def decode_settings(cfg, pretrain_cfg) -> dict:
    """{long_side, voi, j2k_reduce}: configs/export.py's, or (decode_long_side 0) what the
    build's manifest recorded."""
    if int(cfg.get("decode_long_side", 0)):
        return {"long_side": int(cfg.decode_long_side), "voi": cfg.get("decode_voi", "none"),
                "j2k_reduce": bool(cfg.get("decode_j2k_reduce", True))}
    built = build_decode_options(pretrain_cfg.data.dataset_dir)
    return {"long_side": int(built["long_side"]), "voi": built.get("voi", cfg.get("decode_voi", "none")),
            "j2k_reduce": bool(built.get("j2k_reduce", cfg.get("decode_j2k_reduce", True)))}


def probe_heads(probe_workdir: str, tasks=()) -> list:
    """ProbeHeads fitted as the probe job fitted its 100 % probe, from its linear_probe.json."""
    from mama_jax.input import captions
    from mama_jax.evaluate import linear_probe as lp

    path = os.path.join(probe_workdir, lp.RESULT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no linear probe result; run configs/linear_probe.py with "
                                f"--workdir={probe_workdir} first, or leave config.probe_workdir empty")
    with open(path) as f:
        done = json.load(f)
    tasks = tuple(tasks) or tuple(done["tasks"])
    for task in tasks:
        if task not in done["tasks"]:
            raise ValueError(f"{path}: the probe job did not probe {task!r} (it probed "
                             f"{', '.join(done['tasks'])})")
    settings, feature = done["probe"], done["feature"]
    train = lp.load_embeddings(done["train_file"])
    out = []
    for task in tasks:
        num_classes = len(captions.CLASS_NAMES[task])
        y = np.asarray(train[task], np.int64)  # -1 unknown; train_probe checks the range
        known = np.flatnonzero(y >= 0)
        if not len(known):
            raise ValueError(f"{done['train_file']}: no {task} labels to fit a probe on")
        pick = known[lp.sample_fraction(train["patient_id"][known], 1.0, settings["seed"])]
        params = lp.train_probe(train[feature][pick], y[pick], num_classes,
                                epochs=settings["epochs"], lr=settings["lr"],
                                weight_decay=settings["weight_decay"], seed=settings["seed"],
                                optimizer=settings["optimizer"])
        info = {"source": os.path.abspath(path), "train_file": done["train_file"],
                "n_train_images": int(len(pick)), "train_loss": params["train_loss"], **settings}
        out.append(heads_lib.ProbeHead(task, feature, {k: params[k] for k in ("mean", "std", "w", "b")},
                                       info))
    return out


def finetune_heads(finetune_workdir: str, tasks=()) -> list:
    """FinetuneHeads of the fine-tune runs (protocol fft) in finetune_workdir."""
    from mama_jax.evaluate import finetune_model

    if not tasks:
        runs = glob.glob(os.path.join(finetune_workdir, "finetune", "*", finetune_model.RUN_FILE))
        tasks = sorted(os.path.basename(os.path.dirname(r)) for r in runs)
        if not tasks:
            raise FileNotFoundError(f"{finetune_workdir}: no fine-tune run (finetune/<task>/"
                                    f"{finetune_model.RUN_FILE}); run configs/finetune.py there first")
    out = []
    for task in tasks:
        net, step = finetune_model.restore_classifier(finetune_workdir, task)
        info = {"source": finetune_model.run_dir(finetune_workdir, task), "step": int(step)}
        out.append(heads_lib.FinetuneHead(task, net, info))
    return out


def export_package(pretrain_workdir: str, out_dir: str, *, step: int | None = None,
                   decode: dict | None = None, heads: list | None = None) -> str:
    """Restore a pretraining run's checkpoint (latest, or `step`) and write its package."""
    from mama_jax.evaluate import restore

    cfg = restore.load_pretrain_config(pretrain_workdir)
    model, tok, step = restore.restore_model(pretrain_workdir, step=step)
    return write_package(model, tok, json.loads(cfg.to_json_best_effort()), step, out_dir,
                         source=os.path.abspath(pretrain_workdir), decode=decode, heads=heads)


def run(cfg, workdir: str) -> dict:
    """Export job: cfg.pretrain_workdir -> cfg.out_dir (default WORKDIR/export)."""
    from mama_jax import factory
    from mama_jax.evaluate import restore

    factory.require_path(cfg.pretrain_workdir, "pretrain_workdir",
                         "pass --config.pretrain_workdir=<the pretraining run's --workdir>")
    pretrain_cfg = restore.load_pretrain_config(cfg.pretrain_workdir)
    decode = decode_settings(cfg, pretrain_cfg)
    logging.info("export: DICOMs will be read with %s", decode)
    heads = []
    if cfg.get("probe_workdir"):
        heads += probe_heads(cfg.probe_workdir, cfg.get("probe_tasks", ()))
    if cfg.get("finetune_workdir"):
        heads += finetune_heads(cfg.finetune_workdir, cfg.get("finetune_tasks", ()))
    out_dir = cfg.out_dir or os.path.join(workdir, "export")
    path = export_package(cfg.pretrain_workdir, out_dir, step=None if cfg.step < 0 else int(cfg.step),
                          decode=decode, heads=heads)
    with open(os.path.join(path, CONFIG_FILE)) as f:
        step = json.load(f)["step"]
    result = {"out_dir": path, "step": step, "vit_hf": os.path.join(path, VIT_HF_DIR),
              "decode": decode,
              "heads": sorted(f"{type(h).__name__[:-4].lower()}:{h.task}" for h in heads)}
    if heads:
        result["heads_dir"] = os.path.join(path, HEADS_DIR)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "export_result.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
