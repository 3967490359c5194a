"""Bytes written per checkpoint step, and what restoring a run for evaluation costs.

  python benchmarks/checkpoint_io.py                  # both parts (a few minutes on 2 cores)
  python benchmarks/checkpoint_io.py --bytes-only     # part 1 only

Part 1, paper size (configs/pretrain.py: ViT-B/14-reg @518, BioMedLM 32 x 2560 with a bf16
frozen base and LoRA), shapes only (nnx.eval_shape; nothing is allocated): the bytes one
checkpoint step writes with the former layout (the whole model, frozen base included, plus
the optimiser) and now (trainable parameters, BatchNorm statistics and the optimiser; the
frozen part once per run).

Part 2, measured on this machine with random weights at a size that fits (--vit, --text-layers:
a BioMedLM-wide decoder with fewer layers): the towers are saved as converted towers (a
user's weight files), a 1-step run is checkpointed, then each restore runs in a fresh
process and reports its wall time and peak host memory (VmHWM):
  before  what evaluation did until now: factory.model (reads the tower files and computes
          the random init under jit), then the checkpoint restore over it;
  now     restore.restore_model: an abstract model from WORKDIR/model/ filled by the
          checkpoint (no tower file read, no init).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from activation_memory import nbytes  # noqa: E402
from memory_model import VocabOnly, paper_config  # noqa: E402
from train_step import text_layers  # noqa: E402

GIB = 2 ** 30


def paper_bytes() -> dict:
    """Per-step bytes of the former and the present layout at paper size (shapes only)."""
    import jax
    from flax import nnx

    from mama_jax import factory
    from mama_jax.train import checkpoint, optim, pretrain
    from mama_jax.models import mama

    cfg = paper_config()
    model = nnx.eval_shape(lambda: factory.model(cfg, VocabOnly(cfg.model.text)))
    _, trainable, rest = nnx.split(model, mama.trainable_filter(model.cfg), ...)
    tx = optim.make_optimizer(cfg.optim, trainable, late_groups=pretrain.late_start_groups(cfg))
    opt = nbytes(jax.eval_shape(tx.init, trainable))
    changing, frozen = checkpoint.split_frozen(rest)
    return {"former_step": nbytes(trainable) + nbytes(rest) + opt,
            "now_step": nbytes(trainable) + nbytes(changing) + opt,
            "frozen_once": nbytes(frozen)}


def small_config(args):
    from configs import demo

    cfg = demo.get_config("test")
    cfg.model.update(dict(vit=args.vit, text="biomedlm", train_text_base=False,
                          dtype="float32", text_param_dtype="bfloat16", scan_layers=True))
    cfg.data.image_size, cfg.data.max_length = args.image_size, 64
    cfg.train.update(dict(steps=1, checkpoint_every=1, log_every=1))
    return cfg


def prepare(args, root: str) -> str:
    """Converted towers + a 1-step checkpointed run under root; returns the run's workdir."""
    from data_prep import build, synthetic
    from mama_jax import factory
    from mama_jax.train import pretrain
    from mama_jax.models import convert

    synthetic.generate(os.path.join(root, "raw"), patients=4, seed=0, image_size=(160, 128))
    build.build("embed", os.path.join(root, "raw"), os.path.join(root, "raw"),
                os.path.join(root, "out"), workers=1, long_side=128)
    cfg = small_config(args)
    cfg.data.dataset_dir = build.dataset_dir(os.path.join(root, "out"), "embed")
    with text_layers(args.text_layers):
        tok = factory.tokenizer(cfg, os.path.join(root, "source"))
        model = factory.model(cfg, tok)
    convert.save_tower(model.vision, os.path.join(root, "source", "vit"))
    convert.save_tower(model.text, os.path.join(root, "source", "text"))
    del model
    cfg.model.update(dict(random_init=False, vit_weights=os.path.join(root, "source", "vit"),
                          text_weights=os.path.join(root, "source", "text"),
                          tokenizer=os.path.join(root, "source", "tokenizer")))
    workdir = os.path.join(root, "run")
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config_pretrain.json"), "w") as f:
        f.write(cfg.to_json_best_effort())
    pretrain.train(cfg, workdir)
    return workdir


def restore_once(workdir: str, how: str) -> dict:
    """In this (fresh) process: one restore the `how` way, its time and peak RSS."""
    import jax

    from mama_jax import factory
    from mama_jax.evaluate import restore
    from mama_jax.models import mama

    t0 = time.perf_counter()
    if how == "before":
        cfg = restore.load_pretrain_config(workdir)
        model = factory.model(cfg, factory.tokenizer(cfg, workdir))
        model, _ = restore.restore_split(model, mama.trainable_filter(model.cfg),
                                         os.path.join(workdir, "checkpoints"))
    else:
        model, _, _ = restore.restore_model(workdir)
    jax.block_until_ready(jax.tree.leaves(model))
    return {"seconds": time.perf_counter() - t0, "peak_rss_gib": peak_rss_bytes() / GIB}


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, the high-water mark of this
    process's own address space. Not ru_maxrss: Linux carries the parent's RSS at fork
    into a child's ru_maxrss across exec, so a restore run from a parent that has just
    trained reports the parent's peak (this benchmark printed 6.58 GiB for both ways)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux and BSD


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bytes-only", action="store_true")
    p.add_argument("--vit", default="small")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--restore", nargs=2, metavar=("WORKDIR", "HOW"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.restore:
        print(json.dumps(restore_once(*args.restore)))
        return

    b = paper_bytes()
    print("paper size (shapes only): bytes written per checkpoint step")
    print(f"  former layout (whole model + optimiser): {b['former_step'] / GIB:7.2f} GiB per step")
    print(f"  now (trainable + BN statistics + opt.):  {b['now_step'] / GIB:7.2f} GiB per step, "
          f"+ {b['frozen_once'] / GIB:.2f} GiB frozen once per run "
          f"({b['former_step'] / b['now_step']:.1f}x less per step)")
    if args.bytes_only:
        return
    with tempfile.TemporaryDirectory() as root:
        workdir = prepare(args, root)
        ckpts = os.path.join(workdir, "checkpoints")
        print(f"\nmeasured, ViT {args.vit} @{args.image_size}px + a 2560-wide decoder of "
              f"{args.text_layers} layers (bf16 base), random weights: step folder "
              f"{folder_bytes(os.path.join(ckpts, '1')) / 2**20:.1f} MiB, frozen folder "
              f"{folder_bytes(os.path.join(ckpts, 'frozen')) / 2**20:.1f} MiB")
        results = {}
        for how in ("before", "now"):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--restore", workdir, how],
                                 capture_output=True, text=True, check=True)
            results[how] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  restore for evaluation, {how:6s}: {results[how]['seconds']:6.1f} s, peak host "
                  f"memory {results[how]['peak_rss_gib']:.2f} GiB")
        print(f"  ratio before / now: {results['before']['seconds'] / results['now']['seconds']:.1f}x "
              f"time, {results['before']['peak_rss_gib'] / results['now']['peak_rss_gib']:.1f}x memory")


if __name__ == "__main__":
    main()
