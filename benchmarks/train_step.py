"""Pretraining step throughput and MFU of the full MaMA step (mama_jax.train.pretrain.Run.step).

  python benchmarks/train_step.py                                  # paper size: ViT-B/14-reg @518, BioMedLM, bf16
  python benchmarks/train_step.py --vit small --image-size 224 --text biomedlm --text-layers 2   # CPU-sized
  python benchmarks/train_step.py --demo                           # configs/demo.py (tiny towers, fp32, 112 px)
  python benchmarks/train_step.py --demo --batch 16 --micro-batches 4   # exact accumulation vs one pass

Builds the model from configs/pretrain.py (random init, scan + remat) or configs/demo.py,
feeds a synthetic global batch (random images, random token ids with SEP tokens, right
padded), compiles one step, then times --steps steps. Prints samples/s, step time and MFU.

Model FLOPs per sample (MaxText convention: model FLOPs only, no remat recompute, causal
attention counted at half), from parameter counts of the built model ("matmul params" =
leaves named `kernel`; T = tokens, L = layers, D = width):
  ViT, 2 views, trains:   2 x [6 P_blocks T + 4 P_patch N_patch + 3 x 4 L T^2 D]
                          (patch embedding: no gradient to the pixels)
  LM, frozen + LoRA:      4 P_blocks T + 6 P_lora T + 3 x 2 L T^2 D
                          (forward + activation gradient through every layer, no weight grads;
                           6 P T if the base trains, 2 P T + 2 L T^2 D with LoRA frozen too)
  heads (all train):      6 x params x the tokens each head sees
  local loss:             6 B S P d   (B^2 caption-image pairs x S sentences x P patches)
MFU = model FLOPs per step / step time / peak bf16 FLOP/s of the device.

--micro-batches K times the exact-accumulation step (mama_jax/train/grad_cache.py) on the same
global batch, then the one-pass step, and prints the cost ratio. Model FLOPs are the same
for both (the towers' second forward is recompute, which MFU does not count).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import demo, pretrain  # noqa: E402
from mama_jax import factory  # noqa: E402
from mama_jax.train import pretrain, sharding  # noqa: E402
from mama_jax.models import text as text_lib
from mama_jax.input import tokenizer as tok_lib  # noqa: E402

# Dense bf16 peak FLOP/s per chip: (name, device_kind substrings, peak); first match wins
# ("TPU v5 lite" is v5e's device_kind, "TPU v5" v5p's).
PEAK_BF16 = (("H100 SXM", ("H100",), 989e12), ("H200", ("H200",), 989e12), ("A100", ("A100",), 312e12),
             ("TPU v5e", ("v5 lite", "v5e"), 197e12), ("TPU v5p", ("v5p", "TPU v5"), 459e12))
CORPUS = ["Screening mammogram. Left breast, CC view. Scattered fibroglandular density; BI-RADS 1."]


def si(x: float) -> str:
    """1.23e9 -> '1.23 G' (figures here span tiny demo towers to paper size)."""
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {prefix}"
    return f"{x:.3g} "


def peak_flops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((peak for _, keys, peak in PEAK_BF16 if any(k.lower() in kind for k in keys)), None)


@contextlib.contextmanager
def text_layers(n: int | None):
    """Build the decoder preset with n layers (same width) through the normal factory path."""
    original = text_lib.text_config
    if n is not None:
        text_lib.text_config = lambda name, **kw: original(name, **{**kw, "layers": n})
    try:
        yield
    finally:
        text_lib.text_config = original


def _params(module, kind=nnx.Param, name: str | None = None) -> int:
    return sum(int(np.prod(v.shape)) for path, v in nnx.to_flat_state(nnx.state(module, kind))
               if name is None or path[-1] == name)


def flops_per_sample(model, image_size: int, max_length: int, batch: int) -> dict:
    """Model FLOPs of one training sample (two views + one caption) by part; see the docstring."""
    c = model.cfg
    vc, tc = c.vit, c.text
    n_patch = (image_size // vc.patch_size) ** 2
    t_img = n_patch + 1 + vc.num_registers
    vit_blocks = _params(model.vision.blocks, name="kernel")
    vit_patch = _params(model.vision.patch_embed, name="kernel")
    vit = 2 * (6 * vit_blocks * t_img + 4 * vit_patch * n_patch + 3 * 4 * vc.depth * t_img ** 2 * vc.hidden)
    lm_blocks = _params(model.text.blocks, name="kernel")
    lora = _params(model.text, nnx.LoRAParam)
    attn_fwd = 2 * tc.layers * max_length ** 2 * tc.hidden  # causal: half of 4 L T^2 D
    if c.train_text_base:
        lm = 6 * (lm_blocks + lora) * max_length + 3 * attn_fwd
    elif c.freeze_llm:
        lm = 2 * (lm_blocks + lora) * max_length + attn_fwd
    else:
        lm = 4 * lm_blocks * max_length + 6 * lora * max_length + 3 * attn_fwd
    heads = 6 * (2 * _params(model.img_global, name="kernel") + 2 * _params(model.simclr, name="kernel")
                 + n_patch * _params(model.img_local, name="kernel")
                 + _params(model.txt_global, name="kernel")
                 + c.max_sentences * _params(model.txt_local, name="kernel"))
    local = 6 * batch * c.max_sentences * n_patch * c.embed_dim
    return {"vit": vit, "lm": lm, "heads": heads, "local_loss": local, "total": vit + lm + heads + local,
            "vit_params": _params(model.vision), "lm_params": _params(model.text),
            "lora_params": lora}


def random_batch(tok, batch: int, image_size: int, max_length: int, seed: int = 0) -> dict:
    """Images N(0,1) and captions BOS + words with a SEP every ~8 tokens + EOS, right padded."""
    rng = np.random.default_rng(seed)
    ids = np.full((batch, max_length), tok.pad_id, np.int32)
    mask = np.zeros((batch, max_length), np.int32)
    for row in range(batch):
        n = int(rng.integers(max_length * 3 // 4, max_length + 1))  # BOS and EOS included
        body = rng.integers(0, tok.base_vocab_size, n - 2)
        body[7::8] = tok.sep_id
        ids[row, :n] = [tok.bos_id, *body, tok.eos_id]
        mask[row, :n] = 1
    shape = (batch, image_size, image_size, 3)
    return {"view1": rng.standard_normal(shape, np.float32),
            "view2": rng.standard_normal(shape, np.float32),
            "input_ids": ids, "attention_mask": mask}


def make_config(args):
    cfg = demo.get_config() if args.demo else pretrain.get_config()
    cfg.model.random_init, cfg.model.tokenizer = True, ""
    for field, value in (("vit", args.vit), ("text", args.text)):
        if value:
            cfg.model[field] = value
    cfg.data.image_size = args.image_size or cfg.data.image_size
    cfg.data.max_length = args.max_length or cfg.data.max_length
    return cfg


def measure(cfg, tok, args, batch: int, micro_batches: int = 1) -> dict:
    """Build, compile one step, time args.steps steps."""
    mesh = sharding.make_mesh(-1, 1)
    cfg = cfg.copy_and_resolve_references()
    cfg.data.global_batch_size, cfg.train.micro_batches = batch, micro_batches
    t0 = time.perf_counter()
    with text_layers(args.text_layers):
        model = factory.model(cfg, tok)
    flops = flops_per_sample(model, cfg.data.image_size, cfg.data.max_length, batch)
    run = pretrain.Run.create(cfg, model, mesh)
    del model
    build_s = time.perf_counter() - t0
    global_batch = sharding.shard_batch(
        random_batch(tok, batch, cfg.data.image_size, cfg.data.max_length), mesh)
    step, key = cfg.loss.delta, jax.random.key(0)  # local loss on: the steady-state step
    t0 = time.perf_counter()
    jax.block_until_ready(run.step(global_batch, step, key))
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        out = run.step(global_batch, step, jax.random.fold_in(key, i + 1))
    loss = float(jax.block_until_ready(out)["total"])
    step_s = (time.perf_counter() - t0) / args.steps
    return dict(flops, batch=batch, micro_batches=micro_batches, build_s=build_s, first_s=first_s,
                step_s=step_s, loss=loss, peak_gib=peak_memory_gib())


def peak_memory_gib() -> float | None:
    """The most memory device 0 has held so far (GPU/TPU; None where the backend has no
    statistics, as on CPU): compare with benchmarks/memory_plan.py."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return peak / 2**30 if peak is not None else None


