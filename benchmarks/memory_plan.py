"""Per-device memory of the paper's pretraining step for data x fsdp meshes, and which fit.

  python benchmarks/memory_plan.py                         # 1..64 devices, 24/40/80 GB GPUs
  python benchmarks/memory_plan.py --devices 8 --gpu-gb 40 --all
  python benchmarks/memory_plan.py --json plan.json --xla-check both

Model: configs/pretrain.py (DINOv2 ViT-B/14 reg4 @ --image-size, BioMedLM 32 x 2560 with a
frozen bf16 base and LoRA rank 8 on c_attn, d 512, bf16 compute, scan over layers). The
model is built with nnx.eval_shape (no weight is allocated); parameter and optimiser
bytes per device come from its abstract state, split by mama_jax.sharding.state_shardings
(the same rule Run.create uses) on an abstract data x fsdp mesh.

The step with train.micro_batches = k is exact accumulation (GradCache; activation_memory.py
describes its three parts): the loss always sees the whole global batch G. Per device,
with b = G / devices (the per-device batch) and b / k (the micro-batch per device, which
must be whole):
  trainable fp32     ViT + heads + LoRA + temperatures          (split over fsdp where the rule splits)
  optimiser          AdamW mu + nu: 2 x the trainable fp32 state (the local heads' own
                     Adam moments included), split like it
  frozen base        LM base bf16, frozen ViT norm, BatchNorm statistics
  gradients          one fp32 copy of the trainable state (k > 1: the heads' gradients and
                     the scan's running sum of the towers'), + k > 1: one micro-batch's tower
                     gradients before they are added to the sum
  fsdp gathers       fsdp > 1: full compute-dtype weights of 2 scanned layers per tower
                     (the one in use and the prefetched one) + every split unscanned leaf
  towers             the towers' activations for ONE micro-batch: b / k x per sample + a constant
  heads              the heads' activations for the whole per-device batch b (the local
                     heads run on b x P patch tokens through a 2048-wide layer); k = 1 also
                     keeps the tower outputs the heads read
  cache              k > 1: the tower outputs for the whole per-device batch, and their gradients
  local loss         the all-gathered patch embeddings of the global batch (fp32, value +
                     normalised + gradient) + 3 [chunk, G, S, P] similarity blocks
  batch              the input arrays of the whole per-device batch, twice (this step's and the next)
  margin             0.5 GiB (cuBLAS / cuDNN / NCCL workspaces) + 10 % of the rest
The sum is an upper bound for k > 1: the heads' activations are freed before the towers
run again under vjp, so a perfect schedule holds the larger of the two, not both.
A plan fits when the total is under --mem-fraction x the GPU's memory (JAX preallocates
75 % by default: XLA_CLIENT_MEM_FRACTION, formerly XLA_PYTHON_CLIENT_MEM_FRACTION).
Best plan: the fewest micro-batches that fit (each costs a tower re-run), then remat off
(no recompute), then the smallest fsdp (least communication).

Activations: what JAX's autodiff saves from the forward pass for the backward pass
(jax.ad_checkpoint.print_saved_residuals, summed), traced on MaMA.tower_features and
MaMA.head_embeddings (dropout on, gradients to what trains, the frozen LM base behind
stop_gradient) at 1 and 2 samples: the difference is the per-sample size, the rest a constant.
Saved broadcasts (e.g. ReLU's zeros) are left out: XLA fuses them into their users.
  remat on:  each scanned layer keeps only its input (the scan carry, T x D per layer);
             the backward pass rebuilds one layer at a time, so one layer's residuals for
             the micro-batch come on top (the larger of one ViT block for 2 views and one
             LM block, also traced).
  remat off: every layer keeps everything, e.g. per ViT layer and image the fp32 softmax
             numerator and the bf16 probabilities (H x T^2 each; XLA attention: cuDNN
             flash attention would keep neither), fp32 LayerNorm intermediates, GELU terms.
--xla-check compiles that same step (k = 1 and k = 2, a sum of the embeddings as the loss;
activation_memory.training_grad) and the heads' part alone at a small size (fp32: CPU XLA
upcasts bf16) on this host and prints formula / XLA temp bytes. Everything is computed from
the abstract model; nothing here is a measurement on a GPU.
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
from mama_jax import factory, sharding  # noqa: E402
from mama_jax.models import mama, text as text_lib  # noqa: E402
from activation_memory import (batch_spec, feature_spec, head_activation_bytes,  # noqa: E402
                               heads_grad, local_loss_bytes, nbytes, tower_activation_bytes,
                               training_grad, vit_tokens, with_remat)

GIB = 2 ** 30
FIXED_MARGIN = 0.5 * GIB  # cuBLAS / cuDNN workspaces, NCCL buffers
MARGIN_FRACTION = 0.10  # fragmentation, XLA schedules that keep more alive than the formula
GATHERED_LAYERS = 2  # fsdp: the layer being computed + the one being prefetched
# (devices, GB per device) of the "Plans for the paper's batch" section; 4 x 24 GB is the paper's.
PAPER_SETUPS = ((1, 24), (1, 80), (4, 24), (8, 80))


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

    @functools.cached_property
    def opt_state(self):
        """AdamW's moments, counted directly (mu and nu shaped and split like the weights;
        tests/test_memory_plan.py checks this against mama_jax.optim.make_optimizer)."""
        return {"mu": self.trainable, "nu": self.trainable}

    @functools.cached_property
    def tower_trainable(self):
        """What trains in the towers (the ViT, LoRA): the parameters part (c) differentiates."""
        return {name: self.trainable[name] for name in ("vision", "text") if name in self.trainable}


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
    """The abstract state plus its activation and cache sizes (bytes)."""
    state: AbstractState
    image_size: int
    max_length: int
    towers: dict  # {remat: tower_activation_bytes(...)}
    heads: dict  # head_activation_bytes(...)
    cache_per_sample: int  # tower_features outputs of one sample

    @classmethod
    def build(cls, state: AbstractState, image_size: int, max_length: int) -> "Workload":
        m = state.mcfg
        return cls(state, image_size, max_length,
                   {r: tower_activation_bytes(m, image_size, max_length, r) for r in (True, False)},
                   head_activation_bytes(m, image_size, max_length),
                   nbytes(feature_spec(m, 1, image_size, max_length)))


def activation_parts(work: Workload, b: int, k: int, remat: bool) -> dict:
    """Bytes of the towers (one micro-batch of b / k), the heads (all b) and the cache."""
    towers, heads = work.towers[remat], work.heads
    head_inputs = b * heads["inputs_per_sample"] if k == 1 else 0  # k > 1: they are the cache
    return {"towers": b // k * towers["per_sample"] + towers["constant"],
            "heads": b * heads["per_sample"] + head_inputs + heads["constant"],
            "cache": 2 * b * work.cache_per_sample if k > 1 else 0}  # values + their gradients


@dataclasses.dataclass
class Plan:
    devices: int
    data: int
    fsdp: int
    global_batch: int  # what the loss sees, per optimiser update
    per_device_batch: int
    micro_batches: int  # train.micro_batches
    micro_batch: int  # per device: per_device_batch / micro_batches
    remat: bool
    parts: dict  # GiB
    total_gib: float
    budget_gib: float

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.budget_gib


def plan_one(work: Workload, data: int, fsdp: int, global_batch: int, micro_batches: int,
             remat: bool, gpu_gib: float, mem_fraction: float) -> Plan:
    state, n, k = work.state, data * fsdp, micro_batches
    b = global_batch // n
    if b < 1 or global_batch % n or b % k:
        raise ValueError(f"global batch {global_batch} does not split into {k} micro-batches "
                         f"of whole per-device batches over {n} devices")
    pixels = work.image_size ** 2 * state.mcfg.vit.in_channels
    trainable = bytes_per_device(state.trainable, fsdp)
    parts = {
        "trainable": trainable,
        "optimizer": bytes_per_device(state.opt_state, fsdp),
        "frozen": bytes_per_device(state.rest, fsdp),
        # k > 1: one micro-batch's tower gradients exist besides the running sum.
        "grads": trainable + (bytes_per_device(state.tower_trainable, fsdp) if k > 1 else 0),
        "gathers": gather_bytes(state, fsdp),
        **activation_parts(work, b, k, remat),
        "local_loss": local_loss_bytes(state.mcfg, work.image_size, global_batch, b),
        "batch": 2 * b * (2 * pixels * 4 + 2 * work.max_length * 4),
    }
    parts["margin"] = FIXED_MARGIN + MARGIN_FRACTION * sum(parts.values())
    gib = {name: v / GIB for name, v in parts.items()}
    return Plan(n, data, fsdp, global_batch, b, k, b // k, remat, gib, sum(gib.values()),
                gpu_gib * mem_fraction)


def candidates(work: Workload, devices: int, global_batch: int, gpu_gib: float,
               mem_fraction: float) -> list[Plan]:
    """Every (micro_batches, remat, fsdp) for `devices`, best first: the fewest micro-batches
    (each one re-runs the towers), then remat off (no recompute), then the smallest fsdp
    (least communication)."""
    fsdps = [f for f in range(1, devices + 1) if devices % f == 0]
    ks = [k for k in range(1, global_batch + 1) if global_batch % (k * devices) == 0]
    return [plan_one(work, devices // fsdp, fsdp, global_batch, k, remat, gpu_gib, mem_fraction)
            for k in ks for remat in (False, True) for fsdp in fsdps]


def best_plan(plans: list[Plan]) -> Plan | None:
    return next((p for p in plans if p.fits), None)


def global_batch_for(requested: int, devices: int) -> int:
    """The requested global batch, or the next multiple of the device count."""
    return -(-requested // devices) * devices


# Model paths as in docs/scaling.md; replace with yours.
RUN_FLAGS = ("--config.data.dataset_dir=/data/embed/tfds/mammography/embed/1.0.0",
             "--config.model.vit_weights=/models/dinov2_vitb14_reg4_pretrain.pth",
             "--config.model.text_weights=/models/BioMedLM",
             "--config.model.tokenizer=/models/BioMedLM")


def command(plan: Plan, mem_fraction: float, data_overrides: dict | None = None) -> str:
    """The mama_jax.main command line that runs `plan` (mesh.data = -1 takes the rest);
    data_overrides: config.data fields that differ from configs/pretrain.py."""
    env = f"XLA_CLIENT_MEM_FRACTION={mem_fraction:g} " if mem_fraction != 0.75 else ""
    data = dict(data_overrides or {})
    if plan.global_batch != pretrain.get_config().data.global_batch_size:
        data["global_batch_size"] = plan.global_batch
    flags = [*RUN_FLAGS, *(f"--config.data.{k}={v}" for k, v in data.items()),
             f"--config.train.micro_batches={plan.micro_batches}", f"--config.mesh.fsdp={plan.fsdp}"]
    if not plan.remat:
        flags.append("--config.model.remat=False")
    lines = [f"{env}python -m mama_jax.main --config=configs/pretrain.py --workdir=runs/mama"] + flags
    return " \\\n      ".join(lines)


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


def xla_check(work: Workload, batch: int = 2, remat: bool = True, micro_batches: int = 1) -> dict:
    """Compile the training step's forward + backward (gradients of what trains) on this host
    and compare XLA's temp bytes with the formula's activations + cache at the same size
    (k > 1: + one micro-batch's tower gradients; the summed gradients are the output)."""
    grad, trainable, rest = training_grad(with_remat(work.state.mcfg, remat), micro_batches)
    t0 = time.perf_counter()
    compiled = jax.jit(grad).lower(trainable, rest,
                                   batch_spec(batch, work.image_size, work.max_length)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    seconds = time.perf_counter() - t0
    formula = sum(activation_parts(work, batch, micro_batches, remat).values())
    if micro_batches > 1:
        formula += nbytes(work.state.tower_trainable)
    return dict(remat=remat, batch=batch, micro_batches=micro_batches, formula=formula,
                xla_temp=temp, ratio=formula / max(temp, 1), compile_s=seconds)


def xla_check_heads(work: Workload, batch: int = 32) -> dict:
    """Part (b) alone: the heads' backward on abstract tower features, XLA's temp bytes
    against the heads' figure (their parameter and feature gradients are outputs)."""
    grad, trainable, rest = heads_grad(work.state.mcfg)
    feats = feature_spec(work.state.mcfg, batch, work.image_size, work.max_length)
    t0 = time.perf_counter()
    temp = jax.jit(grad).lower(trainable, rest, feats).compile().memory_analysis().temp_size_in_bytes
    seconds = time.perf_counter() - t0
    formula = batch * work.heads["per_sample"] + work.heads["constant"]
    return dict(part="heads", batch=batch, formula=formula, xla_temp=temp,
                ratio=formula / max(temp, 1), compile_s=seconds)


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
