"""DINOv2-style Vision Transformer in Flax NNX.

Matches PyTorch DINOv2 (transformers `Dinov2Model` / `Dinov2WithRegistersModel`
and the torch-hub `DinoVisionTransformer`) so converted checkpoints give the same
features: tokens are [CLS, registers..., patches]; registers get no position
embedding; the position table is resized to the input's patch grid in fp32.

Inputs are NHWC images, already normalised. Layers can be stacked and scanned
(params get a leading layer axis) with optional rematerialisation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mama_jax.models import config_dict

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_ATTENTION_IMPLS = (None, "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    hidden: int = 768
    depth: int = 12
    heads: int = 12
    patch_size: int = 14
    mlp_ratio: float = 4.0
    num_registers: int = 0
    in_channels: int = 3
    layerscale_init: float = 1e-5  # init for new models; loaded checkpoints bring their own
    ln_eps: float = 1e-6
    pos_grid: int = 37  # native patch grid of the position table (518 px / 14)
    pos_antialias: bool = False  # bicubic antialias when resizing the table (True for reg models)
    pos_offset: float = 0.0  # torch-hub non-reg models resize by scale (n + 0.1) / grid
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: bool = False
    remat_policy: str = "full"  # "full" (save nothing) or a jax.checkpoint_policies name
    attention_impl: str | None = None  # None, "xla" or "cudnn"

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"ViTConfig: hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.attention_impl not in _ATTENTION_IMPLS:
            raise ValueError(f"ViTConfig.attention_impl: {self.attention_impl!r} not in {_ATTENTION_IMPLS}")
        if self.remat_policy != "full" and not callable(
                getattr(jax.checkpoint_policies, self.remat_policy, None)):
            raise ValueError(f"ViTConfig.remat_policy: unknown policy {self.remat_policy!r} "
                             "(use 'full' or a name in jax.checkpoint_policies)")
        for name in ("dtype", "param_dtype"):
            if jnp.dtype(getattr(self, name)).name not in _DTYPES:
                raise ValueError(f"ViTConfig.{name}: unsupported dtype {getattr(self, name)!r}")

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


_PRESETS = {
    "tiny": dict(hidden=32, depth=2, heads=2, pos_grid=4),
    "small": dict(hidden=384, depth=12, heads=6, pos_grid=37),
    "base": dict(hidden=768, depth=12, heads=12, pos_grid=37),
    "large": dict(hidden=1024, depth=24, heads=16, pos_grid=37),
}


def vit_config(name: str, *, num_registers: int = 0, **overrides) -> ViTConfig:
    """A preset ("tiny", "small", "base", "large"), patch 14, with optional registers.

    Register models resize the position table with antialiasing, as DINOv2-reg does.
    """
    if name not in _PRESETS:
        raise ValueError(f"vit_config: unknown preset {name!r}; choose from {sorted(_PRESETS)}")
    kwargs = dict(_PRESETS[name], num_registers=num_registers, pos_antialias=num_registers > 0)
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def vit_config_to_dict(cfg: ViTConfig) -> dict:
    """JSON-safe dict (dtypes as names)."""
    return config_dict.to_dict(cfg)


def vit_config_from_dict(d: dict) -> ViTConfig:
    d = config_dict.known_fields(ViTConfig, d, "ViT config")
    for name in config_dict.DTYPE_FIELDS:
        if name in d and isinstance(d[name], str):
            if d[name] not in _DTYPES:
                raise ValueError(f"ViT config field {name}: unsupported dtype {d[name]!r}")
            d[name] = _DTYPES[d[name]]
    return ViTConfig(**d)


@struct.dataclass
class ViTOutput:
    cls: jax.Array  # [B, D] CLS after the final norm
    patch_tokens: jax.Array  # [B, P, D] patch tokens after the final norm
    prenorm: jax.Array  # [B, T, D] all tokens (CLS, registers, patches) before the final norm


_trunc02 = nnx.initializers.truncated_normal(stddev=0.02)


def _linear(cfg: ViTConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      kernel_init=_trunc02, rngs=rngs)


def _layernorm(cfg: ViTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Statistics are computed in fp32 by flax whatever the compute dtype.
    return nnx.LayerNorm(cfg.hidden, epsilon=cfg.ln_eps, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.heads = cfg.heads
        self.head_dim = cfg.head_dim
        self.impl = cfg.attention_impl
        self.query = _linear(cfg, cfg.hidden, cfg.hidden, rngs)
        self.key = _linear(cfg, cfg.hidden, cfg.hidden, rngs)
        self.value = _linear(cfg, cfg.hidden, cfg.hidden, rngs)
        self.proj = _linear(cfg, cfg.hidden, cfg.hidden, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, self.head_dim)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        # Logits and softmax run in fp32 inside the xla implementation.
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.impl)
        return self.proj(out.reshape(b, t, d))


class Mlp(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.fc1 = _linear(cfg, cfg.hidden, cfg.mlp_hidden, rngs)
        self.fc2 = _linear(cfg, cfg.mlp_hidden, cfg.hidden, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-norm block: x + ls1 * attn(norm1(x)); x + ls2 * mlp(norm2(x))."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.dtype = cfg.dtype
        self.norm1 = _layernorm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ls1 = nnx.Param(jnp.full((cfg.hidden,), cfg.layerscale_init, cfg.param_dtype))
        self.norm2 = _layernorm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.ls2 = nnx.Param(jnp.full((cfg.hidden,), cfg.layerscale_init, cfg.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x)) * self.ls1[...].astype(self.dtype)
        x = x + self.mlp(self.norm2(x)) * self.ls2[...].astype(self.dtype)
        return x


def _remat_policy(name: str):
    return None if name == "full" else getattr(jax.checkpoint_policies, name)


def _apply_block(x: jax.Array, block: Block) -> jax.Array:
    return block(x)


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, p = cfg.hidden, cfg.patch_size
        self.patch_embed = nnx.Conv(cfg.in_channels, d, kernel_size=(p, p), strides=(p, p),
                                    padding="VALID", dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                    kernel_init=_trunc02, rngs=rngs)
        small = nnx.initializers.normal(stddev=1e-6)
        self.cls_token = nnx.Param(small(rngs.params(), (1, 1, d), cfg.param_dtype))
        self.register_tokens = (
            nnx.Param(small(rngs.params(), (1, cfg.num_registers, d), cfg.param_dtype))
            if cfg.num_registers else None)
        self.pos_embed = nnx.Param(_trunc02(rngs.params(), (1, 1 + cfg.pos_grid ** 2, d), cfg.param_dtype))
        # Only used for masked-image pretraining; kept so checkpoints round-trip.
        self.mask_token = nnx.Param(jnp.zeros((1, d), cfg.param_dtype))
        if cfg.scan_layers:
            self.blocks = self._stacked_blocks(cfg, rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = _layernorm(cfg, rngs)

    @staticmethod
    def _stacked_blocks(cfg: ViTConfig, rngs: nnx.Rngs) -> Block:
        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def make(r: nnx.Rngs) -> Block:
            return Block(cfg, rngs=r)

        return make(rngs)

    def position_embedding(self, grid_h: int, grid_w: int, height: int, width: int) -> jax.Array:
        """The position table for a grid_h x grid_w patch grid, [1, 1 + grid_h*grid_w, D], fp32.

        Same rule as DINOv2: the table is used as-is when the patch count matches
        and the image is square; otherwise the patch part is resized bicubically.
        """
        cfg = self.cfg
        table = self.pos_embed[...].astype(jnp.float32)
        if grid_h * grid_w == cfg.pos_grid ** 2 and height == width:
            return table
        g, d = cfg.pos_grid, cfg.hidden
        grid = table[:, 1:].reshape(1, g, g, d)
        if cfg.pos_offset:
            # torch-hub non-reg: F.interpolate(scale_factor=(n + offset) / g).
            scale = jnp.array([(grid_h + cfg.pos_offset) / g, (grid_w + cfg.pos_offset) / g], jnp.float32)
            grid = jax.image.scale_and_translate(
                grid, (1, grid_h, grid_w, d), (1, 2), scale, jnp.zeros(2, jnp.float32),
                method="bicubic-pytorch", antialias=cfg.pos_antialias,
                precision=jax.lax.Precision.HIGHEST)
        else:
            grid = jax.image.resize(grid, (1, grid_h, grid_w, d), method="bicubic-pytorch",
                                    antialias=cfg.pos_antialias, precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([table[:, :1], grid.reshape(1, grid_h * grid_w, d)], axis=1)

    def _grey_patch_embed(self, grey: jax.Array) -> jax.Array:
        """uint16 [B, H, W] (0..65535) -> patch embeddings [B, h, w, D].

        The host used to send float32 [B, H, W, C] holding C copies of 2 x / 65535 - 1;
        that normalisation happens here, and since the C channels are equal the kernel is
        summed over them: the same maths with a C-th of this layer's FLOPs and input bytes.
        """
        conv, p = self.patch_embed, self.cfg.patch_size
        x = grey.astype(jnp.float32) * jnp.float32(2.0 / 65535.0) - jnp.float32(1.0)
        kernel = conv.kernel[...].astype(jnp.float32).sum(axis=2, keepdims=True)
        dtype = self.cfg.dtype
        y = jax.lax.conv_general_dilated(x[..., None].astype(dtype), kernel.astype(dtype), (p, p),
                                         "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + conv.bias[...].astype(dtype)

    def embed(self, images: jax.Array) -> jax.Array:
        """[B, H, W, C] in [-1, 1], or grey uint16 [B, H, W] -> tokens [B, 1 + R + h*w, D]
        in the compute dtype."""
        cfg = self.cfg
        if images.ndim == 3 and images.dtype == jnp.uint16:
            x = self._grey_patch_embed(images)  # [B, h, w, D]
        elif images.ndim == 4 and images.shape[-1] == cfg.in_channels:
            x = self.patch_embed(images)
        else:
            raise ValueError(f"VisionTransformer: expected images [B, H, W, {cfg.in_channels}] "
                             f"or grey uint16 [B, H, W], got {images.dtype} {images.shape}")
        b, height, width = images.shape[:3]
        _, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1)
        x = x + self.position_embedding(gh, gw, height, width).astype(x.dtype)
        if self.register_tokens is not None:
            regs = jnp.broadcast_to(self.register_tokens[...].astype(x.dtype), (b, cfg.num_registers, d))
            x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)
        return x

    def encode(self, x: jax.Array) -> jax.Array:
        """Run all blocks on tokens; returns the pre-norm states."""
        cfg = self.cfg
        body = _apply_block
        if cfg.remat:
            body = nnx.remat(body, policy=_remat_policy(cfg.remat_policy),
                             prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                            transform_metadata={nnx.PARTITION_NAME: None})(x, self.blocks)
        for block in self.blocks:
            x = body(x, block)
        return x

    def __call__(self, images: jax.Array) -> ViTOutput:
        prenorm = self.encode(self.embed(images))
        out = self.norm(prenorm)
        return ViTOutput(cls=out[:, 0], patch_tokens=out[:, 1 + self.cfg.num_registers:],
                         prenorm=prenorm)
