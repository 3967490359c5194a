"""PEFT-style LoRA for the GPT-2 text tower, on `nnx.LoRAParam`.

`nnx.LoRA` has neither the `alpha/r` scale nor input dropout that PEFT (and so
MaMA: r=8, alpha=32, dropout 0.1 on `c_attn`) uses, so this module adds both.
The frozen base kernel/bias are plain `nnx.Param` in the base storage dtype;
`lora_a`/`lora_b` are `nnx.LoRAParam` in fp32, so `nnx.LoRAParam` selects
exactly what trains (optimizer `wrt=`, gradient filter).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

# Which GPT-2 Conv1D layers LoRA may wrap. Names are the HF module paths with the
# dot replaced where the leaf name alone is ambiguous (two layers are `c_proj`).
LORA_TARGETS = {
    "c_attn": "attn.c_attn (fused q|k|v projection, D -> 3D)",
    "attn_c_proj": "attn.c_proj (attention output projection, D -> D)",
    "c_fc": "mlp.c_fc (MLP up projection, D -> inner)",
    "mlp_c_proj": "mlp.c_proj (MLP down projection, inner -> D)",
}

# PEFT writes targets as module-path suffixes; accept those spellings too.
_TARGET_ALIASES = {"attn.c_attn": "c_attn", "attn.c_proj": "attn_c_proj",
                   "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp_c_proj"}

lora_grad_filter = nnx.LoRAParam


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters. `targets` are keys of `LORA_TARGETS` (or PEFT paths)."""

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] = ("c_attn",)

    def __post_init__(self):
        targets = tuple(_TARGET_ALIASES.get(t, t) for t in self.targets)
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"LoRAConfig.targets: unknown target(s) {unknown}; "
                             f"choose from {sorted(LORA_TARGETS)}")
        if self.rank <= 0:
            raise ValueError(f"LoRAConfig.rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _is_row_keys(key: jax.Array) -> bool:
    """Whether `key` is one key per batch row ([B] typed keys or [B, 2] raw uint32 keys)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 1
    return key.ndim == 2


def split_key(key: jax.Array, n: int) -> jax.Array:
    """n keys from `key`, indexed along the first axis.

    One key gives [n] keys; per-row keys [B] give [n, B]: each row is split on its own, so
    a row's dropout masks depend on its own key only, never on which batch it came in
    (what makes micro-batched training equal to the whole batch at once).
    """
    if not _is_row_keys(key):
        return jax.random.split(key, n)
    return jax.vmap(lambda k: jax.random.split(k, n), out_axes=1)(key)


def dropout(x: jax.Array, rate: float, key: jax.Array | None, deterministic: bool) -> jax.Array:
    """Inverted dropout from an explicit key (no RNG state in modules, so scan/remat stay simple).

    `key` is one key for the whole array, or one key per row of x's first axis (split_key).
    """
    if deterministic or rate == 0.0:
        return x
    if key is None:
        raise ValueError("dropout is active (deterministic=False) but no RNG key was given")
    if _is_row_keys(key):
        keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, x.shape[1:]))(key)
    else:
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def peft_kaiming_uniform(key: jax.Array, shape: tuple[int, int], dtype: Any = jnp.float32) -> jax.Array:
    """PEFT's lora_A init: torch kaiming_uniform_(a=sqrt(5)) on a (r, in) weight.

    gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), bound = gain * sqrt(3 / fan_in) = 1/sqrt(fan_in),
    with fan_in = in_features. Stored here transposed as (in, r).
    """
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


class LoRALinear(nnx.Module):
    """y = x @ W + b + (dropout(x) @ A @ B) * alpha / r, W/b frozen, A/B trainable.

    Parameter names `kernel`/`bias` match `nnx.Linear`, so checkpoint conversion
    is the same whether or not a layer carries LoRA.
    """

    def __init__(self, in_features: int, out_features: int, *, lora: LoRAConfig,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 lora_param_dtype: Any = jnp.float32,
                 kernel_init: Callable = nnx.initializers.normal(0.02), rngs: nnx.Rngs):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.rate = lora.dropout
        self.scale = lora.scale
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))
        self.lora_a = nnx.LoRAParam(
            peft_kaiming_uniform(rngs.params(), (in_features, lora.rank), lora_param_dtype))
        self.lora_b = nnx.LoRAParam(jnp.zeros((lora.rank, out_features), lora_param_dtype))

    def __call__(self, x: jax.Array, *, deterministic: bool = True,
                 key: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        y = x @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)
        h = dropout(x, self.rate, key, deterministic)
        delta = (h @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype)
        return y + delta * jnp.asarray(self.scale, self.dtype)


class PlainLinear(nnx.Module):
    """A frozen Conv1D-style linear (kernel (in, out)); same call signature as LoRALinear."""

    def __init__(self, in_features: int, out_features: int, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32,
                 kernel_init: Callable = nnx.initializers.normal(0.02), rngs: nnx.Rngs):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))

    def __call__(self, x: jax.Array, *, deterministic: bool = True,
                 key: jax.Array | None = None) -> jax.Array:
        del deterministic, key
        x = x.astype(self.dtype)
        return x @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)


def make_linear(name: str, in_features: int, out_features: int, *, lora: LoRAConfig | None,
                dtype: Any, param_dtype: Any, kernel_init: Callable, rngs: nnx.Rngs) -> nnx.Module:
    """LoRALinear if `name` is a LoRA target, else PlainLinear."""
    if lora is not None and name in lora.targets:
        return LoRALinear(in_features, out_features, lora=lora, dtype=dtype,
                          param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
    return PlainLinear(in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                       kernel_init=kernel_init, rngs=rngs)


def lora_value_and_grad(loss_fn: Callable, *, wrt: Any = nnx.LoRAParam, has_aux: bool = False):
    """value_and_grad of `loss_fn(model, *args)` w.r.t. the `wrt` variables of `model` only.

    Without the DiffState restriction nnx differentiates every `nnx.Param`,
    i.e. the whole frozen base. DiffState is kept in this one place because
    FLIP 5310 plans to remove prefix filters; swap to nnx.split + jax.grad here.
    `wrt` may widen the set (e.g. nnx.Any(nnx.LoRAParam, AddedTokenEmbedding)).
    """
    return nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)
