"""Full fine-tune (FFT) of a pretrained MaMA vision tower + linear head (paper §4.2, spec §4.2),
or the paper's SGD linear probe (the same recipe with the tower frozen).

  python -m mama_jax.main --config=configs/finetune.py --workdir=runs/mama/eval \
      --config.pretrain_workdir=runs/mama --config.task=birads
  python -m mama_jax.main --config=configs/finetune.py:probe --workdir=runs/mama/eval \
      --config.pretrain_workdir=runs/mama --config.task=density --config.train_fraction=0.1

Paper recipe: SGD lr 5e-4, momentum 0.9, weight decay 1e-3, 100 linear warm-up steps
from 1e-5, cosine to 1e-5, 8000 steps, batch 36 (D12; the official run used 72),
class-balanced sampling, the pretraining run's SimCLR augmentation, bf16 compute;
the last weights are tested. Writes WORKDIR/finetune_<task>.json; checkpoints and
metrics.jsonl under WORKDIR/finetune/<task>/ (a rerun resumes from there). The SGD probe
writes WORKDIR/sgd_probe_<task>_<pct>pct.json and WORKDIR/sgd_probe/<task>_<pct>pct/; the
report shows it beside the L-BFGS probe of configs/linear_probe.py.
Presets: `rsna` (task cancer), `probe` (protocol linear), `demo` (300 steps for make demo),
`test` (a few steps for the test suite).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "finetune"
    c.pretrain_workdir = ""   # the pretraining run's --workdir (required)
    c.dataset_dir = ""        # "" = the pretraining run's dataset
    c.task = "density"        # birads (7 classes) | density (4) | cancer (2)
    c.protocol = "fft"        # fft: the tower trains | linear: the SGD linear probe, tower frozen
    c.train_fraction = 1.0    # share of the training patients (the paper probes 0.01, 0.1, 1)
    c.train_split = "train"
    c.eval_split = "test"
    c.steps = 8000
    c.batch_size = 36         # global; data parallel over the most devices that divide it
    c.optim = ml_collections.ConfigDict(dict(
        lr=5e-4, momentum=0.9, weight_decay=1e-3,
        warmup_steps=100, init_lr=1e-5, end_lr=1e-5,
        total_steps=0,        # schedule length; 0 = steps
    ))
    c.dtype = "bfloat16"      # compute dtype; "" = the pretraining run's; parameters stay fp32
    c.seed = 0                # head init, balanced draws and augmentation
    c.num_threads = 8         # input threads (decode + augment)
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    c.eval_batch_size = 64
    c.bootstrap = 1000        # resamples for the 95 % intervals (0 = none)
    if arg == "rsna":
        c.task = "cancer"
    elif arg == "probe":
        c.protocol = "linear"
    elif arg == "demo":  # make demo: the tiny demo tower on the synthetic set, on a CPU
        c.steps = 300
        c.optim.warmup_steps = 30
        c.dtype = "float32"
        c.num_threads = 4
        c.log_every = 25
        c.checkpoint_every = 100
        c.bootstrap = 200
    elif arg == "test":
        c.task = "birads"
        c.steps = 4
        c.batch_size = 8
        c.optim.warmup_steps = 2
        c.dtype = "float32"
        c.num_threads = 2
        c.log_every = 1
        c.checkpoint_every = 2
        c.eval_batch_size = 8
        c.bootstrap = 20
    elif arg:
        raise ValueError(f"configs/finetune.py: unknown preset {arg!r} (known: rsna, probe, demo, test)")
    return c
