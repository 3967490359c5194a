"""One step's loss and gradients on the whole global batch, in one pass or in k micro-batches.

Both give the same numbers: the contrastive losses see every negative of the global batch
and the heads' BatchNorm takes its statistics over all of it. With k micro-batches only one
micro-batch's tower activations are alive at a time (GradCache, Gao et al. 2021, adapted to
MaMA's two towers and five heads):

  (a) run both towers on each micro-batch without gradient and cache what the heads read
      (MaMA.tower_features: g(x) of both views, the anchor's patch tokens, the text's
      pooled state and sentence inputs);
  (b) run the heads and eq. 4 once on the whole batch: gradients for the head parameters
      and for the cached features;
  (c) per micro-batch, recompute the towers and pull the cached features' gradients back
      through them (jax.vjp), summing the parameter gradients, inside a lax.scan.

This is exact because no tower op mixes samples, and because text dropout draws one key
per caption (`row_keys`), so a caption's masks are the same in (a), (c) and the one-pass
step. The cost is one more tower forward per step.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mama_jax.train import sharding

# loss_fn(model, embeddings) -> (total, parts): eq. 4 on the heads' embeddings.
LossFn = Callable[[nnx.Module, dict], tuple[jax.Array, dict]]


def row_keys(key: jax.Array, rows: jax.Array) -> jax.Array:
    """One dropout key per batch row, from the step's key and the row's global index."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows)


def check_micro_batches(global_batch: int, micro_batches: int, devices: int) -> None:
    """Every micro-batch must give each device the same whole number of samples."""
    if micro_batches < 1 or global_batch % (micro_batches * devices):
        raise ValueError(
            f"config.data.global_batch_size={global_batch} must split into "
            f"config.train.micro_batches={micro_batches} micro-batches of whole per-device "
            f"batches over {devices} devices (a multiple of {max(micro_batches, 1) * devices})")


def split_micro(x: jax.Array, k: int, shards: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...]. Micro-batch m holds the m-th block of every device's rows,
    so each micro-batch is spread over all devices as the batch is, with no data movement."""
    per = x.shape[0] // (shards * k)
    x = x.reshape(shards, k, per, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(k, shards * per, *x.shape[3:])


def join_micro(x: jax.Array, shards: int) -> jax.Array:
    """The inverse of split_micro: [k, B/k, ...] -> [B, ...] in the batch's own row order."""
    k, n = x.shape[:2]
    x = x.reshape(k, shards, n // shards, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape(k * n, *x.shape[3:])


def _constrain(tree, mesh: Mesh, spec: P):
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec)),
                        tree)


def _with_stats(rest, stats):
    """`rest` with the BatchNorm statistics that a training forward left in `stats`."""
    new = dict(nnx.to_flat_state(stats))
    return nnx.from_flat_state([(path, new.get(path, v)) for path, v in nnx.to_flat_state(rest)])


def loss_and_grads(graphdef, trainable, rest, batch: dict, dropout_key, *, loss_fn: LossFn,
                   micro_batches: int = 1, mesh: Mesh | None = None):
    """(total, parts, gradients of `trainable`, rest with updated BatchNorm statistics).

    batch: the global batch {view1, view2, input_ids, attention_mask}; micro_batches: k.
    """
    rows = jnp.arange(batch["view1"].shape[0], dtype=jnp.int32)
    if micro_batches == 1:
        return _one_pass(graphdef, trainable, rest, batch, row_keys(dropout_key, rows), loss_fn)
    return _accumulated(graphdef, trainable, rest, batch, dropout_key, rows, loss_fn,
                        micro_batches, mesh)


def _one_pass(graphdef, trainable, rest, batch, keys, loss_fn):
    # `rest` is an argument, not a closure: BatchNorm updates its statistics in it.
    def f(params, rest):
        model = nnx.merge(graphdef, params, rest, copy=True)
        total, parts = loss_fn(model, model(batch, train=True, dropout_keys=keys))
        return total, (parts, nnx.state(model, nnx.BatchStat))

    (total, (parts, stats)), grads = jax.value_and_grad(f, has_aux=True)(trainable, rest)
    return total, parts, grads, _with_stats(rest, stats)


def _accumulated(graphdef, trainable, rest, batch, dropout_key, rows, loss_fn, k, mesh):
    shards = mesh.size if mesh is not None else 1
    spread = (lambda t: _constrain(t, mesh, P(None, sharding.BATCH_AXES))) if mesh else (lambda t: t)
    whole = (lambda t: _constrain(t, mesh, P(sharding.BATCH_AXES))) if mesh else (lambda t: t)
    micro = spread(jax.tree.map(lambda x: split_micro(x, k, shards), (batch, rows)))

    def towers(params, micro_batch, micro_rows):
        model = nnx.merge(graphdef, params, rest, copy=True)
        feats = model.tower_features(micro_batch, train=True,
                                     dropout_keys=row_keys(dropout_key, micro_rows))
        mask = feats.pop("sent_mask")
        return feats, mask

    # (a) tower features of every micro-batch, no gradient.
    _, (feats, masks) = jax.lax.scan(lambda c, xs: (c, towers(trainable, *xs)), None, micro)
    feats, mask = whole(jax.tree.map(lambda x: join_micro(x, shards), (feats, masks)))

    # (b) heads + eq. 4 on the whole batch: gradients for the heads and the cached features.
    def heads(params, feats, rest):
        model = nnx.merge(graphdef, params, rest, copy=True)
        total, parts = loss_fn(model, model.head_embeddings(dict(feats, sent_mask=mask), train=True))
        return total, (parts, nnx.state(model, nnx.BatchStat))

    (total, (parts, stats)), (head_grads, feat_grads) = jax.value_and_grad(
        heads, argnums=(0, 1), has_aux=True)(trainable, feats, rest)
    feat_grads = spread(jax.tree.map(lambda g: split_micro(g, k, shards), feat_grads))

    # (c) each micro-batch's towers again, gradients pulled back from the cache's.
    def pull_back(acc, xs):
        micro_batch, micro_rows, g = xs
        _, vjp, _ = jax.vjp(lambda p: towers(p, micro_batch, micro_rows), trainable, has_aux=True)
        (tower_grads,) = vjp(g)
        return jax.tree.map(jnp.add, acc, tower_grads), None

    grads, _ = jax.lax.scan(pull_back, head_grads, (*micro, feat_grads))
    return total, parts, grads, _with_stats(rest, stats)
