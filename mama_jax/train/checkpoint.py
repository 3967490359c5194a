"""Orbax checkpoints of a training run: parameters, optimiser, input-pipeline position.

On disk, per step, what changes: `params` (the trainable parameters and the BatchNorm
statistics, as one tree with the model's own paths, whatever the freeze flags), `opt` and
`data`. What never changes during a run (the parameters outside the trainable set: the
frozen LM base, the ViT's final norm) is written once, to DIRECTORY/frozen/, with the
run's first checkpoint; every restore combines the two. Saves are asynchronous and
atomic: a killed save is never picked up as the latest. Restore targets carry the
current run's shardings, so a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import glob
import json
import os
import re

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx, traverse_util

FROZEN_DIR = "frozen"


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a different model or optimiser."""


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with the target shardings: the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def split_frozen(rest):
    """(what changes, what never does) of the state outside the trainable set: its
    parameters are frozen for the whole run, its other variables (BatchNorm statistics)
    change every step."""
    frozen, changing = nnx.split_state(rest, nnx.Param, ...)
    return changing, frozen


def _model_tree(*states) -> dict:
    """One nested dict of arrays with the model's own paths (no Variable level)."""
    return nnx.to_pure_dict(nnx.merge_state(*states))


def _filled(state, values: dict, source: str):
    """A copy of `state` whose leaves take the arrays at the same paths in `values`."""
    flat = {tuple(str(k) for k in path): v for path, v in traverse_util.flatten_dict(values).items()}
    leaves = []
    for path, var in nnx.to_flat_state(state):
        key = tuple(str(k) for k in path)
        if key not in flat:
            raise CheckpointMismatchError(f"{source}: has no {'/'.join(key)} (another model?)")
        leaves.append((path, var.replace(flat[key]) if hasattr(var, "replace") else flat[key]))
    return nnx.from_flat_state(leaves)


_PLAIN_SAVES = False


