"""Restoring a pretraining run for evaluation, and refusing one of another model size."""

import numpy as np
import pytest

from mama_jax.train import checkpoint
from mama_jax.evaluate import restore


def test_restore_gives_the_trained_model(pretrained_workdir):
    model, tok, step = restore.restore_model(pretrained_workdir)
    assert step == 3
    cfg = restore.load_pretrain_config(pretrained_workdir)
    emb = model.encode_images(np.zeros((2, cfg.data.image_size, cfg.data.image_size, 3), np.float32))
    assert emb.shape == (2, cfg.model.embed_dim) and np.isfinite(np.asarray(emb)).all()
    assert tok.sep_id == model.cfg.sep_id


def test_checkpoint_of_another_model_size_is_refused(pretrained_workdir):
    cfg = restore.load_pretrain_config(pretrained_workdir)
    cfg.model.embed_dim = cfg.model.embed_dim * 2
    with pytest.raises(checkpoint.CheckpointMismatchError, match="does not match"):
        restore.restore_model(pretrained_workdir, cfg=cfg)


def test_vision_restore_reads_only_the_vit_and_equals_the_full_restore(pretrained_workdir,
                                                                       monkeypatch):
    import jax
    from flax import nnx

    from mama_jax import factory

    full, _, _ = restore.restore_model(pretrained_workdir)

    def no_text_tower(*args, **kwargs):
        raise AssertionError("restore_vision built the text tower")

    monkeypatch.setattr(factory, "_text", no_text_tower)
    monkeypatch.setattr(factory, "tokenizer", no_text_tower)
    vision, step = restore.restore_vision(pretrained_workdir)
    assert step == 3
    got = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(vision)))[0]
    want = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(full.vision)))[0])
    assert len(got) == len(want) > 10
    for path, value in got:  # bit-identical, frozen final norm and mask token included
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[path]))
    images = np.random.default_rng(0).normal(size=(2, 56, 56, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(vision(images).prenorm),
                                  np.asarray(full.vision(images).prenorm))


def test_vision_restore_refuses_another_vit_size(pretrained_workdir):
    cfg = restore.load_pretrain_config(pretrained_workdir)
    cfg.model.num_registers = 0  # the checkpoint's ViT has 4 register tokens
    with pytest.raises(checkpoint.CheckpointMismatchError, match="register_tokens"):
        restore.restore_vision(pretrained_workdir, cfg=cfg)


def test_vision_restore_takes_only_the_architecture_from_vit_weights(pretrained_workdir, tmp_path,
                                                                      monkeypatch):
    """A run started from DINOv2 weights: restoring its ViT reads the source's config, not
    its weights (the checkpoint overwrites every one of them)."""
    from mama_jax.models import convert_dinov2
    from mama_jax.export.hf import export_dinov2_hf

    want, _ = restore.restore_vision(pretrained_workdir)
    source = export_dinov2_hf(want, str(tmp_path / "dinov2"))  # stands in for the source weights
    cfg = restore.load_pretrain_config(pretrained_workdir)
    cfg.model.vit_weights = source

    def no_weights(*_):
        raise AssertionError("restore_vision read the source weights")

    monkeypatch.setattr(convert_dinov2, "load_tensors", no_weights)
    got, _ = restore.restore_vision(pretrained_workdir, cfg=cfg)
    assert got.cfg.hidden == want.cfg.hidden and got.cfg.num_registers == want.cfg.num_registers
    images = np.random.default_rng(1).normal(size=(2, 56, 56, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(got(images).prenorm), np.asarray(want(images).prenorm))


def _saved_paths(path):
    import orbax.checkpoint as ocp
    from flax import traverse_util

    with ocp.StandardCheckpointer() as reader:
        tree = reader.metadata(path).item_metadata
    tree = getattr(tree, "tree", tree)
    return {"/".join(map(str, k)) for k in traverse_util.flatten_dict(dict(tree))}


def test_checkpoints_hold_what_changes_and_the_frozen_part_is_saved_once(pretrained_workdir):
    """Each step holds the trainable parameters and the BatchNorm statistics with the
    model's own paths; the parameters frozen for the run are in checkpoints/frozen, once."""
    import os

    from flax import nnx

    from mama_jax.models import mama

    folder = os.path.join(pretrained_workdir, "checkpoints")
    model, _, step = restore.restore_model(pretrained_workdir)
    _, trainable, rest = nnx.split(model, mama.trainable_filter(model.cfg), ...)
    changing, frozen = checkpoint.split_frozen(rest)
    names = lambda state: {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}  # noqa: E731
    step_paths = _saved_paths(os.path.join(folder, str(step), "params"))
    assert step_paths == names(trainable) | names(changing)
    assert any(p.endswith("bn1/mean") for p in step_paths)  # statistics change: every step
    assert _saved_paths(os.path.join(folder, checkpoint.FROZEN_DIR)) == names(frozen)
    assert names(frozen) and all(p.startswith("vision/") for p in names(frozen))  # norm, mask token
    assert not any(p.startswith(("trainable/", "rest/")) for p in step_paths)


def test_a_missing_or_foreign_frozen_part_is_named(pretrained_workdir, tmp_path):
    import os
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(pretrained_workdir, copy)
    frozen = copy / "checkpoints" / checkpoint.FROZEN_DIR
    shutil.rmtree(frozen)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=f"{frozen}: missing"):
        restore.restore_model(str(copy))
    # The frozen part of another ViT width does not fit this model's.
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as writer:
        writer.save(str(frozen), {"vision": {"mask_token": jnp.zeros((1, 3)),
                                             "norm": {"bias": jnp.zeros(3), "scale": jnp.ones(3)}}})
    assert os.path.isdir(frozen)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=f"{frozen}: the frozen parameters"):
        restore.restore_model(str(copy))
