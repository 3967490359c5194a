"""Embeddings of a pretrained MaMA for every image of the chosen splits.

  python -m mama_jax.main --config=configs/extract.py --workdir=runs/mama/extract \
      --config.pretrain_workdir=runs/mama

Writes WORKDIR/embeddings_<split>.npz: image_emb (e_I(x), unnormalised), pooled (g(x)),
labels (density as its class index 0..3), ids and test-subset flags.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/extract.py: unknown preset {arg!r} (none defined)")
    c = ml_collections.ConfigDict()
    c.mode = "extract"
    c.pretrain_workdir = ""   # the pretraining run's --workdir (required)
    c.dataset_dir = ""        # "" = the pretraining run's dataset
    c.splits = ("train", "test")
    c.batch_size = 32
    return c
