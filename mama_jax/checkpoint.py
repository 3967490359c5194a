"""Orbax checkpoints of a training run: parameters, optimiser, input-pipeline position.

Three items per step so a warm start can restore parameters alone. Saves are
asynchronous and atomic: a killed save is never picked up as the latest.
Restore targets carry the current run's shardings, so a checkpoint written on
one mesh restores onto another.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a different model or optimiser."""


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with the target shardings: the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, *, params, opt_state, data_iterator=None) -> None:
        items = dict(params=ocp.args.StandardSave(params), opt=ocp.args.StandardSave(opt_state))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, *, params, opt_state=None, data_iterator=None):
        """Restore into abstract targets (see abstract_like); returns (params, opt_state)."""
        items = dict(params=ocp.args.StandardRestore(params))
        if opt_state is not None:
            items["opt"] = ocp.args.StandardRestore(opt_state)
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointMismatchError(
                f"{self.directory}/{step}: does not match this model / optimiser "
                f"(another model size or config?): {err}") from err
        return out["params"], out.get("opt")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
