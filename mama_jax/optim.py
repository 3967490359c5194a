"""Optimiser of the pretraining recipe: AdamW, warm-up + cosine, decay and freeze masks."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

# Parameter names that never get weight decay: norms' scales, biases, and the
# learnable temperatures (open_clip's rule; the official code decays everything).
NO_DECAY_NAMES = ("bias", "scale", "logit_scale", "local_scale", "ls1", "ls2")


def schedule(lr: float, warmup_steps: int, total_steps: int, init_lr: float = 1e-8,
             end_lr: float = 1e-8) -> optax.Schedule:
    """Linear warm-up init_lr -> lr over warmup_steps, then cosine to end_lr at total_steps."""
    return optax.warmup_cosine_decay_schedule(init_value=init_lr, peak_value=lr,
                                              warmup_steps=warmup_steps,
                                              decay_steps=max(total_steps, warmup_steps + 1),
                                              end_value=end_lr)


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_mask(state, predicate: Callable[[tuple], bool]):
    """A pytree of bools shaped like `state` (Variables kept), from a predicate on each path."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: predicate(tuple(_key_name(k) for k in path)), state)


def decay_mask(state):
    return _path_mask(state, lambda path: not any(p in NO_DECAY_NAMES for p in path))


def group_mask(state, names: tuple[str, ...]):
    return _path_mask(state, lambda path: path[0] in names)


def freeze_until(start_step: int, mask) -> optax.GradientTransformation:
    """Zero the updates of masked parameters before `start_step` (D8: the local
    heads and local temperature neither move nor decay before delta)."""

    def init(params):
        del params
        return {"count": jnp.zeros((), jnp.int32)}

    def update(updates, state, params=None):
        del params
        frozen = state["count"] < start_step
        updates = jax.tree.map(lambda u, m: jnp.where(frozen & m, jnp.zeros_like(u), u),
                               updates, mask)
        return updates, {"count": state["count"] + 1}

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: Any, trainable_state, *, local_group: tuple[str, ...] = (),
                   local_start: int = 0) -> optax.GradientTransformation:
    """AdamW with the recipe's schedule; `cfg` has lr, warmup_steps, total_steps,
    weight_decay, b1, b2, init_lr, end_lr, grad_accum."""
    lr = schedule(cfg.lr, cfg.warmup_steps, cfg.total_steps, cfg.init_lr, cfg.end_lr)
    parts = [optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                         mask=decay_mask(trainable_state))]
    if local_group and local_start > 0:
        parts.append(freeze_until(local_start, group_mask(trainable_state, local_group)))
    tx = optax.chain(*parts)
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx
