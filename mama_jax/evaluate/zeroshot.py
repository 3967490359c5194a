"""Zero-shot BI-RADS / density / cancer classification (spec reference_behaviour.md §4.1).

Per image: the task's class prompts (with the "official" prefix they embed the image's
own unmasked metadata, so they differ between images), text embeddings L2-normalised,
scores = exp(logit_scale) * cos(e_I(x), e_T(prompt)), one softmax (D10; the official
code applies it twice, option `double_softmax`: argmax and binary AUC are unchanged,
multi-class AUC is computed on squashed scores), prediction = argmax.

Images with an unknown label (-1) are left out of a task and counted. With
`aggregate` = breast (study + laterality) or study, a group's probabilities are the
mean of its images' probabilities and its label is the highest class index among its
images (labels in EMBED are given per side, so the max only matters when a study mixes
sides with different labels).
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from mama_jax import losses
from mama_jax.input import captions, pipeline
from mama_jax.evaluate import extract, metrics, restore
from mama_jax.input.tokenizer import encode_captions

AGGREGATES = ("image", "breast", "study")
CI_METRICS = ("balanced_accuracy", "auc")


# ----------------------------------------------------------------------------- labels

def task_labels(fields: dict, task: str, where: str) -> np.ndarray:
    """Class labels of a task (int32, -1 unknown) from record fields; an error if none is known."""
    if task not in captions.TASKS:
        raise ValueError(f"unknown zero-shot task {task!r}; choose from {', '.join(captions.TASKS)}")
    raw = np.asarray(fields[task], np.int64)
    labels = np.array([pipeline.density_label(int(v)) for v in raw] if task == "density" else raw, np.int32)
    num_classes = len(captions.CLASS_NAMES[task])
    bad = (labels < -1) | (labels >= num_classes)
    if bad.any():
        raise ValueError(f"{where}: {task} label {labels[bad][0]} out of range for {num_classes} classes")
    if not (labels >= 0).any():
        raise ValueError(f"dataset has no {task} labels: all {len(labels)} records of {where} are "
                         f"unknown (-1); choose another task or split")
    return labels


# ----------------------------------------------------------------------------- prompts and text

def prompt_groups(task: str, records: list[dict], prefix: str) -> tuple[list[tuple[str, ...]], np.ndarray]:
    """Distinct prompt sets and, per record, the index of its set."""
    sets: dict[tuple[str, ...], int] = {}
    group = np.empty((len(records),), np.int64)
    for i, record in enumerate(records):
        key = tuple(captions.zero_shot_prompts(task, record, prefix=prefix))
        group[i] = sets.setdefault(key, len(sets))
    return list(sets), group


def text_embed_fn(graphdef, out_shardings=None):
    """Jitted (state, input_ids, attention_mask) -> L2-normalised text embeddings [B, d].

    Built once per model structure and called with each new state (pretraining's live
    evaluation), so a changed state does not compile again.
    """
    def embed(state, ids, mask):
        return losses.l2_normalize(nnx.merge(graphdef, state).encode_texts(ids, mask))

    return jax.jit(embed, out_shardings=out_shardings)


def text_embedder(model):
    """Jitted (input_ids, attention_mask) -> L2-normalised text embeddings [B, d]."""
    graphdef, state = nnx.split(model)
    embed = text_embed_fn(graphdef)
    return lambda ids, mask: embed(state, ids, mask)


def encode_prompts(model, tok, texts: list[str], max_length: int, batch_size: int,
                   cache: dict[str, np.ndarray] | None = None, *, embed=None,
                   progress: bool = True) -> tuple[dict[str, np.ndarray], int]:
    """Normalised embedding of every distinct text (each encoded once; `cache` is reused
    across tasks); also how many of the new texts were truncated to max_length.
    `embed`: (ids, mask) -> embeddings to use instead of `model`'s own jitted encoder
    (pretraining passes one that runs on its mesh)."""
    cache = {} if cache is None else cache
    todo = list(dict.fromkeys(t for t in texts if t not in cache))
    if not todo:
        return cache, 0
    enc = encode_captions(tok, todo, max_length)
    embed = embed or text_embedder(model)
    for lo in tqdm(range(0, len(todo), batch_size), desc="encode prompts", unit="batch",
                   disable=not progress):
        ids, mask = enc.input_ids[lo:lo + batch_size], enc.attention_mask[lo:lo + batch_size]
        n = len(ids)
        if n < batch_size:  # pad with copies of the first row: one compiled shape
            ids = np.concatenate([ids, np.repeat(ids[:1], batch_size - n, 0)])
            mask = np.concatenate([mask, np.repeat(mask[:1], batch_size - n, 0)])
        out = np.asarray(embed(ids, mask))[:n]
        cache.update(zip(todo[lo:lo + n], out))
    return cache, int(enc.truncated.sum())


# ----------------------------------------------------------------------------- scores

def softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def normalize(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def zero_shot_probs(image_emb: np.ndarray, text_emb: np.ndarray, group: np.ndarray,
                    logit_scale: float, double_softmax: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(scores, probabilities) [N, C] of images [N, d] against their prompt sets.

    text_emb [G, C, d] normalised; group [N] picks each image's set.
    """
    img = normalize(np.asarray(image_emb, np.float32))
    cos = np.concatenate([np.einsum("nd,ncd->nc", img[lo:lo + 4096], text_emb[group[lo:lo + 4096]])
                          for lo in range(0, len(img), 4096)])  # chunks: text_emb[group] is N*C*d
    scores = math.exp(logit_scale) * cos
    probs = softmax(scores)
    return scores, softmax(probs) if double_softmax else probs