def _plain_saves_on_cpu() -> None:
    """Orbax splits each replicated array's write over its replicas (off by default on
    GPU); on CPU devices that costs far more than it saves: 13.8 s against 0.8 s for
    the tiny demo state on 8 CPU devices."""
    global _PLAIN_SAVES
    if not _PLAIN_SAVES and jax.default_backend() == "cpu":
        _PLAIN_SAVES = True
        verbosity = logging.get_verbosity()
        logging.set_verbosity(logging.ERROR)  # Orbax warns on every override of a handler
        try:
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
                override=True)
        finally:
            logging.set_verbosity(verbosity)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        _plain_saves_on_cpu()
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
        same_hosts = data_iterator is not None and os.path.exists(self._data_file(step))
        if same_hosts:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointMismatchError(
                f"{self.directory}/{step}: does not match this model / optimiser "
                f"(another model size or config?): {err}") from err
        if data_iterator is not None and not same_hosts:
            data_iterator.set_state(self._data_state_for_this_host_count(step))
        return out["params"], out.get("opt")

    # ------------------------------------------------------- a run's state, frozen part once
    @property
    def frozen_path(self) -> str:
        return os.path.join(self.directory, FROZEN_DIR)

    def save_state(self, step: int, trainable, rest, opt_state, data_iterator=None, *,
                   write_frozen: bool) -> None:
        """One step of a run: trainable + BatchNorm statistics + optimiser + data position;
        with write_frozen (the run's first save) also the frozen parameters, once."""
        changing, frozen = split_frozen(rest)
        if write_frozen:
            with ocp.StandardCheckpointer() as writer:
                writer.save(self.frozen_path, nnx.to_pure_dict(frozen), force=True)
        self.save(step, params=_model_tree(trainable, changing), opt_state=opt_state,
                  data_iterator=data_iterator)

    def restore_state(self, step: int, trainable, rest, opt_state=None, data_iterator=None):
        """(trainable, rest, opt_state) of `step` into abstract targets (abstract_like: the
        shardings to restore into), the frozen parameters from DIRECTORY/frozen/."""
        changing, frozen = split_frozen(rest)
        params, opt = self.restore(step, params=_model_tree(trainable, changing),
                                   opt_state=opt_state, data_iterator=data_iterator)
        values = dict(params)
        if len(nnx.to_flat_state(frozen)):
            values = traverse_util.unflatten_dict({**traverse_util.flatten_dict(params),
                                                   **traverse_util.flatten_dict(self._frozen(frozen))})
        source = f"{self.directory}/{step}"
        return _filled(trainable, values, source), _filled(rest, values, source), opt

    def _frozen(self, frozen) -> dict:
        path = self.frozen_path
        if not os.path.isdir(path):
            raise CheckpointMismatchError(
                f"{path}: missing; it holds the run's frozen parameters (written with its first "
                "checkpoint) and every step's checkpoint needs it")
        try:
            with ocp.StandardCheckpointer() as reader:
                return reader.restore(path, nnx.to_pure_dict(frozen))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointMismatchError(
                f"{path}: the frozen parameters do not match this model (another model size "
                f"or config?): {err}") from err

    def restore_params_subtree(self, step: int, select, sharding) -> dict:
        """Only the parameter arrays whose path `select(keys)` accepts, from the step's
        params and the frozen part, as one nested dict pruned to them (Orbax partial
        restore: nothing else is read).

        keys: the model path as a tuple of str, e.g. ("vision", "cls_token").
        """
        path = os.path.join(self.directory, str(step), "params")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such checkpoint item")
        parts = [_read_subtree(p, select, sharding) for p in (path, self.frozen_path)
                 if os.path.isdir(p)]
        parts = [p for p in parts if p is not None]
        if not parts:
            raise CheckpointMismatchError(f"{path}: holds no parameter this restore asks for")
        merged = {}
        for part in parts:
            merged.update(traverse_util.flatten_dict(part))
        return traverse_util.unflatten_dict(merged)

    def _data_file(self, step: int, index: int | None = None, count: int | None = None) -> str:
        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
        return os.path.join(self.directory, str(step), "data",
                            f"process_{index}-of-{count}.json")

    def _data_state_for_this_host_count(self, step: int) -> dict:
        """The input position of a checkpoint written by another number of hosts.

        Hosts step in lockstep over blocks of one global stream (data.HostBlock), so
        a host's position times the host count is the global position.
        """
        files = glob.glob(os.path.join(self.directory, str(step), "data", "process_0-of-*.json"))
        if not files:
            raise CheckpointMismatchError(
                f"{self.directory}/{step}: no input-pipeline state (data/process_0-of-N.json)")
        old_count = int(re.search(r"-of-(\d+)\.json$", files[0]).group(1))
        with open(files[0]) as f:
            state = json.load(f)
        consumed = state["next_index"] * old_count
        if consumed % jax.process_count():
            raise CheckpointMismatchError(
                f"{files[0]}: position {consumed} does not split over {jax.process_count()} hosts")
        return dict(state, next_index=consumed // jax.process_count())

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _read_subtree(path: str, select, sharding) -> dict | None:
    """The arrays of the Orbax tree at `path` whose key path `select` accepts, or None."""
    with ocp.StandardCheckpointer() as reader:
        saved = reader.metadata(path).item_metadata
    saved = getattr(saved, "tree", saved)

    def prune(node, keys):
        if not isinstance(node, dict):
            return (jax.ShapeDtypeStruct(node.shape, node.dtype, sharding=sharding)
                    if select(keys) else None)
        kept = {k: prune(v, keys + (str(k),)) for k, v in node.items()}
        kept = {k: v for k, v in kept.items() if v is not None}
        return kept or None

    target = prune(saved, ())
    if target is None:
        return None
    args = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    with ocp.PyTreeCheckpointer() as reader:
        return reader.restore(path, args=args)

