"""Linear probe on extracted embeddings (paper §4.2, Tables 1-2; spec §4.2).

  python -m mama_jax.main --config=configs/extract.py --workdir=runs/mama/eval \
      --config.pretrain_workdir=runs/mama
  python -m mama_jax.main --config=configs/linear_probe.py --workdir=runs/mama/eval

Reads WORKDIR/embeddings_{train,test}.npz (or config.train_file / test_file) and
writes WORKDIR/linear_probe.json. The probe: class-balanced multinomial logistic
regression on standardised features, full-batch L-BFGS (see
mama_jax/evaluate/linear_probe.py for why this stands in for the paper's SGD run).
Presets: `rsna` probes cancer only; `test` is a quick run for the test suite.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "linear_probe"
    c.pretrain_workdir = ""   # recorded for provenance only: the probe reads the npz files
    c.train_file = ""         # "" = WORKDIR/embeddings_train.npz
    c.test_file = ""          # "" = WORKDIR/embeddings_test.npz
    c.feature = "pooled"      # pooled = g(x), the ViT feature the paper probes | image_emb = e_I(x)
    c.tasks = ("density", "birads")  # any of birads, density, cancer
    c.fractions = (0.01, 0.1, 1.0)   # of the training patients (nested samples)
    c.optimizer = "lbfgs"     # lbfgs (line search, lr unused) | adam (uses lr)
    c.epochs = 500            # full-batch iterations; L-BFGS stops earlier once converged
    c.lr = 1e-2               # adam only
    c.weight_decay = 1e-3     # 0.5 * wd * |W|^2 on the mean loss: the paper's SGD weight decay
    c.seed = 0                # patient sampling, init and bootstrap
    c.bootstrap = 1000        # bootstrap resamples for the 95 % intervals (0 = none)
    if arg == "rsna":
        c.tasks = ("cancer",)
    elif arg == "test":
        c.epochs = 100
        c.bootstrap = 50
    elif arg:
        raise ValueError(f"configs/linear_probe.py: unknown preset {arg!r} (known: rsna, test)")
    return c