def aggregate(probs: np.ndarray, labels: np.ndarray, keys: np.ndarray | None):
    """Mean probabilities and max label per group key; identity when keys is None."""
    if keys is None:
        return probs, labels, np.arange(len(labels))
    uniq, inverse = np.unique(keys, return_inverse=True)
    inverse = inverse.reshape(-1)
    sums = np.zeros((len(uniq), probs.shape[1]), np.float64)
    np.add.at(sums, inverse, probs)
    counts = np.bincount(inverse, minlength=len(uniq))[:, None]
    group_labels = np.full((len(uniq),), -1, np.int32)
    np.maximum.at(group_labels, inverse, labels)
    return (sums / counts).astype(np.float32), group_labels, uniq


def group_keys(arrays: dict, level: str) -> np.ndarray | None:
    if level == "image":
        return None
    if level == "study":
        return np.asarray(arrays["study_id"], str)
    return np.char.add(np.char.add(np.asarray(arrays["study_id"], str), "|"),
                       np.asarray(arrays["laterality"], str))


# ----------------------------------------------------------------------------- job

def _check_config(cfg) -> tuple[str, ...]:
    extract.require_pretrain_workdir(cfg)
    tasks = tuple(cfg.tasks)
    if not tasks:
        raise ValueError("config.tasks is empty: name at least one of birads, density, cancer")
    for task in tasks:
        if task not in captions.TASKS:
            raise ValueError(f"config.tasks: unknown task {task!r}; "
                             f"choose from {', '.join(captions.TASKS)}")
    if cfg.prefix not in captions.PREFIXES:
        raise ValueError(f"config.prefix={cfg.prefix!r}; choose from {', '.join(captions.PREFIXES)}")
    if cfg.aggregate not in AGGREGATES:
        raise ValueError(f"config.aggregate={cfg.aggregate!r}; choose from {', '.join(AGGREGATES)}")
    if cfg.batch_size < 1 or cfg.bootstrap < 0:
        raise ValueError(f"config.batch_size must be >= 1 and config.bootstrap >= 0, "
                         f"got {cfg.batch_size} and {cfg.bootstrap}")
    return tasks


def prompt_max_length(cfg, pretrain_cfg, model) -> int:
    """config.max_length, or the pretraining run's when 0; at most the text model's positions."""
    max_length = int(cfg.get("max_length", 0) or pretrain_cfg.data.max_length)
    limit = model.cfg.text.n_positions
    if not 2 <= max_length <= limit:
        raise ValueError(f"config.max_length={max_length}: must be in 2..{limit} "
                         "(the text model's n_positions)")
    return max_length


def training_logit_scale(logit_scale: float, pretrain_cfg) -> float:
    """The scale training used: the parameter clamped at loss.max_log_scale (it may drift
    above the clamp)."""
    cap = pretrain_cfg.loss.get("max_log_scale", 0.0)
    return min(logit_scale, cap) if cap else logit_scale


def _scored(task: str, probs: np.ndarray, labels: np.ndarray, keys, cfg) -> dict:
    """metrics, n and bootstrap intervals of per-image probabilities, aggregated as configured."""
    probs_eval, labels_eval, _ = aggregate(probs, labels, keys)
    summary = metrics.summary(labels_eval, probs_eval, class_names=list(captions.CLASS_NAMES[task]))
    ci = {}
    if cfg.bootstrap:
        for name in CI_METRICS:
            ci[name] = list(metrics.bootstrap_ci(labels_eval, probs_eval, name,
                                                 n_boot=cfg.bootstrap, seed=cfg.seed))
    return {"metrics": summary, "n": int(len(labels_eval)), "ci": ci}


