"""Projection heads of MaMA (spec/reference_behaviour.md §1.4).

Global heads are single Linear layers; the local heads and the SimCLR head are
token-wise MLPs with BatchNorm. BatchNorm statistics are taken over every
valid token of the (global) batch: under jit on a sharded batch XLA reduces
across devices, which is SyncBN, and a mask keeps padded sentence slots out
(departure D18).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _bn(features: int, *, affine: bool, rngs: nnx.Rngs) -> nnx.BatchNorm:
    # torch momentum 0.1 == flax momentum 0.9; statistics kept in fp32.
    return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, use_bias=affine, use_scale=affine,
                         dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)


class TokenMLP(nnx.Module):
    """Linear -> BN -> ReLU -> Linear -> BN, applied to each token of [B, N, D]."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, *, bias: bool, final_affine: bool,
                 dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(d_in, d_hidden, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                              rngs=rngs)
        self.bn1 = _bn(d_hidden, affine=True, rngs=rngs)
        self.fc2 = nnx.Linear(d_hidden, d_out, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                              rngs=rngs)
        self.bn2 = _bn(d_out, affine=final_affine, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, train: bool) -> jax.Array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        m = None if mask is None else mask.reshape(-1, 1)
        h = self.fc1(x)
        h = jax.nn.relu(self.bn1(h, use_running_average=not train, mask=m))
        h = self.bn2(self.fc2(h), use_running_average=not train, mask=m)
        return h.reshape(*shape[:-1], h.shape[-1])


class Scalar(nnx.Param):
    """A learnable log-temperature (no weight decay, never sharded)."""
