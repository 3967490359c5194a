"""Entry point: python -m mama_jax.main --config=configs/<job>.py --workdir=DIR [--config.x=y]."""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "job config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and reports go")
flags.mark_flags_as_required(["config", "workdir"])

MODES = ("pretrain",)


def main(argv) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every save at INFO
    cfg = _CONFIG.value
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, f"config_{cfg.mode}.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    if cfg.mode == "pretrain":
        from mama_jax import train

        last = train.train(cfg, workdir)
        print("pretraining finished:", json.dumps({k: round(v, 5) for k, v in last.items()}))
    else:
        raise app.UsageError(f"config.mode={cfg.mode!r}; known modes: {', '.join(MODES)}")


if __name__ == "__main__":
    app.run(main)
