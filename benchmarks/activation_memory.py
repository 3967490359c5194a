"""Activation memory of MaMA's training step, from what JAX's autodiff saves.

The forward's saved residuals are traced on the abstract model (no weights) at 1 and 2
samples per device: the difference is the per-sample size, the rest a constant. With
remat, each scanned layer keeps only its input, and one rebuilt layer is added on top.
Used by memory_plan.py; nothing here is a measurement on a device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mama_jax import losses
from mama_jax.models import mama, text as text_lib, vit
# What jax.ad_checkpoint.print_saved_residuals prints, as a list (no public equivalent).
from jax._src.ad_checkpoint import saved_residuals  # noqa: E402


def vit_tokens(vc, image_size: int) -> tuple[int, int]:
    patches = (image_size // vc.patch_size) ** 2
    return 1 + vc.num_registers + patches, patches


def batch_spec(b: int, image_size: int, max_length: int) -> dict:
    image = jax.ShapeDtypeStruct((b, image_size, image_size, 3), jnp.float32)
    text = jax.ShapeDtypeStruct((b, max_length), jnp.int32)
    return {"view1": image, "view2": image, "input_ids": text, "attention_mask": text}


def with_remat(mcfg, remat: bool):
    return dataclasses.replace(mcfg, vit=dataclasses.replace(mcfg.vit, remat=remat),
                               text=dataclasses.replace(mcfg.text, remat=remat))


def residual_bytes(fn, *args) -> int:
    """Bytes of what JAX's autodiff saves from fn's forward for its backward pass, less the
    parameters themselves (arguments other than `batch`/`x`, or frozen ones behind
    stop_gradient): jax.ad_checkpoint.print_saved_residuals, as numbers."""
    total = 0
    for aval, src in saved_residuals(fn, *args):
        is_param = (src.startswith("from the argument") and not src.startswith(("from the argument batch",
                                                                             "from the argument x"))
                    or "stop_gradient" in src)
        total += 0 if is_param else aval.size * aval.dtype.itemsize
    return total


def training_forward(mcfg):
    """(f(trainable, rest, batch) -> a scalar of every embedding, trainable, rest): MaMA's
    training forward (dropout on) on an abstract model, frozen state behind stop_gradient."""
    model = nnx.eval_shape(lambda: mama.MaMA(mcfg, rngs=nnx.Rngs(0)))
    graphdef, trainable, rest = nnx.split(model, mama.trainable_filter(mcfg), ...)

    def f(trainable, rest, batch):
        m = nnx.merge(graphdef, trainable, jax.lax.stop_gradient(rest))
        emb = m(batch, train=True, rngs=nnx.Rngs(dropout=0))
        return sum(jnp.sum(v.astype(jnp.float32)) for k, v in emb.items() if k != "sent_mask")

    return f, trainable, rest


def _forward_residuals(mcfg, b: int, image_size: int, max_length: int) -> int:
    """Saved residuals of MaMA's training forward, gradients to what trains."""
    f, trainable, rest = training_forward(mcfg)
    return residual_bytes(lambda batch, t, r: f(t, r, batch),
                          batch_spec(b, image_size, max_length), trainable, rest)


def block_residuals(mcfg, image_size: int, max_length: int) -> dict:
    """Saved residuals of one ViT block per image and one LM block per caption (dropout on,
    LoRA trains, base frozen): what a rematerialised layer rebuilds in the backward pass.
    Traced at 1 and 2 samples so per-layer weight casts drop out."""
    vc, tc = mcfg.vit, mcfg.text
    tokens, _ = vit_tokens(vc, image_size)
    vgd, vparams = nnx.split(nnx.eval_shape(lambda: vit.Block(vc, rngs=nnx.Rngs(0))))
    lgd, lora, frozen = nnx.split(nnx.eval_shape(lambda: text_lib.Block(tc, rngs=nnx.Rngs(0))),
                                  text_lib.trainable_filter(tc), ...)

    def lm(x, lora, frozen):
        block = nnx.merge(lgd, lora, jax.lax.stop_gradient(frozen))
        mask = jnp.ones(x.shape[:2], bool)
        return block(x, mask, jnp.float32(1.0), deterministic=False, key=jax.random.key(0))

    def slope(fn, width, length, dtype, *params):
        one, two = (residual_bytes(fn, jax.ShapeDtypeStruct((b, length, width), dtype), *params)
                    for b in (1, 2))
        return two - one

    return {"vit_block_per_image": slope(lambda x, p: nnx.merge(vgd, p)(x), vc.hidden, tokens,
                                         vc.dtype, vparams),
            "lm_block_per_caption": slope(lm, tc.hidden, max_length, tc.dtype, lora, frozen)}


def activation_bytes(mcfg, image_size: int, max_length: int, remat: bool) -> dict:
    """Activation bytes of the step: per_sample x b + constant.

    per_sample / constant: the forward's saved residuals traced at b = 1 and 2 (with remat,
    the scans keep each layer's input only). remat adds the layer being rebuilt in the
    backward pass: the larger of one ViT block for 2 views and one LM block, per sample.
    """
    mc = with_remat(mcfg, remat)
    r1, r2 = (_forward_residuals(mc, b, image_size, max_length) for b in (1, 2))
    blocks = block_residuals(mcfg, image_size, max_length)
    transient = max(2 * blocks["vit_block_per_image"], blocks["lm_block_per_caption"]) if remat else 0
    return {"saved_per_sample": r2 - r1, "constant": max(2 * r1 - r2, 0),
            "transient_per_sample": transient, "per_sample": r2 - r1 + transient, **blocks}


def local_loss_bytes(mcfg, image_size: int, micro_batch: int, per_device: int) -> int:
    """The local loss on one device: gathered patches of the whole micro-batch, fp32
    (value, normalised, gradient), and three similarity blocks of one caption chunk."""
    _, patches = vit_tokens(mcfg.vit, image_size)
    gathered = 3 * micro_batch * patches * mcfg.embed_dim * 4
    per_caption = micro_batch * mcfg.max_sentences * patches
    chunk = max(1, min(per_device, losses._CHUNK_ELEMENTS // per_caption))
    return gathered + 3 * chunk * per_caption * 4
