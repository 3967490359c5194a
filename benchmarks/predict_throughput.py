"""Images/s of `python -m mama_jax.predict` on synthetic DICOMs, for a package of random
weights of any ViT (default: ViT-B/14 with 4 registers at 518 px, the paper's tower) or
for an existing package (--model, e.g. make demo's work/demo/export).

  python benchmarks/predict_throughput.py                       # ViT-B/14-reg @ 518, random
  python benchmarks/predict_throughput.py --model work/demo/export --dicoms work/synthetic/images

Writes the package (random weights, a tiny BPE tokenizer and text tower: zero-shot
encodes its prompts once, so the text tower's size does not change images/s) and the
DICOMs under --workdir, then runs the predict command, which prints images/s (file
reading, decode, crop and resize included; the first batch includes compilation, so
pass enough images that it does not dominate).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def random_package(out_dir: str, *, vit: str, registers: int, image_size: int, dtype: str,
                   long_side: int) -> str:
    import json

    from configs import demo
    from mama_jax import factory
    from mama_jax.input import captions
    from mama_jax.export.package import write_package
    from mama_jax.input import tokenizer as tok_lib

    cfg = demo.get_config()
    cfg.model.update(dict(vit=vit, num_registers=registers, text="tiny", random_init=True,
                          dtype=dtype, remat=False))
    cfg.data.image_size = image_size
    tok_dir = os.path.join(out_dir, "tokenizer_source")
    texts = [p for t in captions.TASKS for p in captions.zero_shot_prompts(t, prefix="none")]
    tok_lib.build_tiny_tokenizer(tok_dir, texts * 4, vocab_size=400)
    tok = tok_lib.load_tokenizer(tok_dir)
    t0 = time.perf_counter()
    model = factory.model(cfg, tok)
    print(f"random {vit} ({registers} registers) @ {image_size} px built in "
          f"{time.perf_counter() - t0:.1f} s")
    return write_package(model, tok, json.loads(cfg.to_json_best_effort()), 0,
                         os.path.join(out_dir, "package"),
                         decode={"long_side": long_side, "voi": "none", "j2k_reduce": True})


def synthetic_dicoms(out_dir: str, n: int, height: int, width: int) -> str:
    from data_prep import synthetic

    folder = os.path.join(out_dir, "synthetic")
    if not os.path.isdir(os.path.join(folder, "images")):
        synthetic.generate(folder, patients=max(1, -(-n // 4)), seed=0, image_size=(height, width))
    return os.path.join(folder, "images")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="an existing package (default: build a random one)")
    p.add_argument("--dicoms", default="", help="DICOM folder (default: synthetic ones)")
    p.add_argument("--workdir", default="/tmp/mama_predict_bench")
    p.add_argument("--vit", default="base")
    p.add_argument("--registers", type=int, default=4)
    p.add_argument("--image-size", type=int, default=518)
    p.add_argument("--dtype", default="float32", help="compute dtype of the random package")
    p.add_argument("--long-side", type=int, default=1036)
    p.add_argument("--n", type=int, default=16, help="synthetic images (whole patients of ~4)")
    p.add_argument("--dicom-size", default="2048x1664", help="synthetic DICOM HxW")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--task", default="density")
    args = p.parse_args()

    os.makedirs(args.workdir, exist_ok=True)
    model = args.model or random_package(args.workdir, vit=args.vit, registers=args.registers,
                                         image_size=args.image_size, dtype=args.dtype,
                                         long_side=args.long_side)
    h, w = (int(v) for v in args.dicom_size.split("x"))
    dicoms = args.dicoms or synthetic_dicoms(args.workdir, args.n, h, w)
    cmd = [sys.executable, "-m", "mama_jax.predict", "--model", model, "--task", args.task,
           dicoms, "--out", os.path.join(args.workdir, "predictions.csv"),
           "--batch-size", str(args.batch_size), "--no-progress"]
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
