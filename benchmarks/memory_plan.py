"""Per-device memory of the paper's pretraining step for data x fsdp meshes, and which fit.

  python benchmarks/memory_plan.py                         # 1..64 devices, 24/40/80 GB GPUs
  python benchmarks/memory_plan.py --devices 8 --gpu-gb 40 --all
  python benchmarks/memory_plan.py --json plan.json --xla-check both

Model: configs/pretrain.py (DINOv2 ViT-B/14 reg4 @ --image-size, BioMedLM 32 x 2560 with a
frozen bf16 base and LoRA rank 8 on c_attn, d 512, bf16 compute, scan over layers). The
model is built with nnx.eval_shape (no weight is allocated); parameter and optimiser
bytes per device come from its abstract state, split by mama_jax.sharding.state_shardings
(the same rule Run.create uses) on an abstract data x fsdp mesh.

Per device, for a per-device batch b (micro-batch = global batch / grad_accum):
  trainable fp32     ViT + heads + LoRA + temperatures          (split over fsdp where the rule splits)
  optimiser          AdamW mu + nu (+ optax.MultiSteps accumulator when grad_accum > 1)
  frozen base        LM base bf16, frozen ViT norm, BatchNorm statistics
  gradients          one fp32 copy of the trainable state, split like it
  fsdp gathers       fsdp > 1: full compute-dtype weights of 2 scanned layers per tower
                     (the one in use and the prefetched one) + every split unscanned leaf
  activations        b x per-sample bytes + a constant (below)
  local loss         the all-gathered patch embeddings of the global micro-batch (fp32,
                     value + normalised + gradient) + 3 [chunk, B, S, P] similarity blocks
  batch              the input arrays, twice (the step's and the next one's)
  margin             0.5 GiB (cuBLAS / cuDNN / NCCL workspaces) + 10 % of the rest
A plan fits when the total is under --mem-fraction x the GPU's memory (JAX preallocates
75 % by default: XLA_CLIENT_MEM_FRACTION, formerly XLA_PYTHON_CLIENT_MEM_FRACTION).

Activations: what JAX's autodiff saves from the forward pass for the backward pass
(jax.ad_checkpoint.print_saved_residuals, summed), traced on the real MaMA training
forward (dropout on, gradients to what trains, the frozen LM base behind stop_gradient)
at per-device batch 1 and 2: the difference is the per-sample size, the rest a constant.
  remat on:  each scanned layer keeps only its input (the scan carry, T x D per layer);
             the backward pass rebuilds one layer at a time, so one layer's residuals for
             the whole per-device batch come on top (the larger of one ViT block for 2 views
             and one LM block, also traced).
  remat off: every layer keeps everything, e.g. per ViT layer and image the fp32 softmax
             numerator and the bf16 probabilities (H x T^2 each; XLA attention: cuDNN
             flash attention would keep neither), fp32 LayerNorm intermediates, GELU terms.
The local loss is outside this (it depends on the global micro-batch, not on b).
--xla-check compiles that same forward + backward at a small size (fp32: CPU XLA
upcasts bf16) on this host and prints formula / XLA temp bytes. Nothing here is a
measurement on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import pretrain  # noqa: E402
from mama_jax import factory, optim, sharding  # noqa: E402
from mama_jax.models import mama, text as text_lib  # noqa: E402
from activation_memory import (training_forward, activation_bytes, batch_spec,  # noqa: E402
                               local_loss_bytes, vit_tokens, with_remat)

GIB = 2 ** 30
FIXED_MARGIN = 0.5 * GIB  # cuBLAS / cuDNN workspaces, NCCL buffers
MARGIN_FRACTION = 0.10  # fragmentation, XLA schedules that keep more alive than the formula
GATHERED_LAYERS = 2  # fsdp: the layer being computed + the one being prefetched


class VocabOnly:
    """What factory.model reads from a tokenizer, for the preset's vocabulary (BioMedLM:
    28,896 rows + 6 added tokens) without loading one."""

    def __init__(self, text_preset: str):
        preset = text_lib.text_config(text_preset)
        self.base_vocab_size = preset.vocab_size
        self.num_added_tokens = preset.num_added_tokens
        self.sep_id = preset.vocab_size + 2


def paper_config(image_size: int | None = None, max_length: int | None = None):
    cfg = pretrain.get_config()
    cfg.model.random_init, cfg.model.tokenizer = True, ""
    cfg.data.image_size = image_size or cfg.data.image_size
    cfg.data.max_length = max_length or cfg.data.max_length
    return cfg


@dataclasses.dataclass(eq=False)  # hashed by identity, for the caches below
class AbstractState:
    """The model's config and abstract (ShapeDtypeStruct) trainable / frozen states."""
    mcfg: mama.MaMAConfig
    trainable: object
    rest: object
    optim_cfg: object
    delta: int

    @functools.lru_cache(maxsize=None)
    def opt_state(self, grad_accum: int):
        ocfg = dict(self.optim_cfg)
        ocfg["grad_accum"] = grad_accum
        tx = optim.make_optimizer(_Fields(ocfg), self.trainable, local_group=mama.LOCAL_GROUP,
                                  local_start=self.delta)
        return jax.eval_shape(tx.init, self.trainable)