def evaluate_task(task: str, labels: np.ndarray, arrays: dict, records: list[dict], model, tok,
                  cfg, max_length: int, logit_scale: float, cache: dict, *,
                  text_embed=None, progress: bool = True) -> tuple[dict, dict]:
    """(result entry, per-image arrays) of one task on the extracted split; `text_embed`
    and `progress` as in encode_prompts."""
    known = np.flatnonzero(labels >= 0)
    sets, group = prompt_groups(task, [records[i] for i in known], cfg.prefix)
    cache, truncated = encode_prompts(model, tok, [t for s in sets for t in s], max_length,
                                      cfg.batch_size, cache, embed=text_embed,
                                      progress=progress)
    text_emb = np.stack([np.stack([cache[t] for t in s]) for s in sets]).astype(np.float32)
    scores, probs = zero_shot_probs(arrays["image_emb"][known], text_emb, group, logit_scale,
                                    cfg.double_softmax)
    keys = group_keys({k: arrays[k][known] for k in ("study_id", "laterality")}, cfg.aggregate)
    first = int(known[0])
    entry = {
        **_scored(task, probs, labels[known], keys, cfg), "n_images": int(len(known)),
        "n_unknown_label": int(len(labels) - len(known)),
        "n_prompt_sets": len(sets), "truncated_prompts": truncated,
        "example": {"image_id": str(arrays["image_id"][first]), "prompts": list(sets[group[0]])},
    }
    # The paper's class-stratified test subset (§4.2), where the dataset flags one: the
    # numbers comparable to its Tables 1-2 (macro AUC depends on the class mix).
    flags = arrays.get(f"in_{task}_test_subset")
    if flags is not None and np.any(flags[known] > 0):
        inside = flags[known] > 0
        entry["subsets"] = {"test_subset": _scored(
            task, probs[inside], labels[known][inside],
            None if keys is None else keys[inside], cfg)}
    per_image = {"index": arrays["index"][known], "image_id": arrays["image_id"][known],
                 "label": labels[known], "scores": scores.astype(np.float32),
                 "probs": probs.astype(np.float32)}
    return entry, per_image


def run(cfg, workdir: str) -> dict:
    """Zero-shot metrics of every task in cfg.tasks; WORKDIR/zeroshot.json and
    WORKDIR/zeroshot_<task>_<split>.npz (per-image scores and probabilities)."""
    tasks = _check_config(cfg)
    data_cfg = extract.eval_data_config(cfg)
    source = pipeline.open_split(data_cfg.dataset_dir, cfg.split)
    where = f"{data_cfg.dataset_dir} split {cfg.split!r}"
    fields = extract.record_fields(source, captions.RECORD_KEYS + ("cancer",))
    labels = {task: task_labels(fields, task, where) for task in tasks}  # fail before any compute

    model, tok, step = restore.restore_model(cfg.pretrain_workdir, step=cfg.get("step", 0) or None)
    pretrain_cfg = restore.load_pretrain_config(cfg.pretrain_workdir)
    max_length = prompt_max_length(cfg, pretrain_cfg, model)
    arrays = extract.extract_split(model, tok, data_cfg, cfg.split, cfg.batch_size, source=source)
    for task in tasks:  # the batches' labels follow the same rules as the record fields
        if not np.array_equal(arrays[task], labels[task]):
            raise RuntimeError(f"{where}: {task} labels of the eval batches disagree with the records")
    records = [{k: fields[k][i] for k in captions.RECORD_KEYS} for i in range(len(source))]
    logit_scale = training_logit_scale(float(np.asarray(model.logit_scale[...])), pretrain_cfg)

    os.makedirs(workdir, exist_ok=True)
    result = {"step": int(step), "split": cfg.split, "dataset_dir": data_cfg.dataset_dir,
              "pretrain_workdir": cfg.pretrain_workdir, "prefix": cfg.prefix,
              "aggregate": cfg.aggregate, "double_softmax": bool(cfg.double_softmax),
              "logit_scale": logit_scale, "max_length": max_length,
              "bootstrap": int(cfg.bootstrap), "tasks": {}}
    cache: dict[str, np.ndarray] = {}
    for task in tasks:
        entry, per_image = evaluate_task(task, labels[task], arrays, records, model, tok, cfg,
                                         max_length, logit_scale, cache)
        result["tasks"][task] = entry
        np.savez(os.path.join(workdir, f"zeroshot_{task}_{cfg.split}.npz"), **per_image)
        if entry["truncated_prompts"]:
            logging.warning("zero-shot %s: %d of the prompts were truncated to %d tokens (their "
                            "class sentences may be cut); consider config.max_length", task,
                            entry["truncated_prompts"], max_length)
    with open(os.path.join(workdir, "zeroshot.json"), "w") as f:
        json.dump(metrics.json_safe(result), f, indent=2)
    for task, entry in result["tasks"].items():  # flat figures for the command-line summary
        for name in CI_METRICS:
            result[f"{task}/{name}"] = float(entry["metrics"][name])
    return result
