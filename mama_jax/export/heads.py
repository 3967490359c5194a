"""Trained heads an export package may carry, beside zero-shot (which needs none).

  heads/heads.json           {"probe": {task: entry}, "finetune": {task: entry}}
  heads/probe_<task>.npz     the linear probe (linear_probe.train_probe's params: mean,
                             std, w, b) on the feature the probe job used (pooled g(x) or
                             the unnormalised global embedding e_I(x))
  heads/finetune_<task>/     Orbax state of the fine-tuned classifier (its own ViT + a
                             linear head on g(x)); its ViT config is in the entry

Probabilities: the probe's softmax(W z + b) on standardised features
(linear_probe.predict_proba), the classifier's softmax of its logits (as the fine-tune
job's test predictions).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mama_jax.export.errors import PackageError
from mama_jax.export.state import restore_module
from mama_jax.models import vit as vit_lib

HEADS_DIR = "heads"
HEADS_FILE = "heads.json"
KINDS = ("zero-shot", "probe", "finetune")
PROBE_FEATURES = ("pooled", "image_emb")
_PROBE_ARRAYS = ("mean", "std", "w", "b")


@dataclasses.dataclass
class ProbeHead:
    task: str
    feature: str                # pooled | image_emb (the probe job's config.feature)
    params: dict                # mean [D], std [D], w [D, C], b [C]
    info: dict = dataclasses.field(default_factory=dict)  # provenance, written to heads.json

    @property
    def num_classes(self) -> int:
        return int(self.params["w"].shape[1])


@dataclasses.dataclass
class FinetuneHead:
    task: str
    classifier: nnx.Module      # evaluate.finetune_model.Classifier
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.classifier.head.kernel.shape[1])


def _check_probe(params: dict, where: str) -> dict:
    missing = [k for k in _PROBE_ARRAYS if k not in params]
    if missing:
        raise PackageError(f"{where}: probe array {missing[0]!r} is missing")
    p = {k: np.asarray(params[k], np.float64 if k in ("mean", "std") else np.float32)
         for k in _PROBE_ARRAYS}
    dim, classes = p["w"].shape if p["w"].ndim == 2 else (-1, -1)
    if dim < 1 or p["mean"].shape != (dim,) or p["std"].shape != (dim,) or p["b"].shape != (classes,):
        raise PackageError(f"{where}: probe shapes disagree: mean {p['mean'].shape}, std "
                           f"{p['std'].shape}, w {p['w'].shape}, b {p['b'].shape}")
    if not all(np.isfinite(v).all() for v in p.values()):
        raise PackageError(f"{where}: probe holds NaN or inf")
    return p


def write_heads(heads: list, folder: str) -> None:
    """Write ProbeHead / FinetuneHead objects under folder (a package's heads/)."""
    os.makedirs(folder, exist_ok=True)
    index: dict = {"probe": {}, "finetune": {}}
    for head in heads:
        if isinstance(head, ProbeHead):
            name = f"probe_{head.task}.npz"
            params = _check_probe(head.params, name)
            np.savez(os.path.join(folder, name), **params)
            index["probe"][head.task] = {"file": name, "feature": head.feature,
                                         "num_classes": head.num_classes, **head.info}
        elif isinstance(head, FinetuneHead):
            name = f"finetune_{head.task}"
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(os.path.join(folder, name), nnx.to_pure_dict(nnx.state(head.classifier)))
            index["finetune"][head.task] = {
                "folder": name, "num_classes": head.num_classes,
                "vit": vit_lib.vit_config_to_dict(head.classifier.vision.cfg), **head.info}
        else:
            raise TypeError(f"write_heads: not a head: {type(head).__name__}")
    with open(os.path.join(folder, HEADS_FILE), "w") as f:
        json.dump(index, f, indent=2)


def _classifier(entry: dict, folder: str, where: str):
    from mama_jax.evaluate.finetune_model import Classifier

    try:
        vit_cfg = vit_lib.vit_config_from_dict(entry["vit"])
        vit_cfg = dataclasses.replace(vit_cfg, remat=False, attention_impl=None)
        num_classes = int(entry["num_classes"])
    except (KeyError, TypeError, ValueError) as err:
        raise PackageError(f"{where}: invalid fine-tune entry: {err}") from err

    def build():
        return Classifier(vit_lib.VisionTransformer(vit_cfg, rngs=nnx.Rngs(0)), num_classes,
                          rngs=nnx.Rngs(0))

    return restore_module(build, os.path.join(folder, entry["folder"]), where)


def read_heads(folder: str, vit_cfg: vit_lib.ViTConfig, embed_dim: int) -> dict:
    """{(kind, task): head} of a package's heads/ (empty when the package carries none)."""
    path = os.path.join(folder, HEADS_FILE)
    if not os.path.isdir(folder):
        return {}
    if not os.path.exists(path):
        raise PackageError(f"{path}: missing (the heads folder has no index)")
    try:
        with open(path) as f:
            index = json.load(f)
    except ValueError as err:
        raise PackageError(f"{path}: not valid JSON: {err}") from err
    out: dict = {}
    for task, entry in index.get("probe", {}).items():
        where = f"{path}: probe.{task}"
        feature = entry.get("feature")
        if feature not in PROBE_FEATURES:
            raise PackageError(f"{where}: feature {feature!r}; choose from {', '.join(PROBE_FEATURES)}")
        file = os.path.join(folder, str(entry.get("file", "")))
        if not os.path.isfile(file):
            raise PackageError(f"{file}: missing probe arrays")
        with np.load(file, allow_pickle=False) as z:
            params = _check_probe({k: z[k] for k in z.files}, file)
        width = vit_cfg.hidden if feature == "pooled" else embed_dim
        if params["w"].shape[0] != width:
            raise PackageError(f"{file}: probe input width {params['w'].shape[0]} != the model's "
                               f"{feature} width {width}")
        out[("probe", task)] = ProbeHead(task, feature, params, entry)
    for task, entry in index.get("finetune", {}).items():
        out[("finetune", task)] = FinetuneHead(task, _classifier(entry, folder, f"{path}: finetune.{task}"),
                                               entry)
    return out
