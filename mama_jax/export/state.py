"""Orbax state of a package part (the model, a fine-tuned classifier): checked, then restored."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from mama_jax.export.errors import PackageError


def restore_state(state_dir: str, target: dict, what: str) -> dict:
    """Restore into ShapeDtypeStruct targets after checking paths and shapes against the metadata."""
    if not os.path.isdir(state_dir):
        raise PackageError(f"{state_dir}: missing model state")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            stored = ckptr.metadata(state_dir).item_metadata.tree
        except Exception as err:  # noqa: BLE001 (orbax raises several types)
            raise PackageError(f"{state_dir}: unreadable Orbax checkpoint: {err}") from err
        name = lambda k: "/".join(map(str, k))  # noqa: E731
        have = {name(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(stored).items()}
        want = {name(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(target).items()}
        problems = [f"missing {k}" for k in want if k not in have]
        problems += [f"unexpected {k}" for k in have if k not in want]
        problems += [f"{k}: stored {have[k]} != model {want[k]}" for k in want if k in have and have[k] != want[k]]
        if problems:
            shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
            raise PackageError(f"{state_dir}: state does not match {what}: {shown}")
        try:
            return ckptr.restore(state_dir, target)
        except (ValueError, KeyError) as err:
            raise PackageError(f"{state_dir}: cannot restore: {err}") from err


def restore_module(module_fn, state_dir: str, what: str):
    """The module `module_fn()` builds, with its arrays read from state_dir, on one device."""
    graphdef, abstract = nnx.split(nnx.eval_shape(module_fn))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(abstract, restore_state(state_dir, target, what))
    return nnx.merge(graphdef, abstract)
