"""Activation memory of MaMA's training step, from what JAX's autodiff saves.

The step (mama_jax/train/pretrain.py) with train.micro_batches = k:
  k = 1  the towers (MaMA.tower_features) and the heads (MaMA.head_embeddings) run on the
         whole per-device batch under one backward pass;
  k > 1  exact accumulation, GradCache-style: (a) the towers run on each micro-batch
         without gradient and their outputs are cached for the whole batch; (b) the heads
         and the loss run once on the whole batch, with gradients to the heads and to the
         cache; (c) per micro-batch the towers run again under jax.vjp and pull the
         cache's gradients back. Only one micro-batch's tower activations exist at a time;
         the heads' exist for the whole per-device batch.
So towers and heads are sized apart: their saved residuals are traced on the abstract model
(no weights) at 1 and 2 samples per device, the difference is the per-sample size, the rest
a constant. With remat each scanned layer keeps only its input, and one rebuilt layer comes
on top. Used by memory_plan.py; nothing here is a measurement on a device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mama_jax import losses
from mama_jax.train import grad_cache
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


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def residual_bytes(fn, *args, data=("batch", "x")) -> dict:
    """Bytes of what JAX's autodiff saves from fn's forward for its backward pass, less the
    parameters (arguments not named in `data`, and frozen ones behind stop_gradient):
    jax.ad_checkpoint.print_saved_residuals, as numbers. `inputs` is the part that is a
    `data` argument itself, `internal` the rest."""
    out = {"internal": 0, "inputs": 0}
    for aval, src in saved_residuals(fn, *args):
        from_arg = src.startswith("from the argument")
        if "stop_gradient" in src or (from_arg and not src.startswith(
                tuple(f"from the argument {name}" for name in data))):
            continue  # a parameter: counted with the state, not here
        if src.startswith("output of broadcast_in_dim"):
            continue  # e.g. ReLU's zeros: XLA fuses a broadcast into its users, never stores it
        out["inputs" if from_arg else "internal"] += aval.size * aval.dtype.itemsize
    return out


def _scalar(tree) -> jax.Array:
    """A sum of every float leaf: a loss whose gradient reaches all of them and saves nothing."""
    return sum(jnp.sum(v.astype(jnp.float32)) for v in jax.tree.leaves(tree)
               if jnp.issubdtype(v.dtype, jnp.floating))


def split_model(mcfg):
    """(graphdef, trainable, rest) of an abstract MaMA (no weight allocated)."""
    model = nnx.eval_shape(lambda: mama.MaMA(mcfg, rngs=nnx.Rngs(0)))
    return nnx.split(model, mama.trainable_filter(mcfg), ...)


def _merge(graphdef, trainable, rest):
    # copy=True: fresh Variables, so a merge inside lax.scan holds that scan's tracers.
    return nnx.merge(graphdef, trainable, jax.lax.stop_gradient(rest), copy=True)


def feature_spec(mcfg, b: int, image_size: int, max_length: int) -> dict:
    """Abstract tower_features outputs for b samples: what the k > 1 step caches."""
    graphdef, trainable, rest = split_model(mcfg)
    return jax.eval_shape(
        lambda t, r, batch: _merge(graphdef, t, r).tower_features(batch, train=True,
                                                                  rngs=nnx.Rngs(dropout=0)),
        trainable, rest, batch_spec(b, image_size, max_length))


def _slope(one: int, two: int) -> tuple[int, int]:
    """(per-sample, constant) of a size measured at 1 and 2 samples."""
    return two - one, max(2 * one - two, 0)


# ------------------------------------------------------------------ towers

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

    def per_sample(fn, width, length, dtype, *params):
        def measure(b):
            r = residual_bytes(fn, jax.ShapeDtypeStruct((b, length, width), dtype), *params)
            return r["internal"] + r["inputs"]
        return _slope(measure(1), measure(2))[0]

    return {"vit_block_per_image": per_sample(lambda x, p: nnx.merge(vgd, p)(x), vc.hidden,
                                              tokens, vc.dtype, vparams),
            "lm_block_per_caption": per_sample(lm, tc.hidden, max_length, tc.dtype, lora, frozen)}


def tower_activation_bytes(mcfg, image_size: int, max_length: int, remat: bool) -> dict:
    """Activations of the towers' backward for b samples: per_sample x b + constant.

    Traced on MaMA.tower_features (both views through the ViT, the caption through the LM,
    dropout on, gradients to what trains). remat adds the layer being rebuilt in the
    backward pass: the larger of one ViT block for 2 views and one LM block, per sample.
    """
    graphdef, trainable, rest = split_model(with_remat(mcfg, remat))

    def towers(batch, t, r):
        return _scalar(_merge(graphdef, t, r).tower_features(batch, train=True,
                                                             rngs=nnx.Rngs(dropout=0)))

    def measure(b):
        r = residual_bytes(towers, batch_spec(b, image_size, max_length), trainable, rest)
        return r["internal"] + r["inputs"]

    saved, constant = _slope(measure(1), measure(2))
    blocks = block_residuals(mcfg, image_size, max_length)
    transient = max(2 * blocks["vit_block_per_image"], blocks["lm_block_per_caption"]) if remat else 0
    return {"saved_per_sample": saved, "constant": constant, "transient_per_sample": transient,
            "per_sample": saved + transient, **blocks}


# ------------------------------------------------------------------ heads

def head_activation_bytes(mcfg, image_size: int, max_length: int) -> dict:
    """Activations of the heads' backward (MaMA.head_embeddings on abstract tower features,
    BatchNorm in training mode): per_sample x b + constant. `inputs_per_sample` is the part
    that is a tower output itself (e.g. patch_1, the local head's first matmul input): the
    cache when k > 1, extra activations when k = 1."""
    graphdef, trainable, rest = split_model(mcfg)

    def heads(feats, t, r):
        return _scalar(_merge(graphdef, t, r).head_embeddings(feats, train=True))

    def measure(b):
        return residual_bytes(heads, feature_spec(mcfg, b, image_size, max_length), trainable,
                              rest, data=("feats",))

    one, two = measure(1), measure(2)
    internal, constant = _slope(one["internal"], two["internal"])
    inputs, _ = _slope(one["inputs"], two["inputs"])
    return {"per_sample": internal, "inputs_per_sample": inputs, "constant": constant}


def local_loss_bytes(mcfg, image_size: int, global_batch: int, per_device: int) -> int:
    """The local loss on one device: the gathered patch embeddings of the whole global batch,
    fp32 (value, normalised, gradient), and three similarity blocks of one caption chunk."""
    _, patches = vit_tokens(mcfg.vit, image_size)
    gathered = 3 * global_batch * patches * mcfg.embed_dim * 4
    per_caption = global_batch * mcfg.max_sentences * patches
    chunk = max(1, min(per_device, losses._CHUNK_ELEMENTS // per_caption))
    return gathered + 3 * chunk * per_caption * 4


# ------------------------------------------------------------------ the step, for XLA

def _heads_loss(graphdef):
    def loss(t, r, feats, sent_mask):
        model = _merge(graphdef, t, r)
        return _scalar(model.head_embeddings(dict(feats, sent_mask=sent_mask), train=True))
    return loss


def heads_grad(mcfg):
    """(g(trainable, rest, feats) -> gradients of the heads' parameters and of the features,
    trainable, rest): part (b) of the step alone, for the XLA check of the heads' figure."""
    graphdef, trainable, rest = split_model(mcfg)
    loss = _heads_loss(graphdef)

    def grad(t, r, feats):
        feats = dict(feats)
        return jax.grad(loss, argnums=(0, 2))(t, r, feats, feats.pop("sent_mask"))

    return grad, trainable, rest


def training_grad(mcfg, micro_batches: int = 1):
    """(g(trainable, rest, batch) -> gradients of what trains, trainable, rest): the training
    step's forward + backward (mama_jax/train/grad_cache.py, one pass or k micro-batches) on an
    abstract model, the loss a sum of every embedding."""
    graphdef, trainable, rest = split_model(mcfg)

    def loss_fn(model, emb):
        return _scalar(emb), {}

    def grad(t, r, batch):
        return grad_cache.loss_and_grads(graphdef, t, r, batch, jax.random.key(0), loss_fn=loss_fn,
                                         micro_batches=micro_batches)[2]

    return grad, trainable, rest
