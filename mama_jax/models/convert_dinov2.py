"""DINOv2 checkpoints (transformers folders or torch-hub .pth) -> VisionTransformer.

Two name tables map source tensors onto our parameter tree, strictly: every
tensor must be used once with the expected shape, or ConversionError lists the
missing, wrong-shape and unexpected names. Linear weights are (out, in) in
PyTorch and (in, out) here; the patch conv goes OIHW -> HWIO. torch-hub fuses
q|k|v into one `attn.qkv` tensor, which is split into thirds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from mama_jax.models.vit import (ViTConfig, VisionTransformer, vit_config_from_dict,
                                 vit_config_to_dict)
from mama_jax.models.weights import ConversionError, StrictTensors, file_shapes, load_tensors

__all__ = [
    "ConversionError", "Dinov2Checkpoint", "detect_naming", "dinov2_state_from_tensors",
    "hf_config_to_vit", "hub_config_from_tensors", "load_dinov2", "model_from_state",
    "read_dinov2", "vit_config_from_dict", "vit_config_to_dict",
]

_HF_TYPES = ("dinov2", "dinov2_with_registers")


# ----------------------------------------------------------------------------- configs

def _pair_to_int(value, field: str, source: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"{source}: config field {field}={value} is not square; unsupported")
        value = value[0]
    return int(value)


def hf_config_to_vit(hf: dict, source: str = "config.json") -> ViTConfig:
    """ViTConfig from a transformers Dinov2 / Dinov2WithRegisters config dict."""
    model_type = hf.get("model_type")
    if model_type not in _HF_TYPES:
        raise ConversionError(f"{source}: model_type {model_type!r} is not one of {_HF_TYPES}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ConversionError(f"{source}: config field {key!r} is missing")
    if hf.get("use_swiglu_ffn", False):
        raise ConversionError(f"{source}: use_swiglu_ffn=true (ViT-g) is not supported")
    if not hf.get("qkv_bias", True):
        raise ConversionError(f"{source}: qkv_bias=false is not supported")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported (want 'gelu')")
    patch = _pair_to_int(hf.get("patch_size", 14), "patch_size", source)
    image = _pair_to_int(hf.get("image_size", 518), "image_size", source)
    registers = int(hf.get("num_register_tokens", 4)) if model_type == "dinov2_with_registers" else 0
    return ViTConfig(
        hidden=int(hf["hidden_size"]), depth=int(hf["num_hidden_layers"]),
        heads=int(hf["num_attention_heads"]), patch_size=patch,
        mlp_ratio=float(hf.get("mlp_ratio", 4)), num_registers=registers,
        in_channels=int(hf.get("num_channels", 3)),
        layerscale_init=float(hf.get("layerscale_value", 1.0)),
        ln_eps=float(hf.get("layer_norm_eps", 1e-6)), pos_grid=image // patch,
        # transformers: Dinov2 resizes without antialias, Dinov2WithRegisters with it.
        pos_antialias=model_type == "dinov2_with_registers", pos_offset=0.0)


def hub_config_from_tensors(tensors: dict[str, np.ndarray], source: str = "checkpoint",
                            heads: int | None = None) -> ViTConfig:
    """ViTConfig inferred from a torch-hub DinoVisionTransformer state dict.

    Shapes do not show the head count; DINOv2 uses 64-dim heads, so it is dim / 64
    unless `heads` is given.
    """
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    absent = [n for n in need if n not in tensors]
    if absent:
        found = ", ".join(sorted(tensors)[:8])
        raise ConversionError(f"{source}: not a DINOv2 torch-hub checkpoint, missing tensors: "
                              f"{', '.join(absent)} (found: {found}{', ...' if len(tensors) > 8 else ''})")
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in tensors):
        raise ConversionError(f"{source}: chunked block layout (blocks.<chunk>.<i>.) is not supported")
    dim = int(tensors["cls_token"].shape[-1])
    proj = tensors["patch_embed.proj.weight"]
    if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise ConversionError(f"{source}: patch_embed.proj.weight has shape {proj.shape}, want (D, C, p, p)")
    depth = 1 + max((int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))),
                    default=-1)
    if depth == 0:
        raise ConversionError(f"{source}: no blocks.<i>.* tensors found")
    if heads is None and dim % 64:
        raise ConversionError(f"{source}: embed dim {dim} is not a multiple of the head size 64; "
                              "pass the head count (config_overrides={'heads': n})")
    n_pos = tensors["pos_embed"].shape[1] - 1
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ConversionError(f"{source}: pos_embed has {n_pos} patch positions, not a square grid")
    fc1 = tensors.get("blocks.0.mlp.fc1.weight")
    registers = int(tensors["register_tokens"].shape[1]) if "register_tokens" in tensors else 0
    return ViTConfig(
        hidden=dim, depth=depth, heads=heads or dim // 64, patch_size=int(proj.shape[-1]),
        mlp_ratio=(fc1.shape[0] / dim) if fc1 is not None else 4.0, num_registers=registers,
        in_channels=int(proj.shape[1]), layerscale_init=1.0, ln_eps=1e-6, pos_grid=grid,
        # torch-hub: reg models antialias=True, offset 0; plain models antialias=False, offset 0.1.
        pos_antialias=registers > 0, pos_offset=0.0 if registers else 0.1)


# ----------------------------------------------------------------------------- tensors

def detect_naming(tensors: dict[str, np.ndarray], source: str = "checkpoint") -> str:
    if "embeddings.cls_token" in tensors:
        return "hf"
    if "cls_token" in tensors:
        return "hub"
    raise ConversionError(f"{source}: neither embeddings.cls_token (transformers) nor "
                          "cls_token (torch-hub) found: not a DINOv2 checkpoint")


def _linear_t(w):
    return None if w is None else np.ascontiguousarray(np.asarray(w).T)


def _block_hf(st: StrictTensors, i: int, cfg: ViTConfig) -> dict:
    d, m = cfg.hidden, cfg.mlp_hidden
    pre = f"encoder.layer.{i}."
    attn = {}
    for ours, theirs in (("query", "attention.attention.query"), ("key", "attention.attention.key"),
                         ("value", "attention.attention.value"), ("proj", "attention.output.dense")):
        attn[ours] = {"kernel": _linear_t(st.take(f"{pre}{theirs}.weight", (d, d))),
                      "bias": st.take(f"{pre}{theirs}.bias", (d,))}
    return {
        "norm1": {"scale": st.take(pre + "norm1.weight", (d,)), "bias": st.take(pre + "norm1.bias", (d,))},
        "attn": attn,
        "ls1": st.take(pre + "layer_scale1.lambda1", (d,)),
        "norm2": {"scale": st.take(pre + "norm2.weight", (d,)), "bias": st.take(pre + "norm2.bias", (d,))},
        "mlp": {"fc1": {"kernel": _linear_t(st.take(pre + "mlp.fc1.weight", (m, d))),
                        "bias": st.take(pre + "mlp.fc1.bias", (m,))},
                "fc2": {"kernel": _linear_t(st.take(pre + "mlp.fc2.weight", (d, m))),
                        "bias": st.take(pre + "mlp.fc2.bias", (d,))}},
        "ls2": st.take(pre + "layer_scale2.lambda1", (d,)),
    }


def _block_hub(st: StrictTensors, i: int, cfg: ViTConfig) -> dict:
    d, m = cfg.hidden, cfg.mlp_hidden
    pre = f"blocks.{i}."
    qkv_w = st.take(pre + "attn.qkv.weight", (3 * d, d))
    qkv_b = st.take(pre + "attn.qkv.bias", (3 * d,))
    attn = {}
    for j, name in enumerate(("query", "key", "value")):  # rows are [q; k; v]
        ok = qkv_w is not None and qkv_w.shape == (3 * d, d) and qkv_b is not None and qkv_b.shape == (3 * d,)
        attn[name] = {"kernel": _linear_t(qkv_w[j * d:(j + 1) * d]) if ok else None,
                      "bias": qkv_b[j * d:(j + 1) * d] if ok else None}
    attn["proj"] = {"kernel": _linear_t(st.take(pre + "attn.proj.weight", (d, d))),
                    "bias": st.take(pre + "attn.proj.bias", (d,))}
    return {
        "norm1": {"scale": st.take(pre + "norm1.weight", (d,)), "bias": st.take(pre + "norm1.bias", (d,))},
        "attn": attn,
        "ls1": st.take(pre + "ls1.gamma", (d,)),
        "norm2": {"scale": st.take(pre + "norm2.weight", (d,)), "bias": st.take(pre + "norm2.bias", (d,))},
        "mlp": {"fc1": {"kernel": _linear_t(st.take(pre + "mlp.fc1.weight", (m, d))),
                        "bias": st.take(pre + "mlp.fc1.bias", (m,))},
                "fc2": {"kernel": _linear_t(st.take(pre + "mlp.fc2.weight", (d, m))),
                        "bias": st.take(pre + "mlp.fc2.bias", (d,))}},
        "ls2": st.take(pre + "ls2.gamma", (d,)),
    }


# Top-level names: ours -> (transformers, torch-hub).
_TOP_NAMES = {
    "patch_kernel": ("embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight"),
    "patch_bias": ("embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias"),
    "cls_token": ("embeddings.cls_token", "cls_token"),
    "register_tokens": ("embeddings.register_tokens", "register_tokens"),
    "pos_embed": ("embeddings.position_embeddings", "pos_embed"),
    "mask_token": ("embeddings.mask_token", "mask_token"),
    "norm_scale": ("layernorm.weight", "norm.weight"),
    "norm_bias": ("layernorm.bias", "norm.bias"),
}


def dinov2_state_from_tensors(tensors: dict[str, np.ndarray], cfg: ViTConfig, *,
                              naming: str | None = None, source: str = "checkpoint",
                              mask_token_optional: bool = False) -> dict:
    """Pure nested dict shaped like `nnx.to_pure_dict(nnx.state(VisionTransformer(cfg)))`.

    `naming` is "hf" (transformers) or "hub" (torch-hub), detected when None.
    Blocks are stacked on a leading axis when `cfg.scan_layers`, else keyed 0..L-1.
    Raises ConversionError naming every missing, wrong-shape or unexpected tensor.
    """
    naming = naming or detect_naming(tensors, source)
    if naming not in ("hf", "hub"):
        raise ValueError(f"naming must be 'hf' or 'hub', got {naming!r}")
    col = 0 if naming == "hf" else 1
    name = {k: v[col] for k, v in _TOP_NAMES.items()}
    st = StrictTensors(tensors, source)
    d, p, c, g = cfg.hidden, cfg.patch_size, cfg.in_channels, cfg.pos_grid

    kernel = st.take(name["patch_kernel"], (d, c, p, p))
    state = {
        "patch_embed": {"kernel": None if kernel is None else np.ascontiguousarray(kernel.transpose(2, 3, 1, 0)),
                        "bias": st.take(name["patch_bias"], (d,))},
        "cls_token": st.take(name["cls_token"], (1, 1, d)),
        "pos_embed": st.take(name["pos_embed"], (1, 1 + g * g, d)),
        "norm": {"scale": st.take(name["norm_scale"], (d,)), "bias": st.take(name["norm_bias"], (d,))},
    }
    if mask_token_optional and not st.has(name["mask_token"]):
        state["mask_token"] = np.zeros((1, d), np.float32)
    else:
        state["mask_token"] = st.take(name["mask_token"], (1, d))
    if cfg.num_registers:
        state["register_tokens"] = st.take(name["register_tokens"], (1, cfg.num_registers, d))
    block_fn = _block_hf if naming == "hf" else _block_hub
    blocks = [block_fn(st, i, cfg) for i in range(cfg.depth)]
    st.finish()  # raises before any None (missing/mis-shaped tensor) is used

    if cfg.scan_layers:
        state["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    else:
        state["blocks"] = dict(enumerate(blocks))
    return state


def model_from_state(cfg: ViTConfig, state: dict, source: str = "checkpoint") -> VisionTransformer:
    """A VisionTransformer holding `state` (pure dict), cast to cfg.param_dtype.

    The model is built abstractly, so no random init is spent on weights that are
    overwritten; tree paths and shapes are checked against the architecture.
    """
    abstract = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    want = traverse_util.flatten_dict(nnx.to_pure_dict(abs_state))
    have = traverse_util.flatten_dict(state)
    path = lambda k: "/".join(map(str, k))
    missing = [path(k) for k in want if k not in have]
    extra = [path(k) for k in have if k not in want]
    shapes = [f"{path(k)}: {tuple(np.shape(v))} != {tuple(want[k].shape)}"
              for k, v in have.items() if k in want and tuple(np.shape(v)) != tuple(want[k].shape)]
    if missing or extra or shapes:
        raise ConversionError(f"{source}: state does not fit the model: missing {missing}, "
                              f"unexpected {extra}, wrong shapes {shapes}")
    cast = {k: jnp.asarray(v, dtype=want[k].dtype) for k, v in have.items()}
    nnx.replace_by_pure_dict(abs_state, traverse_util.unflatten_dict(cast))
    return nnx.merge(graphdef, abs_state)


# ----------------------------------------------------------------------------- loading

class Dinov2Checkpoint(NamedTuple):
    cfg: ViTConfig
    tensors: dict[str, np.ndarray]
    naming: str  # "hf" or "hub"
    mask_token_optional: bool  # transformers Dinov2Config(use_mask_token=False) saves none


def read_dinov2(path: str, *, hub_heads: int | None = None) -> Dinov2Checkpoint:
    """Config and tensors of a transformers folder or a torch-hub / single-file checkpoint.

    `hub_heads` overrides the torch-hub head count (dim / 64).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        # Config first: a folder of another architecture is reported by its model_type
        # before any weights are read.
        cfg, mask_optional = _hf_config(path, path)
        return Dinov2Checkpoint(cfg, _nonempty(load_tensors(path), path), "hf", mask_optional)
    tensors = _nonempty(load_tensors(path), path)
    return Dinov2Checkpoint(**_file_config(path, tensors, hub_heads), tensors=tensors)