class _Fields(dict):
    __getattr__ = dict.__getitem__


def abstract_state(cfg, tok=None) -> AbstractState:
    tok = tok or VocabOnly(cfg.model.text)
    model = nnx.eval_shape(lambda: factory.model(cfg, tok))
    _, trainable, rest = nnx.split(model, mama.trainable_filter(model.cfg), ...)
    return AbstractState(model.cfg, trainable, rest, cfg.optim.to_dict(), cfg.loss.delta)


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_mesh(data: int, fsdp: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp), sharding.BATCH_AXES, axis_types=(AxisType.Auto,) * 2)


_BYTES_CACHE: dict = {}  # (id(tree), fsdp) -> (tree kept alive so the id stays its own, bytes)


def bytes_per_device(tree, fsdp: int) -> int:
    """Bytes of one device's shards of `tree` under state_shardings (only fsdp splits state;
    the data axis replicates it)."""
    key = (id(tree), fsdp)
    if key not in _BYTES_CACHE:
        leaves = jax.tree.leaves(tree)
        shards = jax.tree.leaves(sharding.state_shardings(tree, abstract_mesh(1, fsdp)))
        _BYTES_CACHE[key] = (tree, sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                                       for x, s in zip(leaves, shards)))
    return _BYTES_CACHE[key][1]


def gather_bytes(state: AbstractState, fsdp: int) -> int:
    """fsdp > 1: compute-dtype copies of split weights that exist in full at once."""
    if fsdp == 1:
        return 0
    c = jnp.dtype(state.mcfg.vit.dtype).itemsize
    total = 0
    for tree in (state.trainable, state.rest):
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            if sharding.fsdp_spec(tuple(x.shape), fsdp) == sharding.fsdp_spec((), fsdp):
                continue  # never split: already counted whole
            names = [str(getattr(k, "key", k)) for k in path]
            layers = (state.mcfg.vit.depth if "vision" in names else state.mcfg.text.layers)
            scanned = "blocks" in names
            total += math.prod(x.shape) * c * (GATHERED_LAYERS / layers if scanned else 1)
    return int(total)


# ------------------------------------------------------------------ plan

@dataclasses.dataclass(eq=False)
class Workload:
    """The abstract state plus its activation sizes with and without remat."""
    state: AbstractState
    image_size: int
    max_length: int
    act: dict  # {remat: activation_bytes(...)}

    @classmethod
    def build(cls, state: AbstractState, image_size: int, max_length: int) -> "Workload":
        return cls(state, image_size, max_length,
                   {r: activation_bytes(state.mcfg, image_size, max_length, r) for r in (True, False)})


@dataclasses.dataclass
class Plan:
    devices: int
    data: int
    fsdp: int
    global_batch: int  # per optimiser step
    per_device_batch: int
    grad_accum: int
    remat: bool
    parts: dict  # GiB
    total_gib: float
    budget_gib: float

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.budget_gib


