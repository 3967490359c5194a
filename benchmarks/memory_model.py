"""The memory model of the paper's pretraining step per device, for data x fsdp meshes.

benchmarks/memory_plan.py prints it; tests/test_memory_plan.py checks it against the model
and against XLA.

Model: configs/pretrain.py (DINOv2 ViT-B/14 reg4 @ --image-size, BioMedLM 32 x 2560 with a
frozen bf16 base and LoRA rank 8 on c_attn, d 512, bf16 compute, scan over layers). The
model is built with nnx.eval_shape (no weight is allocated); parameter and optimiser
bytes per device come from its abstract state, split by mama_jax.train.sharding.state_shardings
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

import dataclasses
import functools
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
from mama_jax import factory  # noqa: E402
from mama_jax.train import sharding  # noqa: E402
from mama_jax.models import mama, text as text_lib  # noqa: E402
from activation_memory import (batch_spec, feature_spec, head_activation_bytes,  # noqa: E402
                               heads_grad, local_loss_bytes, nbytes, tower_activation_bytes,
                               training_grad, with_remat)

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

    @functools.cached_property
    def opt_state(self):
        """AdamW's moments, counted directly (mu and nu shaped and split like the weights;
        tests/test_memory_plan.py checks this against mama_jax.train.optim.make_optimizer)."""
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
