"""Restoring a pretraining run for evaluation, and refusing one of another model size."""

import numpy as np
import pytest

from mama_jax import checkpoint
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
