"""Optimiser of the pretraining recipe: AdamW, warm-up + cosine, decay and freeze masks."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

# Parameter names that never get weight decay: norms' scales, biases, and the
# learnable temperatures (open_clip's rule; the official code decays everything).
NO_DECAY_NAMES = ("bias", "scale", "logit_scale", "local_scale", "logit_bias", "ls1", "ls2")


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


def start_at(start_step: int, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` as if training began at `start_step`: before it, updates are zero and inner's
    state stays at its init (zero moments, count 0), so the first update at start_step is a
    fresh inner's first update (torch's AdamW likewise starts a parameter's step count at
    its first gradient). Without this a late-start group inherits the run's bias
    correction while its moments are still zero: its first updates come out 3-6x larger."""

    def init(params):
        return {"count": jnp.zeros((), jnp.int32), "inner": inner.init(params)}

    def update(updates, state, params=None):
        active = state["count"] >= start_step
        new_updates, new_inner = inner.update(updates, state["inner"], params)
        keep = lambda new, old: jnp.where(active, new, old)  # noqa: E731
        return (jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates),
                {"count": state["count"] + 1,
                 "inner": jax.tree.map(keep, new_inner, state["inner"])})

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: Any, trainable_state, *,
                   late_groups: Sequence[tuple[tuple[str, ...], int]] = ()) -> optax.GradientTransformation:
    """AdamW with the recipe's schedule; `cfg` has lr, warmup_steps, total_steps,
    weight_decay, b1, b2, init_lr, end_lr.

    late_groups: (top-level names, start step) pairs, e.g. the local heads from delta
    (D8). Such a group neither moves nor decays before its start and has its own Adam
    state from then on (start_at); the learning rate follows the run's schedule, and
    every other parameter keeps the run's own Adam count.
    """
    lr = schedule(cfg.lr, cfg.warmup_steps, cfg.total_steps, cfg.init_lr, cfg.end_lr)
    late = [(names, start) for names, start in late_groups if start > 0]
    in_late = [group_mask(trainable_state, names) for names, _ in late]
    main = jax.tree.map(lambda *m: not any(m), *in_late) if late else None
    adam = lambda: optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2)  # noqa: E731
    parts = [optax.masked(adam(), main) if late else adam()]
    parts += [optax.masked(start_at(start, adam()), mask) for (_, start), mask in zip(late, in_late)]
    parts += [optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(trainable_state)),
              optax.scale_by_learning_rate(lr)]
    # Weight decay and the learning rate come after Adam: hold a late group still until its start.
    parts += [freeze_until(start, mask) for (_, start), mask in zip(late, in_late)]
    return optax.chain(*parts)


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
