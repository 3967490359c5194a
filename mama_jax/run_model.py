"""What a pretraining workdir says about its model, so that the run alone rebuilds it.

WORKDIR/model/ holds model.json (the MaMA config of both towers and the heads) and
tokenizer/ (the tokenizer as pretraining used it), written when pretraining starts.
Evaluation, export and fine-tuning build an abstract model from these and fill it from a
checkpoint: no source weight file is read and no random init is computed, so a run still
restores after its DINOv2 / BioMedLM files have moved.
"""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from mama_jax.models import mama
from mama_jax.input import tokenizer as tok_lib

MODEL_DIR = "model"
CONFIG_FILE = "model.json"
TOKENIZER_DIR = "tokenizer"


class RunModelError(ValueError):
    """WORKDIR/model/ is unreadable or disagrees with the configured model; names the file."""


def folder(workdir: str) -> str:
    return os.path.join(workdir, MODEL_DIR)


def exists(workdir: str) -> bool:
    return os.path.exists(os.path.join(folder(workdir), CONFIG_FILE))


def write(workdir: str, mcfg: mama.MaMAConfig, tok: tok_lib.TextTokenizer) -> None:
    """Record the model of a run (process 0). A resumed run must have the same one."""
    path = os.path.join(folder(workdir), CONFIG_FILE)
    described = mama.config_to_dict(mcfg)
    if os.path.exists(path):
        recorded = _read_json(path)
        # Runs recorded before loss.clip_kind was part of the model trained softmax CLIP terms.
        recorded.get("mama", {}).setdefault("clip_kind", "softmax")
        if recorded != json.loads(json.dumps(described)):
            raise RunModelError(f"{path}: this workdir's run has another architecture than the "
                                "configured model; resume with the run's own config or use a "
                                "new --workdir")
        return
    if jax.process_index() != 0:
        return
    os.makedirs(folder(workdir), exist_ok=True)
    tok.hf.save_pretrained(os.path.join(folder(workdir), TOKENIZER_DIR))
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(described, f, indent=2)
    os.replace(tmp, path)  # model.json last: its presence means the folder is complete


def read_config(workdir: str) -> mama.MaMAConfig:
    path = os.path.join(folder(workdir), CONFIG_FILE)
    try:
        return mama.config_from_dict(_read_json(path))
    except (KeyError, TypeError, ValueError) as err:
        raise RunModelError(f"{path}: not a MaMA model description ({err!r})") from err


def read_tokenizer(workdir: str) -> tok_lib.TextTokenizer:
    return tok_lib.load_tokenizer(os.path.join(folder(workdir), TOKENIZER_DIR))


def abstract_model(mcfg: mama.MaMAConfig) -> mama.MaMA:
    """The model's shapes and dtypes only: a restore target, nothing allocated."""
    return nnx.eval_shape(lambda: mama.MaMA(mcfg, rngs=nnx.Rngs(0)))


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise RunModelError(f"{path}: missing (written when pretraining starts)")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as err:
        raise RunModelError(f"{path}: not valid JSON: {err}") from err
