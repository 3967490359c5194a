"""The export package format: write an in-memory model into a folder, load it back.

A package folder holds
  state/             Orbax checkpoint of the whole model (towers, heads, temperatures,
                     BatchNorm statistics) as a pure dict
  model_config.json  the ViT / text / MaMA configs of the restored model: the model is
                     rebuilt from these, so towers loaded from weight files need no files
  config.json        the pretraining config, the exported step, the format version and
                     `decode`: the data_prep reader settings (long_side, voi, j2k_reduce)
                     the training records were made with, so a DICOM is read the same way
  tokenizer/         the caption tokenizer with MaMA's special tokens
  vit_hf/            the vision tower as a transformers Dinov2(WithRegisters)Model
  heads/             optional trained heads (linear probe, fine-tuned classifier; heads.py)

`mama_jax.load(path)` gives an InferenceModel (inference.py). Neither the dataset nor
the pretraining workdir is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mama_jax.export import heads as heads_lib
from mama_jax.export.errors import PackageError
from mama_jax.export.state import restore_module
from mama_jax.export.hf import export_dinov2_hf
from mama_jax.models import mama
from mama_jax.input import tokenizer as tok_lib

FORMAT = "mama_jax.export"
FORMAT_VERSION = 2          # 2: config.json has `decode`, the package may hold heads/
READABLE_VERSIONS = (1, 2)  # a version-1 package loads; it cannot read DICOMs (no `decode`)
CONFIG_FILE = "config.json"
MODEL_CONFIG_FILE = "model_config.json"
STATE_DIR = "state"
TOKENIZER_DIR = "tokenizer"
VIT_HF_DIR = "vit_hf"
HEADS_DIR = heads_lib.HEADS_DIR
VOI_MODES = ("none", "window")
# config.json model fields that model_config.json must agree with.
_SHARED_FIELDS = ("embed_dim", "local_hidden", "simclr_out", "text_pool", "max_sentences",
                  "sentence_features")
_TOKENIZER_PROBE = "Procedure: screening mammogram. Breast composition: dense; BI-RADS Category 1."


def check_decode(decode: dict, where: str) -> dict:
    """The data_prep reader settings of a package: {long_side, voi, j2k_reduce}, checked."""
    if not isinstance(decode, dict):
        raise PackageError(f"{where}: decode must be a dict, got {type(decode).__name__}")
    missing = [k for k in ("long_side", "voi", "j2k_reduce") if k not in decode]
    if missing:
        raise PackageError(f"{where}: decode.{missing[0]} is missing")
    if not isinstance(decode["long_side"], int) or decode["long_side"] < 1:
        raise PackageError(f"{where}: decode.long_side must be a positive int, got {decode['long_side']!r}")
    if decode["voi"] not in VOI_MODES:
        raise PackageError(f"{where}: decode.voi={decode['voi']!r}; choose from {', '.join(VOI_MODES)}")
    return {"long_side": int(decode["long_side"]), "voi": str(decode["voi"]),
            "j2k_reduce": bool(decode["j2k_reduce"])}


# ----------------------------------------------------------------------------- write

def _check_tokenizer(tok: tok_lib.TextTokenizer, folder: str) -> None:
    """The saved tokenizer must give the same ids (load_tokenizer re-adds MaMA's tokens)."""
    back = tok_lib.load_tokenizer(folder)
    want = (len(tok.hf), tok.bos_id, tok.eos_id, tok.pad_id, tok.sep_id)
    got = (len(back.hf), back.bos_id, back.eos_id, back.pad_id, back.sep_id)
    if want != got:
        raise PackageError(f"{folder}: saved tokenizer differs (size, bos, eos, pad, sep) {got} != {want}")
    a = tok_lib.encode_caption(tok, _TOKENIZER_PROBE, 64).input_ids
    b = tok_lib.encode_caption(back, _TOKENIZER_PROBE, 64).input_ids
    if not np.array_equal(a, b):
        raise PackageError(f"{folder}: saved tokenizer encodes text differently")


def _is_package(path: str) -> bool:
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_package(model: mama.MaMA, tok: tok_lib.TextTokenizer, pretrain_cfg: dict, step: int,
                  out_dir: str, *, source: str = "", decode: dict | None = None,
                  heads: list | None = None) -> str:
    """Write the package of an in-memory model; returns the absolute out_dir.

    decode: the data_prep reader settings of the training records (check_decode);
    heads: heads_lib.ProbeHead / FinetuneHead objects to carry. Built in OUT.partial
    and renamed at the end, so a crash never leaves a half-written package under
    out_dir; an existing package there is replaced.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PackageError(f"{out_dir}: exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not _is_package(out_dir):
        raise PackageError(f"{out_dir}: exists and is not an export package; refusing to overwrite it")
    decode = check_decode(decode or {"long_side": 1036, "voi": "none", "j2k_reduce": True}, "decode")
    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = nnx.to_pure_dict(nnx.state(model))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(tmp, STATE_DIR), state)
    with open(os.path.join(tmp, MODEL_CONFIG_FILE), "w") as f:
        json.dump(mama.config_to_dict(model.cfg), f, indent=2)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step), "source": source,
            "decode": decode, "config": pretrain_cfg}
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    tok.hf.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))
    _check_tokenizer(tok, os.path.join(tmp, TOKENIZER_DIR))
    export_dinov2_hf(model.vision, os.path.join(tmp, VIT_HF_DIR))
    if heads:
        heads_lib.write_heads(heads, os.path.join(tmp, HEADS_DIR))
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


# ----------------------------------------------------------------------------- load

def read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise PackageError(f"{path}: missing; not a mama_jax export package (make one with "
                           "python -m mama_jax.main --config=configs/export.py)")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as err:
        raise PackageError(f"{path}: not valid JSON: {err}") from err


def _field(d: dict, keys: tuple, source: str):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            raise PackageError(f"{source}: field {'.'.join(keys)} is missing")
        d = d[k]
    return d


def _mama_config(path: str, meta: dict) -> mama.MaMAConfig:
    source = os.path.join(path, MODEL_CONFIG_FILE)
    mc = read_json(source)
    try:
        for part in ("vit", "text", "mama"):
            _field(mc, (part,), source)
        cfg = mama.config_from_dict(mc)
        # Inference needs neither remat nor a GPU-only attention kernel; shapes are unchanged.
        cfg = dataclasses.replace(
            cfg, vit=dataclasses.replace(cfg.vit, remat=False, attention_impl=None),
            text=dataclasses.replace(cfg.text, remat=False, attention_impl=None))
    except (TypeError, ValueError) as err:
        raise PackageError(f"{source}: invalid model config: {err}") from err
    config_path = os.path.join(path, CONFIG_FILE)
    for name in _SHARED_FIELDS:
        theirs = _field(meta, ("config", "model", name), config_path)
        if theirs != getattr(cfg, name):
            raise PackageError(f"{config_path}: config.model.{name}={theirs!r} disagrees with "
                               f"{source} ({getattr(cfg, name)!r}); the package was edited or mixed")
    return cfg


def load_package(path: str):
    """InferenceModel from an export package folder (see the module docstring)."""
    from mama_jax.export.inference import InferenceModel

    path = os.path.abspath(os.fspath(path))
    config_path = os.path.join(path, CONFIG_FILE)
    meta = read_json(config_path)
    if meta.get("format") != FORMAT:
        raise PackageError(f"{config_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise PackageError(f"{config_path}: format_version {meta.get('format_version')!r}; "
                           f"this mama_jax reads versions {READABLE_VERSIONS}")
    cfg = _mama_config(path, meta)
    model = restore_module(lambda: mama.MaMA(cfg, rngs=nnx.Rngs(0)), os.path.join(path, STATE_DIR),
                           MODEL_CONFIG_FILE)
    tok_dir = os.path.join(path, TOKENIZER_DIR)
    if not os.path.isdir(tok_dir):
        raise PackageError(f"{tok_dir}: missing tokenizer folder")
    tok = tok_lib.load_tokenizer(tok_dir)
    if tok.sep_id != cfg.sep_id:
        raise PackageError(f"{tok_dir}: SEP id {tok.sep_id} != the model's {cfg.sep_id}")
    data = _field(meta, ("config", "data"), config_path)
    max_log_scale = meta["config"].get("loss", {}).get("max_log_scale") or None
    decode = check_decode(meta["decode"], f"{config_path}: decode") if "decode" in meta else None
    heads = heads_lib.read_heads(os.path.join(path, HEADS_DIR), cfg.vit, cfg.embed_dim)
    return InferenceModel(model, tok,
                          image_size=int(_field(data, ("image_size",), config_path)),
                          max_length=int(_field(data, ("max_length",), config_path)),
                          max_log_scale=max_log_scale, step=int(meta.get("step", -1)), path=path,
                          decode=decode, heads=heads)
