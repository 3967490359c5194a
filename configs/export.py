"""Export a pretrained MaMA as an inference package (mama_jax/export/).

  python -m mama_jax.main --config=configs/export.py --workdir=runs/mama/export_job \
      --config.pretrain_workdir=runs/mama [--config.out_dir=DIR] [--config.step=N] \
      [--config.probe_workdir=runs/mama/eval] [--config.finetune_workdir=runs/mama/eval]

The package (Orbax state, configs, tokenizer, the ViT as a transformers Dinov2
folder, optional trained heads) loads with `mama_jax.load(out_dir)`; predict on
DICOMs with `python -m mama_jax.predict --model OUT_DIR ...`.

Heads: probe_workdir = a linear-probe job's --workdir (its 100 % probe is fitted again
from its linear_probe.json, deterministic); finetune_workdir = a fine-tune job's
--workdir (finetune/<task>/ runs). Empty = none; zero-shot needs no head.
Decode: how data_prep read the training records, so a new DICOM is read the same way:
decode_long_side 0 = the options the build's manifest.jsonl records (--long-side, --voi,
--j2k-reduce; for a build older than that record, the longest stored side); otherwise
decode_long_side, decode_voi and decode_j2k_reduce as given.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/export.py: unknown preset {arg!r} (none defined)")
    c = ml_collections.ConfigDict()
    c.mode = "export"
    c.pretrain_workdir = ""   # the pretraining run's --workdir (required)
    c.out_dir = ""            # "" = WORKDIR/export
    c.step = -1               # checkpoint step; -1 = the latest (D20: evaluate the last)
    c.probe_workdir = ""      # linear-probe job workdir whose probes to carry ("" = none)
    c.probe_tasks = ()        # () = every task that job probed
    c.finetune_workdir = ""   # fine-tune job workdir whose classifiers to carry ("" = none)
    c.finetune_tasks = ()     # () = every finetune/<task> run there
    c.decode_long_side = 0    # data_prep build --long-side; 0 = all three from the build manifest
    c.decode_voi = "none"     # data_prep build --voi: none | window
    c.decode_j2k_reduce = True  # data_prep's reduced JPEG 2000 decode (its default)
    return c