def _file_config(path: str, tensors: dict, hub_heads: int | None) -> dict:
    """cfg, naming and mask_token_optional of a single-file checkpoint from its tensors
    (or stand-ins with their shapes): transformers names read the config.json beside it."""
    if detect_naming(tensors, path) == "hf":
        cfg, mask_optional = _hf_config(os.path.dirname(path), path)
        return dict(cfg=cfg, naming="hf", mask_token_optional=mask_optional)
    return dict(cfg=hub_config_from_tensors(tensors, path, hub_heads), naming="hub",
                mask_token_optional=False)


def _hf_config(folder: str, source: str) -> tuple[ViTConfig, bool]:
    """(config, mask token optional) from the config.json in `folder`."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise ConversionError(f"{source}: transformers checkpoint without {config_path}")
    with open(config_path) as f:
        hf = json.load(f)
    return hf_config_to_vit(hf, config_path), not hf.get("use_mask_token", True)


def _nonempty(tensors: dict, source: str) -> dict:
    if not tensors:
        raise ConversionError(f"{source}: checkpoint holds no tensors")
    return tensors


def dinov2_config(path: str, *, hub_heads: int | None = None) -> ViTConfig:
    """The ViTConfig of a DINOv2 checkpoint, read without its weights (`read_dinov2`'s cfg)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _hf_config(path, path)[0]
    return _file_config(path, _nonempty(file_shapes(path), path), hub_heads)["cfg"]


def abstract_dinov2(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    scan_layers: bool = False, remat: bool = False,
                    config_overrides: dict | None = None) -> VisionTransformer:
    """The shape-only tower that `load_dinov2` (same arguments) would fill: for a
    restore that overwrites every weight anyway."""
    overrides = dict(config_overrides or {})
    cfg = dataclasses.replace(dinov2_config(path, hub_heads=overrides.get("heads")), dtype=dtype,
                              param_dtype=param_dtype, scan_layers=scan_layers, remat=remat,
                              **overrides)
    return nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))


def load_dinov2(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32, scan_layers: bool = False,
                remat: bool = False, config_overrides: dict | None = None) -> VisionTransformer:
    """Load a DINOv2 / DINOv2-reg checkpoint as a VisionTransformer.

    `path`: a transformers folder (config.json + model.safetensors) or a torch-hub
    `.pth` such as dinov2_vitb14_reg4_pretrain.pth (sizes inferred from shapes).
    `config_overrides` replaces ViTConfig fields after inference (e.g. remat_policy).
    """
    overrides = dict(config_overrides or {})
    ckpt = read_dinov2(path, hub_heads=overrides.get("heads"))
    cfg = dataclasses.replace(ckpt.cfg, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                              remat=remat, **overrides)
    state = dinov2_state_from_tensors(ckpt.tensors, cfg, naming=ckpt.naming, source=os.fspath(path),
                                      mask_token_optional=ckpt.mask_token_optional)
    return model_from_state(cfg, state, os.fspath(path))
