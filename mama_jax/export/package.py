"""Inference package of a pretrained MaMA: export it, load it back without the run.

  python -m mama_jax.main --config=configs/export.py --workdir=runs/mama/export_job \
      --config.pretrain_workdir=runs/mama [--config.out_dir=DIR] [--config.step=N]

A package folder holds
  state/             Orbax checkpoint of the whole model (towers, heads, temperatures,
                     BatchNorm statistics) as a pure dict
  model_config.json  the ViT / text / MaMA configs of the restored model: the model is
                     rebuilt from these, so towers loaded from weight files need no files
  config.json        the pretraining config, the exported step, the format version
  tokenizer/         the caption tokenizer with MaMA's special tokens
  vit_hf/            the vision tower as a transformers Dinov2(WithRegisters)Model

`mama_jax.load(path)` gives an InferenceModel: encode_images, encode_texts,
zero_shot, preprocess. Neither the dataset nor the pretraining workdir is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from mama_jax.models import mama
from mama_jax.models import tokenizer as tok_lib
from mama_jax.models.export_hf import export_dinov2_hf

FORMAT = "mama_jax.export"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_CONFIG_FILE = "model_config.json"
STATE_DIR = "state"
TOKENIZER_DIR = "tokenizer"
VIT_HF_DIR = "vit_hf"
# config.json model fields that model_config.json must agree with.
_SHARED_FIELDS = ("embed_dim", "local_hidden", "simclr_out", "text_pool", "max_sentences",
                  "sentence_features")
_TOKENIZER_PROBE = "Procedure: screening mammogram. Breast composition: dense; BI-RADS Category 1."


class PackageError(ValueError):
    """An export package is missing a file or its parts disagree; the message names the path."""


# ----------------------------------------------------------------------------- export

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
                  out_dir: str, *, source: str = "") -> str:
    """Write the package of an in-memory model; returns the absolute out_dir.

    Built in OUT.partial and renamed at the end, so a crash never leaves a
    half-written package under out_dir; an existing package there is replaced.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PackageError(f"{out_dir}: exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not _is_package(out_dir):
        raise PackageError(f"{out_dir}: exists and is not an export package; refusing to overwrite it")
    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = nnx.to_pure_dict(nnx.state(model))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(tmp, STATE_DIR), state)
    with open(os.path.join(tmp, MODEL_CONFIG_FILE), "w") as f:
        json.dump(mama.config_to_dict(model.cfg), f, indent=2)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step), "source": source,
            "config": pretrain_cfg}
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    tok.hf.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))
    _check_tokenizer(tok, os.path.join(tmp, TOKENIZER_DIR))
    export_dinov2_hf(model.vision, os.path.join(tmp, VIT_HF_DIR))
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


def export_package(pretrain_workdir: str, out_dir: str, *, step: int | None = None) -> str:
    """Restore a pretraining run's checkpoint (latest, or `step`) and write its package."""
    from mama_jax.evaluate import restore

    cfg = restore.load_pretrain_config(pretrain_workdir)
    model, tok, step = restore.restore_model(pretrain_workdir, step=step)
    return write_package(model, tok, json.loads(cfg.to_json_best_effort()), step, out_dir,
                         source=os.path.abspath(pretrain_workdir))


def run(cfg, workdir: str) -> dict:
    """Export job: cfg.pretrain_workdir -> cfg.out_dir (default WORKDIR/export)."""
    from mama_jax import factory

    factory.require_path(cfg.pretrain_workdir, "pretrain_workdir",
                         "pass --config.pretrain_workdir=<the pretraining run's --workdir>")
    out_dir = cfg.out_dir or os.path.join(workdir, "export")
    path = export_package(cfg.pretrain_workdir, out_dir, step=None if cfg.step < 0 else int(cfg.step))
    with open(os.path.join(path, CONFIG_FILE)) as f:
        step = json.load(f)["step"]
    result = {"out_dir": path, "step": step, "vit_hf": os.path.join(path, VIT_HF_DIR)}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "export_result.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


# ----------------------------------------------------------------------------- load

def _read_json(path: str) -> dict:
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
    mc = _read_json(source)
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


