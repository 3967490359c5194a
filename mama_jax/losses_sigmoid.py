"""SigLIP's pairwise sigmoid image-text loss (Zhai et al. 2023): loss.clip_kind="sigmoid".

    L = -1/|B| Σ_i Σ_j log σ(z_ij (t <x_i, y_j> + b)),  z_ij = +1 if i = j else -1,

x, y the L2-normalised image and text embeddings, t = exp(t') the learnable temperature
(t' = logit_scale), b the learnable bias. Normalisation: the paper's Algorithm 1 sums the
log-likelihood of all |B|² pairs and divides by n = |B| (not |B|²), i.e. the mean over
images of each image's sum over every text; big_vision's trainer does the same
(nll summed over texts, then averaged over images). It is symmetric in images and texts,
so one term replaces CLIP's two directions; LossOptions.directions does not apply to it.

On a mesh (the paper's "chunked" implementation, §3.3) every device keeps its own images
and passes its block of text embeddings around a ring with ppermute: n - 1 hops, each
adding the loss of one [B/n, B/n] block, so no device ever holds the global [B, B] logits.
Only the block a device starts with holds its positives; every later block is all
negatives. The transpose of ppermute is the reverse ppermute, so gradients travel back
along the ring to the device that owns each text.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from mama_jax.losses import _F32, _as_f32, _check_paired, _data_axes, l2_normalize


def _inputs(image_emb, text_emb, where):
    img = _as_f32(image_emb, "image_emb", 2, where)
    txt = _as_f32(text_emb, "text_emb", 2, where)
    _check_paired(img, txt, ("image_emb", "text_emb"), where)
    return img, txt


# Rematerialised in the backward pass: the ring then keeps no [B/n, B/n] logits block per
# hop, only the text blocks it received.
@functools.partial(jax.checkpoint, static_argnums=(4,), prevent_cse=False)
def _block_nll(img, txt, scale, bias, holds_positives):
    """Σ over the pairs of one block of -log σ(z · (scale <img_i, txt_j> + bias)).

    img, txt: L2-normalised fp32 blocks. holds_positives: the block pairs images with their
    own texts (z = +1 on its diagonal); otherwise every pair is a negative (z = -1).
    """
    logits = scale * (img @ txt.T) + bias
    if holds_positives:
        z = 2.0 * jnp.eye(logits.shape[0], logits.shape[1], dtype=_F32) - 1.0
    else:
        z = -1.0
    return -jnp.sum(jax.nn.log_sigmoid(z * logits))


def sigmoid_loss(image_emb, text_emb, logit_scale, logit_bias):
    """The SigLIP loss of a batch on one device (or inside one device's shard_map body)."""
    img, txt = _inputs(image_emb, text_emb, "sigmoid_loss")
    scale = jnp.exp(jnp.asarray(logit_scale, _F32))
    bias = jnp.asarray(logit_bias, _F32)
    return _block_nll(l2_normalize(img), l2_normalize(txt), scale, bias, True) / img.shape[0]


def sharded_sigmoid_loss(mesh: Mesh, data_axes, image_emb, text_emb, logit_scale, logit_bias):
    """`sigmoid_loss` of the global batch split over `data_axes` of `mesh` (None = all axes),
    computed block by block around a ring of the devices; returns the replicated scalar."""
    where = "sharded_sigmoid_loss"
    axes = _data_axes(mesh, data_axes)
    img, txt = _inputs(image_emb, text_emb, where)
    n_devices = math.prod(mesh.shape[a] for a in axes)
    batch = img.shape[0]
    if batch % n_devices:
        raise ValueError(f"{where}: batch {batch} is not divisible by the {n_devices} devices "
                         f"of mesh axes {axes}")
    # Device k sends to k + 1: after h hops a device holds the texts of device k - h.
    ring = [(k, (k + 1) % n_devices) for k in range(n_devices)]

    def per_device(img_block, txt_block, log_scale, bias):
        img_block, txt_block = l2_normalize(img_block), l2_normalize(txt_block)
        scale = jnp.exp(log_scale)
        own = _block_nll(img_block, txt_block, scale, bias, True)

        def hop(carry, _):
            held, total = carry
            held = jax.lax.ppermute(held, axes, ring)
            return (held, total + _block_nll(img_block, held, scale, bias, False)), None

        (_, total), _ = jax.lax.scan(hop, (txt_block, own), length=n_devices - 1)
        return jax.lax.psum(total, axes) / batch

    loss = jax.shard_map(per_device, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()),
                         out_specs=P())
    return loss(img, txt, jnp.asarray(logit_scale, _F32), jnp.asarray(logit_bias, _F32))
