"""Entry point: python -m mama_jax.main --config=configs/<job>.py --workdir=DIR [--config.x=y]."""

from __future__ import annotations

import importlib
import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mama_jax.train import sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "job config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and reports go")
flags.mark_flags_as_required(["config", "workdir"])

# config.mode -> "module:function"; each job is run(cfg, workdir) -> dict of results.
JOBS = {
    "pretrain": "mama_jax.evaluate.during_training:pretrain",  # train/pretrain.py + validation zero-shot
    "extract": "mama_jax.evaluate.extract:run",
    "zeroshot": "mama_jax.evaluate.zeroshot:run",
    "linear_probe": "mama_jax.evaluate.linear_probe:run",
    "finetune": "mama_jax.evaluate.finetune:run",
    "maps": "mama_jax.evaluate.maps:run",
    "report": "mama_jax.evaluate.report:run",
    "export": "mama_jax.export:run",
}


def main(argv) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every save at INFO
    cfg = _CONFIG.value
    sharding.initialize_distributed(cfg.get("distributed"))  # before any other JAX call
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, f"config_{cfg.mode}.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))  # evaluation rebuilds the model from it
    if cfg.mode not in JOBS:
        raise app.UsageError(f"config.mode={cfg.mode!r}; known modes: {', '.join(JOBS)}")
    module, function = JOBS[cfg.mode].split(":")
    result = getattr(importlib.import_module(module), function)(cfg, workdir)
    summary = {k: round(v, 5) if isinstance(v, float) else v for k, v in (result or {}).items()
               if isinstance(v, (int, float, str))}
    if jax.process_index() == 0:
        print(f"{cfg.mode} finished:", json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
