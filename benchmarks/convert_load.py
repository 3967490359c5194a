"""Load time of a source checkpoint vs its converted Orbax tower.

  python benchmarks/convert_load.py            # ViT-B/14-reg (86M params), random weights
  python benchmarks/convert_load.py --size small

Builds a random transformers Dinov2WithRegisters model, saves it as a
safetensors folder, converts it with `python -m mama_jax.models.convert`'s
code, and times `load_dinov2` (source) against `load_tower` (converted), each
loaded twice (the second load shows the warm figure).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax

SIZES = {"small": (384, 6), "base": (768, 12), "large": (1024, 16)}


def _timed(fn, repeats: int = 2) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model = fn()
        jax.block_until_ready(jax.tree.leaves(model))
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", choices=SIZES, default="base")
    args = p.parse_args()
    import torch
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from mama_jax.models import convert

    hidden, heads = SIZES[args.size]
    cfg = Dinov2WithRegistersConfig(hidden_size=hidden, num_hidden_layers=12, num_attention_heads=heads,
                                    patch_size=14, image_size=518, num_register_tokens=4)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        Dinov2WithRegistersModel(cfg).save_pretrained(f"{tmp}/hf")
        source = _timed(lambda: convert.load_dinov2(f"{tmp}/hf"))
        convert.save_tower(convert.load_dinov2(f"{tmp}/hf"), f"{tmp}/tower")
        tower = _timed(lambda: convert.load_tower(f"{tmp}/tower"))
    print(f"convert_load: ViT-{args.size}/14-reg @518 ({jax.default_backend()})")
    print(f"convert_load: source safetensors folder: {source[0]:.2f} s first, {source[1]:.2f} s warm")
    print(f"convert_load: converted Orbax tower:     {tower[0]:.2f} s first, {tower[1]:.2f} s warm")
    print(f"convert_load: speed-up (warm): {source[1] / tower[1]:.1f}x")


if __name__ == "__main__":
    main()
