"""Checkpoint conversion: public loaders and the `convert` command.

  python -m mama_jax.models.convert --kind dinov2 --src dinov2_vitb14_reg4_pretrain.pth --dst towers/vit
  python -m mama_jax.models.convert --kind gpt2 --src /models/BioMedLM --dst towers/biomedlm --param-dtype bfloat16

`load_dinov2` / `load_gpt2` read the source formats (transformers folders,
torch-hub .pth, pytorch_model.bin) every time; `save_tower` writes the
converted tower as an Orbax checkpoint plus `tower.json`, which `load_tower`
restores without touching torch or re-mapping names.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from mama_jax.models.convert_dinov2 import abstract_dinov2, load_dinov2  # noqa: F401 (public API)
from mama_jax.models.convert_gpt2 import abstract_gpt2, load_gpt2  # noqa: F401 (public API)
from mama_jax.models.text import TextDecoder, text_config_from_dict, text_config_to_dict
from mama_jax.models.vit import VisionTransformer, vit_config_from_dict, vit_config_to_dict
from mama_jax.models.weights import ConversionError

TOWER_FILE = "tower.json"
KINDS = {
    "dinov2": (VisionTransformer, vit_config_to_dict, vit_config_from_dict),
    "gpt2": (TextDecoder, text_config_to_dict, text_config_from_dict),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _kind_of(model) -> str:
    for kind, (cls, _, _) in KINDS.items():
        if isinstance(model, cls):
            return kind
    raise TypeError(f"cannot save a {type(model).__name__}; expected one of "
                    f"{', '.join(c.__name__ for c, _, _ in KINDS.values())}")


def save_tower(model, dst: str) -> None:
    """Write `model`'s state (Orbax) and its config (tower.json) under dst."""
    kind = _kind_of(model)
    dst = os.path.abspath(dst)
    os.makedirs(dst, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(model))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(dst, "state"), state, force=True)
    with open(os.path.join(dst, TOWER_FILE), "w") as f:
        json.dump({"kind": kind, "config": KINDS[kind][1](model.cfg)}, f, indent=2)


def abstract_tower(path: str, *, expect: str | None = None):
    """The shape-only tower that save_tower wrote under path (its tower.json only);
    `expect` guards against the wrong kind."""
    meta_path = os.path.join(path, TOWER_FILE)
    if not os.path.exists(meta_path):
        raise ConversionError(f"{path}: no {TOWER_FILE}; not a converted tower "
                              "(convert it with python -m mama_jax.models.convert)")
    with open(meta_path) as f:
        meta = json.load(f)
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ConversionError(f"{meta_path}: unknown tower kind {kind!r}")
    if expect is not None and kind != expect:
        raise ConversionError(f"{path}: holds a {kind} tower, expected {expect}")
    cls, _, from_dict = KINDS[kind]
    cfg = from_dict(meta["config"])
    return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))


def load_tower(path: str, *, expect: str | None = None):
    """Restore a tower written by save_tower; `expect` guards against the wrong kind."""
    abstract_model = abstract_tower(path, expect=expect)
    kind = _kind_of(abstract_model)
    graphdef, abstract = nnx.split(abstract_model)
    target = nnx.to_pure_dict(abstract)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(os.path.join(path, "state"), target)
        except (ValueError, KeyError) as err:
            raise ConversionError(f"{path}: checkpoint does not match its {kind} config: {err}") from err
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mama_jax.models.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", required=True, choices=sorted(KINDS))
    p.add_argument("--src", required=True, help="transformers folder, .pth, or pytorch_model.bin folder")
    p.add_argument("--dst", required=True, help="output folder (Orbax checkpoint + tower.json)")
    p.add_argument("--param-dtype", default="float32", choices=sorted(DTYPES),
                   help="storage dtype (bfloat16 for a frozen decoder base)")
    p.add_argument("--heads", type=int, default=None,
                   help="attention heads of a torch-hub DINOv2 file (default: dim / 64)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.kind == "dinov2":
        overrides = {"heads": args.heads} if args.heads else None
        model = load_dinov2(args.src, param_dtype=DTYPES[args.param_dtype], config_overrides=overrides)
    else:
        model = load_gpt2(args.src, param_dtype=DTYPES[args.param_dtype])
    read_s = time.perf_counter() - start
    save_tower(model, args.dst)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"converted {args.kind} ({n / 1e6:.1f}M params) from {args.src} in {read_s:.1f} s "
          f"-> {os.path.abspath(args.dst)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