def print_flops(r: dict, tok) -> None:
    parts = ", ".join(f"{k} {si(r[k])}FLOP" for k in ("vit", "lm", "heads", "local_loss"))
    print(f"model FLOPs per sample at batch {r['batch']}: {si(r['total'])}FLOP ({parts})")
    print(f"params: vit {si(r['vit_params'])}, LM {si(r['lm_params'])}, LoRA "
          f"{si(r['lora_params'])} (the LM's wte has the tiny tokenizer's {tok.base_vocab_size} "
          f"rows, not BioMedLM's 28,896: memory only, a lookup costs no FLOPs)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="configs/demo.py instead of configs/pretrain.py")
    p.add_argument("--vit", help="tiny | small | base | large (default: the config's)")
    p.add_argument("--text", help="tiny | biomedlm (default: the config's)")
    p.add_argument("--text-layers", type=int, help="decoder layers (same width); for CPU runs")
    p.add_argument("--image-size", type=int)
    p.add_argument("--max-length", type=int, help="caption tokens (default: the config's)")
    p.add_argument("--batch", type=int, help="global batch; default: doubling from 8 on an "
                   "accelerator while it fits, 2 on CPU")
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the compile step")
    p.add_argument("--micro-batches", type=int, default=1, help="split each global batch into K "
                   "micro-batches (exact accumulation) and compare with the one-pass step")
    p.add_argument("--flops-only", action="store_true", help="count model FLOPs on an abstract "
                   "model (no memory, no run) and project samples/s at 40%% MFU per device in the table")
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s per device for MFU (overrides the table)")
    args = p.parse_args()

    dev = jax.devices()[0]
    n_dev = jax.device_count()
    peak = args.peak_flops or peak_flops(dev.device_kind)
    cfg = make_config(args)
    with tempfile.TemporaryDirectory() as folder:
        tok = tok_lib.load_tokenizer(tok_lib.build_tiny_tokenizer(folder, CORPUS, vocab_size=1000))
    m = cfg.model
    print(f"device: {dev.device_kind} x{n_dev} ({jax.default_backend()}), peak "
          f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'} per device")
    print(f"model: vit {m.vit} reg{m.num_registers} @{cfg.data.image_size}px, text {m.text}"
          f"{f' ({args.text_layers} layers)' if args.text_layers else ''}, {cfg.data.max_length} "
          f"tokens, {m.dtype} compute, {m.text_param_dtype} LM base, scan={m.scan_layers} remat={m.remat}")

    if args.flops_only:
        with text_layers(args.text_layers):
            model = nnx.eval_shape(lambda: factory.model(cfg, tok))
        batch = args.batch or cfg.data.global_batch_size
        r = dict(flops_per_sample(model, cfg.data.image_size, cfg.data.max_length, batch), batch=batch)
        print_flops(r, tok)
        for name, _, chip_peak in PEAK_BF16:
            print(f"  projection (not a measurement) at 40% MFU on {name}: "
                  f"{0.4 * chip_peak / r['total']:.0f} samples/s per chip")
        return
    if args.batch:
        sizes = [args.batch]
    elif jax.default_backend() == "cpu":
        sizes = [2]
    else:
        sizes = [8 * n_dev * 2 ** i for i in range(12) if 8 * n_dev * 2 ** i <= args.max_batch]
    if args.micro_batches > 1:
        compare_micro_batches(cfg, tok, args, args.batch or 2 * args.micro_batches * n_dev, peak, n_dev)
        return
    best = None
    for batch in sizes:
        try:
            r = measure(cfg, tok, args, batch)
        except Exception as err:  # noqa: BLE001 (jax raises XlaRuntimeError / ValueError for OOM)
            if best is None or not out_of_memory(err):
                raise
            print(f"batch {batch}: out of memory, keeping batch {best['batch']}")
            break
        print_result(r, peak, n_dev)
        best = r
    print_flops(best, tok)


def out_of_memory(err: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err)


def print_result(r: dict, peak: float | None, n_dev: int) -> None:
    batch = r["batch"]
    achieved = r["total"] * batch / r["step_s"] / n_dev
    mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a (pass --peak-flops)"
    memory = f"{r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "n/a"
    split = f" in {r['micro_batches']} micro-batches of {batch // r['micro_batches']}" if r["micro_batches"] > 1 else ""
    print(f"batch {batch}{split}: {batch / r['step_s']:.3g} samples/s, step {r['step_s'] * 1e3:.0f} ms "
          f"(compile+first {r['first_s']:.1f} s, build {r['build_s']:.1f} s), "
          f"{si(achieved)}FLOP/s/device, MFU {mfu}, loss {r['loss']:.3f}, "
          f"peak memory {memory} on device 0")


def compare_micro_batches(cfg, tok, args, batch: int, peak, n_dev: int) -> None:
    """The accumulated step, then the one-pass step on the same global batch (the peak
    memory printed for the second is the process's peak so far, so the first goes first)."""
    acc = measure(cfg, tok, args, batch, args.micro_batches)
    print_result(acc, peak, n_dev)
    try:
        one = measure(cfg, tok, args, batch, 1)
    except Exception as err:  # noqa: BLE001
        if not out_of_memory(err):
            raise
        print(f"batch {batch} in one pass: out of memory (the accumulated step fits)")
    else:
        print_result(one, peak, n_dev)
        print(f"cost of {args.micro_batches} micro-batches vs one pass at batch {batch}: "
              f"{acc['step_s'] / one['step_s']:.2f}x step time; losses {acc['loss']:.6f} vs "
              f"{one['loss']:.6f}")
    print_flops(acc, tok)


if __name__ == "__main__":
    main()