def _restore_state(state_dir: str, target: dict) -> dict:
    """Restore into ShapeDtypeStruct targets after checking paths and shapes against the metadata."""
    if not os.path.isdir(state_dir):
        raise PackageError(f"{state_dir}: missing model state")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            stored = ckptr.metadata(state_dir).item_metadata.tree
        except Exception as err:  # noqa: BLE001 (orbax raises several types)
            raise PackageError(f"{state_dir}: unreadable Orbax checkpoint: {err}") from err
        name = lambda k: "/".join(map(str, k))
        have = {name(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(stored).items()}
        want = {name(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(target).items()}
        problems = [f"missing {k}" for k in want if k not in have]
        problems += [f"unexpected {k}" for k in have if k not in want]
        problems += [f"{k}: stored {have[k]} != model {want[k]}" for k in want if k in have and have[k] != want[k]]
        if problems:
            shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
            raise PackageError(f"{state_dir}: state does not match {MODEL_CONFIG_FILE}: {shown}")
        try:
            return ckptr.restore(state_dir, target)
        except (ValueError, KeyError) as err:
            raise PackageError(f"{state_dir}: cannot restore: {err}") from err


def load_package(path: str) -> "InferenceModel":
    """InferenceModel from an export package folder (see the module docstring)."""
    path = os.path.abspath(os.fspath(path))
    config_path = os.path.join(path, CONFIG_FILE)
    meta = _read_json(config_path)
    if meta.get("format") != FORMAT:
        raise PackageError(f"{config_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"{config_path}: format_version {meta.get('format_version')!r}; "
                           f"this mama_jax reads version {FORMAT_VERSION}")
    cfg = _mama_config(path, meta)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: mama.MaMA(cfg, rngs=nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(abstract, _restore_state(os.path.join(path, STATE_DIR), target))
    tok_dir = os.path.join(path, TOKENIZER_DIR)
    if not os.path.isdir(tok_dir):
        raise PackageError(f"{tok_dir}: missing tokenizer folder")
    tok = tok_lib.load_tokenizer(tok_dir)
    if tok.sep_id != cfg.sep_id:
        raise PackageError(f"{tok_dir}: SEP id {tok.sep_id} != the model's {cfg.sep_id}")
    data = _field(meta, ("config", "data"), config_path)
    max_log_scale = meta["config"].get("loss", {}).get("max_log_scale") or None
    return InferenceModel(nnx.merge(graphdef, abstract), tok,
                          image_size=int(_field(data, ("image_size",), config_path)),
                          max_length=int(_field(data, ("max_length",), config_path)),
                          max_log_scale=max_log_scale, step=int(meta.get("step", -1)), path=path)


def _l2(x: jax.Array) -> jax.Array:
    from mama_jax.losses import l2_normalize

    return l2_normalize(x.astype(jnp.float32))


class InferenceModel:
    """A pretrained MaMA for inference: L2-normalised embeddings and zero-shot scores."""

    def __init__(self, model: mama.MaMA, tok: tok_lib.TextTokenizer, *, image_size: int,
                 max_length: int, max_log_scale: float | None = None, step: int = -1, path: str = ""):
        self.model, self.tokenizer = model, tok
        self.image_size, self.max_length, self.step, self.path = image_size, max_length, step, path
        self.vit_hf_path = os.path.join(path, VIT_HF_DIR) if path else ""
        log_scale = float(np.asarray(model.logit_scale[...]))
        # Training clamps the scale (loss.max_log_scale); zero-shot uses what training saw.
        self.logit_scale = min(log_scale, max_log_scale) if max_log_scale else log_scale
        graphdef, state = nnx.split(model)
        self._state = state
        self._images = jax.jit(lambda s, x: _l2(nnx.merge(graphdef, s).encode_images(x)))
        self._texts = jax.jit(lambda s, ids, mask: _l2(nnx.merge(graphdef, s).encode_texts(ids, mask)))

    @property
    def embed_dim(self) -> int:
        return self.model.cfg.embed_dim

    def preprocess(self, image_u16: np.ndarray) -> np.ndarray:
        """A uint16 [H, W] breast image (data_prep record) -> float32 [S, S, 3], as evaluation."""
        from mama_jax.augment import eval_transform

        image = np.asarray(image_u16)
        if image.ndim != 2:
            raise ValueError(f"preprocess: expected a 2-D uint16 image [H, W], got shape {image.shape}")
        return eval_transform(image, self.image_size)

    def encode_images(self, images) -> np.ndarray:
        """Normalised images [B, S, S, 3] (see preprocess) -> L2-normalised embeddings [B, d]."""
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"encode_images: expected images [B, S, S, 3], got shape {images.shape}")
        return np.asarray(self._images(self._state, images))

    def encode_texts(self, texts) -> np.ndarray:
        """Captions or prompts -> L2-normalised embeddings [B, d]."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_texts: expected a list of strings")
        enc = tok_lib.encode_captions(self.tokenizer, list(texts), self.max_length)
        return np.asarray(self._texts(self._state, enc.input_ids, enc.attention_mask))

    def zero_shot(self, images, prompts) -> np.ndarray:
        """Class probabilities [B, len(prompts)]: softmax(exp(logit_scale) * cos)."""
        if not prompts:
            raise ValueError("zero_shot: prompts is empty")
        scores = np.exp(self.logit_scale) * (self.encode_images(images) @ self.encode_texts(prompts).T)
        return np.asarray(jax.nn.softmax(jnp.asarray(scores, jnp.float32), axis=-1))
