"""Rebuild a pretrained MaMA from its pretraining workdir (WORKDIR/model/ + Orbax checkpoint)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mama_jax import factory, run_model
from mama_jax.models import mama, vit
from mama_jax.train import checkpoint, sharding

CONFIG_FILE = "config_pretrain.json"


def load_pretrain_config(pretrain_workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(pretrain_workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise factory.ConfigError(f"{pretrain_workdir}: no {CONFIG_FILE}; point "
                                  "config.pretrain_workdir at a pretraining run's --workdir")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def one_device():
    """Replicated sharding on the first device: where evaluation restores go."""
    return sharding.replicated(sharding.make_mesh(1, 1, devices=jax.devices()[:1]))


def _checkpoint_step(ckpt: checkpoint.Checkpointer, step: int | None) -> int:
    step = step if step is not None else ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"{ckpt.directory}: no checkpoint to restore")
    return step


def restore_split(module: nnx.Module, trainable_filter, folder: str, step: int | None = None):
    """(module, step): `module` with the parameters of a run's checkpoint in `folder`
    (saved as its {trainable, rest} split; latest step by default), on one device."""
    graphdef, trainable, rest = nnx.split(module, trainable_filter, ...)
    rep = one_device()
    on_device = lambda tree: checkpoint.abstract_like(tree, jax.tree.map(lambda _: rep, tree))  # noqa: E731
    ckpt = checkpoint.Checkpointer(folder, async_save=False)
    try:
        step = _checkpoint_step(ckpt, step)
        trainable, rest, _ = ckpt.restore_state(step, on_device(trainable), on_device(rest))
    finally:
        ckpt.close()
    return nnx.merge(graphdef, trainable, rest), step


def architecture(pretrain_workdir: str, cfg: ml_collections.ConfigDict | None = None):
    """(MaMAConfig, tokenizer) of a pretraining run: from the run's own WORKDIR/model/
    (run_model), or, with `cfg` or for a run saved before that folder existed, from the
    config's weight configs (shapes only; no weight is read either way)."""
    if cfg is None and run_model.exists(pretrain_workdir):
        return run_model.read_config(pretrain_workdir), run_model.read_tokenizer(pretrain_workdir)
    cfg = cfg or load_pretrain_config(pretrain_workdir)
    tok = factory.tokenizer(cfg, pretrain_workdir)
    return factory.model_config(cfg, tok), tok


def restore_model(pretrain_workdir: str, *, step: int | None = None,
                  cfg: ml_collections.ConfigDict | None = None):
    """(model, tokenizer, step) from the latest (or given) checkpoint of a pretraining run.

    An abstract model of the run's architecture filled by the checkpoint: no source
    weight file is read and nothing is initialised. `cfg` builds the architecture from
    another config instead; another model size fails with a CheckpointMismatchError
    that names the parameter.
    """
    mcfg, tok = architecture(pretrain_workdir, cfg)
    model, step = restore_split(run_model.abstract_model(mcfg), mama.trainable_filter(mcfg),
                                os.path.join(pretrain_workdir, "checkpoints"), step)
    return model, tok, step


def vision_config(pretrain_workdir: str, cfg: ml_collections.ConfigDict | None = None,
                  dtype=None) -> vit.ViTConfig:
    """The run's ViT architecture (see `architecture`), in compute `dtype` if given."""
    if cfg is None and run_model.exists(pretrain_workdir):
        vit_cfg = run_model.read_config(pretrain_workdir).vit
    else:
        vit_cfg = factory.vision_tower(cfg or load_pretrain_config(pretrain_workdir),
                                       shapes_only=True).cfg
    return dataclasses.replace(vit_cfg, dtype=jnp.dtype(dtype)) if dtype else vit_cfg


def abstract_vision(vit_cfg: vit.ViTConfig) -> vit.VisionTransformer:
    return nnx.eval_shape(lambda: vit.VisionTransformer(vit_cfg, rngs=nnx.Rngs(0)))


def restore_vision(pretrain_workdir: str, *, step: int | None = None,
                   cfg: ml_collections.ConfigDict | None = None, dtype=None):
    """(vision tower, step): the ViT of a pretraining checkpoint, on one device.

    Reads only the ViT's arrays: the text tower is neither built nor loaded (at the
    paper's size that is 2.6B parameters that fine-tuning would drop); the architecture
    comes from vision_config. A checkpoint of another ViT size stops with a
    CheckpointMismatchError naming the parameter. `dtype`: the compute dtype to run in.
    """
    vision = abstract_vision(vision_config(pretrain_workdir, cfg, dtype))
    folder = os.path.join(pretrain_workdir, "checkpoints")
    ckpt = checkpoint.Checkpointer(folder, async_save=False)
    try:
        step = _checkpoint_step(ckpt, step)
        saved = ckpt.restore_params_subtree(step, lambda keys: keys[:1] == ("vision",),
                                            one_device())
    finally:
        ckpt.close()
    arrays = saved.get("vision", {})
    state = nnx.state(vision)
    expected = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0])
    found = dict(jax.tree_util.tree_flatten_with_path(arrays)[0])
    for path in sorted(set(expected) | set(found), key=jax.tree_util.keystr):
        want, got = expected.get(path), found.get(path)
        if want is None or got is None or want.shape != got.shape:
            raise checkpoint.CheckpointMismatchError(
                f"{folder}/{step}: vision{jax.tree_util.keystr(path)} is "
                f"{'missing' if got is None else got.shape} in the checkpoint, the configured "
                f"ViT has {'none' if want is None else want.shape} (another model size?)")
    nnx.replace_by_pure_dict(state, arrays)
    graphdef = nnx.graphdef(vision)
    return nnx.merge(graphdef, state), step
