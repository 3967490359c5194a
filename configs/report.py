"""The evaluation report: tables, figures and maps from the results in --workdir.

  python -m mama_jax.main --config=configs/report.py --workdir=runs/eval

Run it in the workdir the zeroshot / linear_probe / maps jobs wrote to; whatever is
missing is listed as "not run".
"""

import ml_collections


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/report.py: unknown preset {arg!r} (it has none)")
    c = ml_collections.ConfigDict()
    c.mode = "report"
    c.title = "MaMA evaluation report"
    # Optional: where to find the pretraining metrics.jsonl for the loss curves when the
    # workdir has none and no config_<job>.json there names the pretraining run.
    c.pretrain_workdir = ""
    return c
