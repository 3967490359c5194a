"""Tower sizes and forward throughput at paper scale, on whatever device JAX has.

  python benchmarks/towers.py                      # ViT-B/14-reg @518 + BioMedLM-size decoder
  python benchmarks/towers.py --skip-text          # vision tower only
  python benchmarks/towers.py --vit tiny --text tiny --image-size 56   # smoke run

Prints parameter counts, parameter memory, and forward images/s and
captions/s (at --tokens tokens). Weights are random (same cost as real ones);
the decoder base is stored in --text-param-dtype (bf16 by default, as in training).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mama_jax.models import text, vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _param_stats(module) -> tuple[int, int]:
    leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
    return sum(x.size for x in leaves), sum(x.size * x.dtype.itemsize for x in leaves)


def _build(make):
    """Initialise inside jit so parameters are born on the device, in their dtype."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=None)()
    return nnx.merge(graphdef, state)


_normal = jax.jit(lambda key, shape, dtype: 0.02 * jax.random.normal(key, shape, dtype),
                  static_argnums=(1, 2))


def _build_per_array(make):
    """GPT-2-style random values (LayerNorm scales 1, biases 0, the rest N(0, 0.02)),
    one array per jit call. Initialising the 2.7B decoder in one jit needs ~25 GB of
    temporaries (random bits for all 32 vmapped layers at once): more than a 23 GB CPU host."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(abstract))))

    def one(path, leaf):
        name, key = getattr(path[-2], "key", None), next(keys)
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return jnp.zeros(leaf.shape, leaf.dtype)
        return _normal(key, leaf.shape, jnp.dtype(leaf.dtype))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(one, abstract))


def _time(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def bench_vit(args) -> None:
    cfg = vit.vit_config(args.vit, num_registers=args.registers,
                         dtype=DTYPES[args.dtype], param_dtype=jnp.float32,
                         scan_layers=True, remat=False)
    model = _build(lambda: vit.VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    n, nbytes = _param_stats(model)
    print(f"vision  {args.vit}/14 reg{args.registers} @{args.image_size}px: "
          f"{n / 1e6:.1f}M params, {nbytes / 2**20:.0f} MiB (fp32 params, {args.dtype} compute)")
    images = jnp.asarray(np.random.default_rng(0).normal(
        size=(args.batch_images, args.image_size, args.image_size, 3)), DTYPES[args.dtype])
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).prenorm.mean(1))
    sec = _time(fwd, state, images, iters=args.iters)
    print(f"vision  forward: {args.batch_images / sec:.2f} images/s "
          f"({sec * 1e3:.0f} ms per batch of {args.batch_images})")


def bench_text(args) -> None:
    cfg = text.text_config(args.text, dtype=DTYPES[args.dtype],
                           param_dtype=DTYPES[args.text_param_dtype], scan_layers=True)
    model = _build_per_array(lambda: text.TextDecoder(cfg, rngs=nnx.Rngs(0)))
    n, nbytes = _param_stats(model)
    print(f"text    {args.text} ({cfg.layers} x {cfg.hidden}): {n / 1e9:.3f}B params, "
          f"{nbytes / 2**30:.2f} GiB ({args.text_param_dtype} base)")
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch_captions, args.tokens)), jnp.int32)
    mask = jnp.ones_like(ids)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m)[:, -1])
    sec = _time(fwd, state, ids, mask, iters=args.iters)
    print(f"text    forward: {args.batch_captions / sec:.2f} captions/s at {args.tokens} tokens "
          f"({sec * 1e3:.0f} ms per batch of {args.batch_captions})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vit", default="base")
    p.add_argument("--registers", type=int, default=4)
    p.add_argument("--image-size", type=int, default=518)
    p.add_argument("--text", default="biomedlm")
    p.add_argument("--tokens", type=int, default=144)
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="compute dtype")
    p.add_argument("--text-param-dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--batch-images", type=int, default=2)
    p.add_argument("--batch-captions", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--skip-text", action="store_true")
    p.add_argument("--skip-vision", action="store_true")
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})")
    if not args.skip_vision:
        bench_vit(args)
    if not args.skip_text:
        bench_text(args)


if __name__ == "__main__":
    main()