def plan_one(work: Workload, data: int, fsdp: int, global_batch: int, grad_accum: int,
             remat: bool, gpu_gib: float, mem_fraction: float) -> Plan:
    state, n = work.state, data * fsdp
    micro = global_batch // grad_accum
    b = micro // n
    if b < 1 or micro % n or global_batch % grad_accum:
        raise ValueError(f"global batch {global_batch} / grad_accum {grad_accum} does not split "
                         f"over {n} devices")
    act = work.act[remat]
    pixels = work.image_size ** 2 * state.mcfg.vit.in_channels
    parts = {
        "trainable": bytes_per_device(state.trainable, fsdp),
        "optimizer": bytes_per_device(state.opt_state(grad_accum), fsdp),
        "frozen": bytes_per_device(state.rest, fsdp),
        "grads": bytes_per_device(state.trainable, fsdp),
        "gathers": gather_bytes(state, fsdp),
        "activations": b * act["per_sample"] + act["constant"],
        "local_loss": local_loss_bytes(state.mcfg, work.image_size, micro, b),
        "batch": 2 * b * (2 * pixels * 4 + 2 * work.max_length * 4),
    }
    parts["margin"] = FIXED_MARGIN + MARGIN_FRACTION * sum(parts.values())
    gib = {k: v / GIB for k, v in parts.items()}
    return Plan(n, data, fsdp, global_batch, b, grad_accum, remat, gib, sum(gib.values()),
                gpu_gib * mem_fraction)


