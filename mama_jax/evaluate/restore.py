"""Rebuild a pretrained MaMA from its pretraining workdir (config + Orbax checkpoint)."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from flax import nnx

from mama_jax import checkpoint, factory, sharding
from mama_jax.models import mama

CONFIG_FILE = "config_pretrain.json"


def load_pretrain_config(pretrain_workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(pretrain_workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise factory.ConfigError(f"{pretrain_workdir}: no {CONFIG_FILE}; point "
                                  "config.pretrain_workdir at a pretraining run's --workdir")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_model(pretrain_workdir: str, *, step: int | None = None,
                  cfg: ml_collections.ConfigDict | None = None):
    """(model, tokenizer, step) from the latest (or given) checkpoint of a pretraining run.

    `cfg` defaults to the run's own saved config; passing another model size
    fails with a CheckpointMismatchError that names the checkpoint.
    """
    cfg = cfg or load_pretrain_config(pretrain_workdir)
    tok = factory.tokenizer(cfg, pretrain_workdir)
    model = factory.model(cfg, tok)
    ckpt = checkpoint.Checkpointer(os.path.join(pretrain_workdir, "checkpoints"), async_save=False)
    step = step if step is not None else ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"{pretrain_workdir}/checkpoints: no checkpoint to evaluate")
    graphdef, trainable, rest = nnx.split(model, mama.trainable_filter(model.cfg), ...)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    target = {"trainable": trainable, "rest": rest}
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), target)
    params, _ = ckpt.restore(step, params=checkpoint.abstract_like(target, shardings))
    ckpt.close()
    return nnx.merge(graphdef, params["trainable"], params["rest"]), tok, step
