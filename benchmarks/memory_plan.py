"""Per-device memory of the paper's pretraining step for data x fsdp meshes, and which fit.

  python benchmarks/memory_plan.py                         # 1..64 devices, 24/40/80 GB GPUs
  python benchmarks/memory_plan.py --devices 8 --gpu-gb 40 --all
  python benchmarks/memory_plan.py --json plan.json --xla-check both

The memory model (each part, the activation tracing, the XLA cross-check) is in
benchmarks/memory_model.py. Everything is computed from the abstract model; nothing here
is a measurement on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import pretrain  # noqa: E402
from activation_memory import vit_tokens  # noqa: E402
from memory_model import (FIXED_MARGIN, GIB, MARGIN_FRACTION, Plan, Workload, abstract_state,  # noqa: E402
                          best_plan, candidates, command, count, global_batch_for, paper_config,
                          small_state, xla_check, xla_check_heads)

# (devices, GB per device) of the "Plans for the paper's batch" section; 4 x 24 GB is the paper's.
PAPER_SETUPS = ((1, 24), (1, 80), (4, 24), (8, 80))


# ------------------------------------------------------------------ printing

PART_NAMES = ("trainable", "optimizer", "frozen", "grads", "gathers", "towers", "heads", "cache",
              "local_loss", "batch", "margin")


def plan_row(p: Plan) -> str:
    parts = " ".join(f"{p.parts[k]:6.2f}" for k in PART_NAMES)
    return (f"{p.devices:4d} {p.data:4d} {p.fsdp:4d} {p.global_batch:5d} {p.per_device_batch:4d} "
            f"{p.micro_batches:4d} {p.micro_batch:4d} {'on ' if p.remat else 'off'}  {parts} "
            f"{p.total_gib:7.2f}")


HEADER = ("   n data fsdp  glob  b/d    k mb/d remat " + " ".join(f"{k[:6]:>6}" for k in PART_NAMES)
          + "   total")


def describe(work: Workload, mem_fraction: float) -> dict:
    state, m = work.state, work.state.mcfg
    tokens, patches = vit_tokens(m.vit, work.image_size)
    lora = count(state.trainable["text"])  # LoRA factors (+ added rows if they train)
    print(f"model: ViT {m.vit.depth}x{m.vit.hidden} reg{m.vit.num_registers} @{work.image_size}px "
          f"({tokens} tokens = 1 CLS + {m.vit.num_registers} registers + {patches} patches), LM "
          f"{m.text.layers}x{m.text.hidden} ({m.text.param_dtype.name} base, {work.max_length} "
          f"tokens), d {m.embed_dim}, {jnp.dtype(m.vit.dtype).name} compute")
    print(f"params: trainable {count(state.trainable) / 1e6:.1f}M fp32 (text: LoRA {lora / 1e6:.2f}M), "
          f"frozen {count(state.rest) / 1e9:.3f}B; AdamW mu + nu {count(state.opt_state) / 1e6:.1f}M")
    a = work.towers[True]
    print(f"saved for the backward pass, one layer: ViT block {a['vit_block_per_image'] / 2**20:.1f} MiB "
          f"per image, LM block {a['lm_block_per_caption'] / 2**20:.1f} MiB per caption")
    for remat in (True, False):
        a = work.towers[remat]
        print(f"towers, remat {'on ' if remat else 'off'}: {a['per_sample'] / GIB:.3f} GiB per sample "
              f"(saved {a['saved_per_sample'] / GIB:.3f} + layer rebuilt in backward "
              f"{a['transient_per_sample'] / GIB:.3f}) + {a['constant'] / GIB:.3f} GiB per device")
    h = work.heads
    print(f"heads: {h['per_sample'] / GIB:.3f} GiB per sample (+ {h['inputs_per_sample'] / GIB:.3f} "
          f"of tower outputs when k = 1) + {h['constant'] / GIB:.3f} GiB; cache (k > 1): "
          f"{work.cache_per_sample / 2**20:.2f} MiB per sample, x 2 with its gradient")
    print(f"budget: {mem_fraction} of each GPU (--mem-fraction); margin {FIXED_MARGIN / GIB:.1f} GiB "
          f"+ {MARGIN_FRACTION:.0%}; sizes in GiB; k = train.micro_batches, mb/d = micro-batch per "
          f"device.\nComputed from the abstract model (nnx.eval_shape), not measured on a GPU.")
    return {"trainable": count(state.trainable), "frozen": count(state.rest), "lora": lora,
            "image_tokens": tokens, "image_size": work.image_size, "max_length": work.max_length,
            "towers": {str(k): v for k, v in work.towers.items()}, "heads": work.heads,
            "cache_per_sample": work.cache_per_sample}


def print_tables(work: Workload, devices, gpus, requested: int, args) -> list[dict]:
    """The best plan (or every candidate with --all) per device count and GPU size."""
    rows = []
    for gpu in gpus:
        print(f"\n== {gpu:g} GB GPU (budget {gpu * args.mem_fraction:.1f} GiB) ==")
        print(HEADER)
        for n in devices:
            batch = global_batch_for(requested, n)
            plans = candidates(work, n, batch, gpu, args.mem_fraction)
            best = best_plan(plans)
            note = f"  (global batch {requested} -> {batch} to split over {n})" if batch != requested else ""
            for plan in (plans if args.all else [best] if best else []):
                print(plan_row(plan) + ("" if plan.fits else "  (does not fit)") + note)
                note = ""
            if best is None:
                print(f"{n:4d}  nothing fits (smallest: {min(x.total_gib for x in plans):.1f} GiB){note}")
            rows += [dict(dataclasses.asdict(x), gpu_gb=gpu, fits=x.fits, best=x is best) for x in plans]
    return rows


def data_overrides(work: Workload) -> dict:
    """The workload's config.data sizes that differ from configs/pretrain.py's."""
    default = pretrain.get_config().data
    return {k: v for k, v in (("image_size", work.image_size), ("max_length", work.max_length))
            if v != default[k]}


RETRY_FRACTION = 0.9  # where nothing fits at --mem-fraction: what XLA_CLIENT_MEM_FRACTION=.9 gives


def print_paper_plans(work: Workload, batch: int, args) -> list[dict]:
    """The best plan and its command for each of PAPER_SETUPS, at the loss's global batch;
    where nothing fits, the plan under XLA_CLIENT_MEM_FRACTION=.9 if one fits there."""
    title = "the paper's batch of 144" if batch == 144 else f"a global batch of {batch}"
    print(f"\n== Plans for {title} (computed from the abstract model, not measured; best = fewest "
          f"micro-batches k, then remat off, then the smallest fsdp) ==")
    rows = []
    for n, gpu in PAPER_SETUPS:
        label = f"{n} x {gpu} GB" + (" (the paper's)" if (n, gpu) == (4, 24) else "")
        if batch % n:
            print(f"\n{label}: a global batch of {batch} does not split over {n} devices")
            continue
        fraction, gap = args.mem_fraction, "\n"
        best = best_plan(candidates(work, n, batch, gpu, fraction))
        if best is None and fraction < RETRY_FRACTION:
            smallest = min(candidates(work, n, batch, gpu, fraction), key=lambda x: x.total_gib)
            print(f"\n{label}: nothing fits {gpu * fraction:.1f} GiB (the smallest plan needs "
                  f"{smallest.total_gib:.2f} GiB); with XLA_CLIENT_MEM_FRACTION={RETRY_FRACTION:g}:")
            fraction, gap = RETRY_FRACTION, ""
            best = best_plan(candidates(work, n, batch, gpu, fraction))
        if best is None:
            print(f"\n{label}: nothing fits {gpu * fraction:.1f} GiB")
            continue
        cmd = command(best, fraction, data_overrides(work))
        print(f"{gap}{label} (budget {best.budget_gib:.1f} GiB): {best.per_device_batch} per device = "
              f"{best.micro_batches} micro-batch{'es' if best.micro_batches > 1 else ''} of "
              f"{best.micro_batch}, fsdp {best.fsdp}, remat {'on' if best.remat else 'off'}, "
              f"{best.total_gib:.2f} GiB")
        print(HEADER)
        print(plan_row(best))
        print("  " + cmd)
        rows.append(dict(dataclasses.asdict(best), setup=label, gpu_gb=gpu, mem_fraction=fraction,
                         command=cmd))
    return rows


def print_xla_check(args) -> list[dict]:
    state, size = small_state()
    work = Workload.build(state, size["image_size"], size["max_length"])
    print(f"\nXLA cross-check: the training step's forward + backward compiled on "
          f"{jax.default_backend().upper()} ({size['label']}), temp bytes vs the formula "
          f"(towers + heads + cache; k > 1 also one micro-batch's tower gradients):")
    rows = []
    for remat in {"on": [True], "off": [False], "both": [True, False]}[args.xla_check]:
        for k in args.xla_micro_batches:
            r = xla_check(work, batch=2 * k, remat=remat, micro_batches=k)
            print(f"  remat {'on ' if remat else 'off'} batch {r['batch']} k {k}: formula "
                  f"{r['formula'] / 2**20:.1f} MiB, XLA {r['xla_temp'] / 2**20:.1f} MiB, formula/XLA "
                  f"{r['ratio']:.2f} (compile {r['compile_s']:.1f} s)")
            rows.append(dict(r, config=size["label"]))
    r = xla_check_heads(work)
    print(f"  heads alone (part b) batch {r['batch']}: formula {r['formula'] / 2**20:.1f} MiB, XLA "
          f"{r['xla_temp'] / 2**20:.1f} MiB, formula/XLA {r['ratio']:.2f} (compile {r['compile_s']:.1f} s)")
    rows.append(dict(r, config=size["label"]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="1,2,4,8,16,32,64", help="comma-separated device counts")
    p.add_argument("--gpu-gb", default="24,40,80", help="comma-separated GPU memory sizes (GiB)")
    p.add_argument("--batch", type=int, default=0, help="global batch (default: the config's 144)")
    p.add_argument("--image-size", type=int, default=0, help="default: the config's 518")
    p.add_argument("--max-length", type=int, default=0, help="caption tokens (default: 144)")
    p.add_argument("--mem-fraction", type=float, default=0.75,
                   help="usable share of GPU memory (XLA_CLIENT_MEM_FRACTION, formerly "
                   "XLA_PYTHON_CLIENT_MEM_FRACTION; JAX preallocates .75 by default)")
    p.add_argument("--all", action="store_true", help="print every candidate, not only the best")
    p.add_argument("--xla-check", default="on", choices=("on", "off", "both", "none"),
                   help="compile a small config with remat on / off and compare (default: on)")
    p.add_argument("--xla-micro-batches", default="1,2",
                   help="micro-batch counts k of the XLA check (batch 2k, comma-separated)")
    p.add_argument("--json", help="write the model figures, every plan and the check to this file")
    args = p.parse_args()
    try:
        devices = [int(d) for d in args.devices.split(",")]
        gpus = [float(g) for g in args.gpu_gb.split(",")]
        args.xla_micro_batches = [int(k) for k in args.xla_micro_batches.split(",")]
    except ValueError as err:
        p.error(f"--devices / --gpu-gb / --xla-micro-batches take comma-separated numbers: {err}")
    if (min(devices) < 1 or min(gpus) <= 0 or not 0 < args.mem_fraction <= 1 or args.batch < 0
            or min(args.xla_micro_batches) < 1):
        p.error("--devices, --gpu-gb and --xla-micro-batches must be positive, --mem-fraction "
                "in (0, 1], --batch >= 0")

    t0 = time.perf_counter()
    cfg = paper_config(args.image_size, args.max_length)
    work = Workload.build(abstract_state(cfg), cfg.data.image_size, cfg.data.max_length)
    requested = args.batch or cfg.data.global_batch_size
    results = {"model": describe(work, args.mem_fraction)}
    results["plans"] = print_tables(work, devices, gpus, requested, args)
    results["paper_plans"] = print_paper_plans(work, requested, args)
    results["xla_check"] = print_xla_check(args) if args.xla_check != "none" else []
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