def candidates(work: Workload, devices: int, global_batch: int, gpu_gib: float,
               mem_fraction: float) -> list[Plan]:
    """Every (grad_accum, remat, fsdp) for `devices`, best first: no accumulation (it shrinks
    the contrastive negatives), then remat off (no recompute), then the smallest fsdp (least
    communication)."""
    fsdps = [f for f in range(1, devices + 1) if devices % f == 0]
    accums = [a for a in range(1, global_batch + 1)
              if global_batch % a == 0 and (global_batch // a) % devices == 0]
    return [plan_one(work, devices // fsdp, fsdp, global_batch, accum, remat, gpu_gib, mem_fraction)
            for accum in accums for remat in (False, True) for fsdp in fsdps]


def best_plan(plans: list[Plan]) -> Plan | None:
    return next((p for p in plans if p.fits), None)


def global_batch_for(requested: int, devices: int) -> int:
    """The requested global batch, or the next multiple of the device count."""
    return -(-requested // devices) * devices


# ------------------------------------------------------------------ XLA cross-check

def small_state(vit_preset="small", image_size=112, text_layers=2, text_hidden=256, text_heads=4,
                max_length=64, dtype="float32") -> tuple[AbstractState, dict]:
    """The paper config at a size a CPU compiles in seconds (fp32: CPU XLA upcasts bf16)."""
    cfg = paper_config(image_size, max_length)
    cfg.model.update(dict(vit=vit_preset, dtype=dtype, text_param_dtype=dtype))
    original = text_lib.text_config
    text_lib.text_config = lambda name, **kw: original(
        name, **{**kw, "layers": text_layers, "hidden": text_hidden, "heads": text_heads})
    try:
        state = abstract_state(cfg)
    finally:
        text_lib.text_config = original
    return state, dict(image_size=image_size, max_length=max_length,
                       label=f"ViT {vit_preset} @{image_size}px, LM {text_layers}x{text_hidden}, "
                             f"{max_length} tokens, {dtype}")


def xla_check(state: AbstractState, image_size: int, max_length: int, batch: int = 2,
              remat: bool = True) -> dict:
    """Compile MaMA's training forward + backward (gradients of what trains) on this host and
    compare XLA's temp bytes with the activation formula at the same size."""
    loss, trainable, rest = training_forward(with_remat(state.mcfg, remat))
    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(loss)).lower(trainable, rest, batch_spec(batch, image_size, max_length)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    seconds = time.perf_counter() - t0
    act = activation_bytes(state.mcfg, image_size, max_length, remat)
    formula = batch * act["per_sample"] + act["constant"]
    return dict(remat=remat, batch=batch, formula=formula, xla_temp=temp,
                ratio=formula / max(temp, 1), compile_s=seconds)


# ------------------------------------------------------------------ printing

PART_NAMES = ("trainable", "optimizer", "frozen", "grads", "gathers", "activations",
              "local_loss", "batch", "margin")


def plan_row(p: Plan) -> str:
    parts = " ".join(f"{p.parts[k]:6.2f}" for k in PART_NAMES)
    return (f"{p.devices:4d} {p.data:4d} {p.fsdp:4d} {p.global_batch:5d} {p.per_device_batch:4d} "
            f"{p.grad_accum:5d} {'on ' if p.remat else 'off'}  {parts} {p.total_gib:7.2f}")


HEADER = ("   n data fsdp  glob  b/d accum remat " + " ".join(f"{k[:6]:>6}" for k in PART_NAMES)
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
          f"frozen {count(state.rest) / 1e9:.3f}B; AdamW state {count(state.opt_state(1)) / 1e6:.1f}M")
    a = work.act[True]
    print(f"saved for the backward pass, one layer: ViT block {a['vit_block_per_image'] / 2**20:.1f} MiB "
          f"per image, LM block {a['lm_block_per_caption'] / 2**20:.1f} MiB per caption")
    for remat in (True, False):
        a = work.act[remat]
        print(f"activations, remat {'on ' if remat else 'off'}: {a['per_sample'] / GIB:.3f} GiB per sample "
              f"(saved {a['saved_per_sample'] / GIB:.3f} + layer rebuilt in backward "
              f"{a['transient_per_sample'] / GIB:.3f}) + {a['constant'] / GIB:.3f} GiB per device")
    print(f"budget: {mem_fraction} of each GPU (--mem-fraction); margin {FIXED_MARGIN / GIB:.1f} GiB "
          f"+ {MARGIN_FRACTION:.0%}; sizes in GiB. Computed from the model, not measured on a GPU.")
    return {"trainable": count(state.trainable), "frozen": count(state.rest), "lora": lora,
            "image_tokens": tokens, "image_size": work.image_size, "max_length": work.max_length,
            "activations": {str(k): v for k, v in work.act.items()}}


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
    p.add_argument("--json", help="write the model figures, every plan and the check to this file")
    args = p.parse_args()
    try:
        devices = [int(d) for d in args.devices.split(",")]
        gpus = [float(g) for g in args.gpu_gb.split(",")]
    except ValueError as err:
        p.error(f"--devices / --gpu-gb take comma-separated numbers: {err}")
    if min(devices) < 1 or min(gpus) <= 0 or not 0 < args.mem_fraction <= 1 or args.batch < 0:
        p.error("--devices and --gpu-gb must be positive, --mem-fraction in (0, 1], --batch >= 0")

    t0 = time.perf_counter()
    cfg = paper_config(args.image_size, args.max_length)
    work = Workload.build(abstract_state(cfg), cfg.data.image_size, cfg.data.max_length)
    requested = args.batch or cfg.data.global_batch_size
    results = {"model": describe(work, args.mem_fraction), "plans": [], "xla_check": []}
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
            results["plans"] += [dict(dataclasses.asdict(x), gpu_gb=gpu, fits=x.fits, best=x is best)
                                 for x in plans]
    if args.xla_check != "none":
        state, size = small_state()
        print(f"\nXLA cross-check: MaMA training forward + backward compiled on "
              f"{jax.default_backend().upper()} ({size['label']}), temp bytes vs the formula:")
        for remat in {"on": [True], "off": [False], "both": [True, False]}[args.xla_check]:
            r = xla_check(state, size["image_size"], size["max_length"], remat=remat)
            print(f"  remat {'on ' if remat else 'off'} batch {r['batch']}: formula "
                  f"{r['formula'] / 2**20:.1f} MiB, XLA {r['xla_temp'] / 2**20:.1f} MiB, formula/XLA "
                  f"{r['ratio']:.2f} (compile {r['compile_s']:.1f} s)")
            results["xla_check"].append(dict(r, config=size["label"]))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
