"""VisionTransformer -> a transformers Dinov2Model / Dinov2WithRegistersModel folder.

The exact inverse of the transformers naming in convert_dinov2.py: kernels go
back to (out, in), the patch conv HWIO -> OIHW, scanned blocks are unstacked
into encoder.layer.<i>. The folder (config.json + model.safetensors) loads with
`AutoModel.from_pretrained(folder)` with no missing or unexpected keys; DINOv2
has no pooler (pooler_output is the post-norm CLS).

Inputs stay MaMA's: eval geometry (aspect kept, padded square) normalised to
[-1, 1] (mama_jax.input.augment.eval_transform), not ImageNet statistics.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
from flax import nnx

from mama_jax.models.vit import ViTConfig, VisionTransformer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def hf_config_from_vit(cfg: ViTConfig) -> dict:
    """transformers config dict for `cfg` (Dinov2WithRegisters when it has registers)."""
    registers = cfg.num_registers > 0
    mlp_ratio = int(cfg.mlp_ratio) if float(cfg.mlp_ratio).is_integer() else float(cfg.mlp_ratio)
    if int(cfg.hidden * mlp_ratio) != cfg.mlp_hidden:
        raise ValueError(f"ViTConfig.mlp_ratio={cfg.mlp_ratio}: hidden*mlp_ratio is not an integer")
    hf = {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.heads,
        "mlp_ratio": mlp_ratio,
        "patch_size": cfg.patch_size,
        "image_size": cfg.pos_grid * cfg.patch_size,  # the position table's native size
        "num_channels": cfg.in_channels,
        "layer_norm_eps": cfg.ln_eps,
        "layerscale_value": cfg.layerscale_init,  # init only; the weights carry the values
        "hidden_act": "gelu",  # exact erf GELU, as VisionTransformer's Mlp
        "qkv_bias": True,
        "use_swiglu_ffn": False,
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "apply_layernorm": True,
        "dtype": "float32",
    }
    if registers:
        hf["num_register_tokens"] = cfg.num_registers
    else:
        hf["use_mask_token"] = True
    return hf


def _f32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _linear_back(kernel) -> np.ndarray:
    return _f32(np.asarray(kernel).T)  # ours (in, out) -> torch (out, in)


def _blocks(state: dict, cfg: ViTConfig) -> list[dict]:
    """Per-layer pure dicts, whether the tower is scanned (leading layer axis) or not."""
    blocks = state["blocks"]
    if cfg.scan_layers:
        return [_index_tree(blocks, i) for i in range(cfg.depth)]
    keyed = {int(k): v for k, v in blocks.items()}
    return [keyed[i] for i in range(cfg.depth)]


def _index_tree(tree, i: int):
    if isinstance(tree, dict):
        return {k: _index_tree(v, i) for k, v in tree.items()}
    return np.asarray(tree)[i]


def dinov2_hf_tensors(vit_model: VisionTransformer) -> dict[str, np.ndarray]:
    """The tower's weights under transformers' Dinov2 names, fp32 numpy."""
    cfg = vit_model.cfg
    state = nnx.to_pure_dict(nnx.state(vit_model))
    kernel = np.asarray(state["patch_embed"]["kernel"], dtype=np.float32)  # HWIO
    out = {
        "embeddings.patch_embeddings.projection.weight": _f32(kernel.transpose(3, 2, 0, 1)),
        "embeddings.patch_embeddings.projection.bias": _f32(state["patch_embed"]["bias"]),
        "embeddings.cls_token": _f32(state["cls_token"]),
        "embeddings.position_embeddings": _f32(state["pos_embed"]),
        "embeddings.mask_token": _f32(state["mask_token"]),
        "layernorm.weight": _f32(state["norm"]["scale"]),
        "layernorm.bias": _f32(state["norm"]["bias"]),
    }
    if cfg.num_registers:
        out["embeddings.register_tokens"] = _f32(state["register_tokens"])
    for i, block in enumerate(_blocks(state, cfg)):
        pre = f"encoder.layer.{i}."
        for ours, theirs in (("query", "attention.attention.query"), ("key", "attention.attention.key"),
                             ("value", "attention.attention.value"), ("proj", "attention.output.dense")):
            out[f"{pre}{theirs}.weight"] = _linear_back(block["attn"][ours]["kernel"])
            out[f"{pre}{theirs}.bias"] = _f32(block["attn"][ours]["bias"])
        for norm in ("norm1", "norm2"):
            out[f"{pre}{norm}.weight"] = _f32(block[norm]["scale"])
            out[f"{pre}{norm}.bias"] = _f32(block[norm]["bias"])
        out[pre + "layer_scale1.lambda1"] = _f32(block["ls1"])
        out[pre + "layer_scale2.lambda1"] = _f32(block["ls2"])
        for fc in ("fc1", "fc2"):
            out[f"{pre}mlp.{fc}.weight"] = _linear_back(block["mlp"][fc]["kernel"])
            out[f"{pre}mlp.{fc}.bias"] = _f32(block["mlp"][fc]["bias"])
    return out


def _warn_if_resize_differs(cfg: ViTConfig) -> None:
    # transformers resizes the table bicubically to the exact grid, with antialias
    # in Dinov2WithRegisters only; other rules agree at the native size alone.
    if cfg.pos_offset or cfg.pos_antialias != (cfg.num_registers > 0):
        warnings.warn(
            f"export_dinov2_hf: this tower resizes its position table with antialias="
            f"{cfg.pos_antialias}, offset={cfg.pos_offset}; the transformers model resizes "
            "differently, so features agree only at the native image size "
            f"{cfg.pos_grid * cfg.patch_size} px", stacklevel=3)


def export_dinov2_hf(vit_model: VisionTransformer, out_dir: str) -> str:
    """Write config.json + model.safetensors for transformers; returns out_dir."""
    from safetensors.numpy import save_file

    if not isinstance(vit_model, VisionTransformer):
        raise TypeError(f"export_dinov2_hf: expected a VisionTransformer, got {type(vit_model).__name__}")
    cfg = vit_model.cfg
    hf = hf_config_from_vit(cfg)
    _warn_if_resize_differs(cfg)
    tensors = dinov2_hf_tensors(vit_model)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(hf, f, indent=2)
    return out_dir
