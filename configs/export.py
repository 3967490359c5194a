"""Export a pretrained MaMA as an inference package (mama_jax/export.py).

  python -m mama_jax.main --config=configs/export.py --workdir=runs/mama/export_job \
      --config.pretrain_workdir=runs/mama [--config.out_dir=DIR] [--config.step=N]

The package (Orbax state, configs, tokenizer, the ViT as a transformers
Dinov2 folder) loads with `mama_jax.load(out_dir)`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/export.py: unknown preset {arg!r} (none defined)")
    c = ml_collections.ConfigDict()
    c.mode = "export"
    c.pretrain_workdir = ""  # the pretraining run's --workdir (required)
    c.out_dir = ""           # "" = WORKDIR/export
    c.step = -1              # checkpoint step; -1 = the latest (D20: evaluate the last)
    return c
