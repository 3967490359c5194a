"""MaMA's loss terms (paper eq. 1-3) as pure functions of embeddings; objective.py
combines them into eq. 4.

No model code lives here: every function takes embeddings (any float dtype),
casts them to fp32 and reduces in fp32. Conventions (spec/reference_behaviour.md):

- CE(S): mean cross-entropy of the rows of S with the diagonal as targets.
- ``directions``: "mean" = ½[CE(S) + CE(Sᵀ)] (paper, default), "sum" = CE(S) +
  CE(Sᵀ) (official code, departure D2), "i2t" = CE(S) only (CLIP losses only).
- Negatives are the whole (global) batch (D3). Under ``jax.jit`` the plain jnp
  CLIP / NT-Xent losses on a batch sharded over devices already see the global
  batch (XLA inserts the collectives). The local-alignment similarity, whose cost
  grows with batch² × sentences × patches, has an explicit ``shard_map`` version
  that gathers the patch embeddings and keeps each device's block of captions.
- The local loss uses the anchor view v only: §3.3 builds it from the pair
  (x_i, y_i), and the caption describes the anchor image.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

_F32 = jnp.float32
# Below any cosine similarity (which lies in [-1, 1]); finite so that max/where
# never produce NaN gradients, unlike -inf.
_MASKED_SIM = -1e4
# Self-similarity logit in NT-Xent; exp() of it underflows to exactly 0.
_MASKED_LOGIT = -1e9
# Default caption chunk: keep one chunk's [chunk, Bi, S, P] similarity block at
# about 2**25 fp32 elements (128 MiB).
_CHUNK_ELEMENTS = 1 << 25

CLIP_DIRECTIONS = ("mean", "sum", "i2t")
# The image-text terms of eq. 4: CLIP's softmax (eq. 2) or SigLIP's pairwise sigmoid
# (losses_sigmoid.py), which needs no global softmax, for small per-device batches.
CLIP_KINDS = ("softmax", "sigmoid")
LOCAL_DIRECTIONS = ("mean", "sum")
# Which half of eq. 3 trains: both (the paper), or only the visual-localisation (c_v) or
# text-localisation (c_t) half, for the ablation in experiments/sla_localisation.py.
LOCAL_HALVES = ("both", "visual", "text")


def l2_normalize(x, axis=-1, eps=1e-6):
    """x / max(||x||, eps) (torch F.normalize), norm computed in fp32, dtype kept.

    rsqrt(max(Σx², eps²)) has a finite gradient at x = 0, unlike x/||x||.
    """
    x = jnp.asarray(x)
    x32 = x.astype(_F32)
    sum_sq = jnp.sum(jnp.square(x32), axis=axis, keepdims=True)
    return (x32 * jax.lax.rsqrt(jnp.maximum(sum_sq, eps * eps))).astype(x.dtype)


def _ce_rows(logits):
    """CE(S): each row's target is its diagonal entry."""
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))


def _ce_cols(logits):
    """CE(Sᵀ) without materialising the transpose."""
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))


def _paired_ce(logits, directions):
    if directions == "i2t":
        return _ce_rows(logits)
    both = _ce_rows(logits) + _ce_cols(logits)
    return 0.5 * both if directions == "mean" else both


def _check_directions(directions, allowed, where):
    if directions not in allowed:
        raise ValueError(f"{where}: directions must be one of {allowed}, got {directions!r}")


def _as_f32(x, name, ndim, where):
    x = jnp.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{where}: {name} must have {ndim} dims, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{where}: {name} must be floating point, got {x.dtype}")
    return x.astype(_F32)


def _check_paired(a, b, names, where):
    if a.shape != b.shape:
        raise ValueError(f"{where}: {names[0]} {a.shape} and {names[1]} {b.shape} must have "
                         "the same shape (row i of one is the positive of row i of the other)")
    if a.shape[0] < 1:
        raise ValueError(f"{where}: empty batch ({names[0]} has shape {a.shape})")


def clip_loss(image_emb, text_emb, logit_scale, *, directions="mean"):
    """Eq. 2: S = exp(logit_scale) · norm(img) @ norm(txt)ᵀ, positives on the diagonal."""
    _check_directions(directions, CLIP_DIRECTIONS, "clip_loss")
    img = _as_f32(image_emb, "image_emb", 2, "clip_loss")
    txt = _as_f32(text_emb, "text_emb", 2, "clip_loss")
    _check_paired(img, txt, ("image_emb", "text_emb"), "clip_loss")
    scale = jnp.exp(jnp.asarray(logit_scale, _F32))
    logits = scale * (l2_normalize(img) @ l2_normalize(txt).T)
    return _paired_ce(logits, directions)


def nt_xent_loss(z1, z2, temperature=0.5):
    """Eq. 1 read as SimCLR NT-Xent (D15).

    The 2B embeddings [z1; z2] are all anchors; anchor i's positive is its other
    view (i ± B), the other 2B-2 are negatives; logits are cosine / temperature.
    """
    a = _as_f32(z1, "z1", 2, "nt_xent_loss")
    b = _as_f32(z2, "z2", 2, "nt_xent_loss")
    _check_paired(a, b, ("z1", "z2"), "nt_xent_loss")
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"nt_xent_loss: temperature must be > 0, got {temperature}")
    batch = a.shape[0]
    z = l2_normalize(jnp.concatenate([a, b], axis=0))
    logits = (z @ z.T) / temperature
    logits = jnp.where(jnp.eye(2 * batch, dtype=bool), _MASKED_LOGIT, logits)
    positives = (jnp.arange(2 * batch) + batch) % (2 * batch)
    log_prob = jax.nn.log_softmax(logits, axis=1)
    return -jnp.mean(jnp.take_along_axis(log_prob, positives[:, None], axis=1))


# ----------------------------------------------------------------- local alignment


def _check_local_inputs(sent_emb, sent_mask, patch_emb, where):
    sent = _as_f32(sent_emb, "sent_emb [Bt,S,d]", 3, where)
    patch = _as_f32(patch_emb, "patch_emb [Bi,P,d]", 3, where)
    mask = jnp.asarray(sent_mask)
    if mask.shape != sent.shape[:2]:
        raise ValueError(f"{where}: sent_mask {mask.shape} must be [Bt, S] = {sent.shape[:2]} "
                         "(sent_emb's first two dims)")
    if sent.shape[-1] != patch.shape[-1]:
        raise ValueError(f"{where}: sent_emb dim {sent.shape[-1]} != patch_emb dim "
                         f"{patch.shape[-1]}")
    if min(sent.shape[:2] + patch.shape[:2]) < 1:
        raise ValueError(f"{where}: empty sent_emb {sent.shape} or patch_emb {patch.shape}")
    return sent, mask.astype(bool), patch


def _chunk_size(caption_chunk, n_captions, n_images, n_sent, n_patch, where):
    if caption_chunk is None:
        per_caption = max(1, n_images * n_sent * n_patch)
        return max(1, min(n_captions, _CHUNK_ELEMENTS // per_caption))
    if int(caption_chunk) != caption_chunk or caption_chunk < 1:
        raise ValueError(f"{where}: caption_chunk must be a positive int or None, "
                         f"got {caption_chunk!r}")
    return min(int(caption_chunk), n_captions)


def _local_scores(sent, mask, patch, chunk):
    """(c_v, c_t) [Bt, Bi] from L2-normalised fp32 inputs, `chunk` captions at a time.

    Only one [chunk, Bi, S, P] similarity block exists at a time; the chunk body is
    rematerialised so the backward pass does not keep every chunk's block either.
    """
    n_captions, n_sent, dim = sent.shape
    n_images = patch.shape[0]
    n_chunks = -(-n_captions // chunk)
    pad = n_chunks * chunk - n_captions
    if pad:
        # Filler captions have no valid sentence; their rows are dropped below.
        sent = jnp.pad(sent, ((0, pad), (0, 0), (0, 0)))
        mask = jnp.pad(mask, ((0, pad), (0, 0)))
    sent = sent.reshape(n_chunks, chunk, n_sent, dim)
    mask = mask.reshape(n_chunks, chunk, n_sent)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one_chunk(args):
        t, m = args                                              # [c,S,d], [c,S]
        sim = jnp.einsum("csd,npd->cnsp", t, patch)              # [c,Bi,S,P]
        n_valid = jnp.sum(m, axis=-1).astype(_F32)               # [c]
        # Visual localisation: best patch for each sentence, mean over valid sentences.
        best_patch = jnp.max(sim, axis=-1)                       # [c,Bi,S]
        c_v = jnp.sum(jnp.where(m[:, None, :], best_patch, 0.0), axis=-1)
        c_v = c_v / jnp.maximum(n_valid, 1.0)[:, None]
        # Text localisation: best valid sentence for each patch, mean over all patches.
        best_sent = jnp.max(jnp.where(m[:, None, :, None], sim, _MASKED_SIM), axis=2)
        c_t = jnp.mean(best_sent, axis=-1)                       # [c,Bi]
        # A caption with no valid sentence scores 0 rather than the fill value.
        c_t = jnp.where((n_valid > 0)[:, None], c_t, 0.0)
        return c_v, c_t

    c_v, c_t = jax.lax.map(one_chunk, (sent, mask))
    c_v = c_v.reshape(n_chunks * chunk, n_images)[:n_captions]
    c_t = c_t.reshape(n_chunks * chunk, n_images)[:n_captions]
    return c_v, c_t


def local_similarity(sent_emb, sent_mask, patch_emb, *, caption_chunk=None):
    """Aggregated SLA scores (§3.3) between every caption j and image n.

    C[j,n,s,p] = <T_j[s], P_n[p]> on L2-normalised embeddings.
    c_v[j,n] = mean over valid sentences s of max_p C; c_t[j,n] = mean over all
    patches p of max over valid s of C. Padded sentences (sent_mask False) never
    count. Returns (c_v, c_t), each [Bt, Bi] fp32.
    """
    where = "local_similarity"
    sent, mask, patch = _check_local_inputs(sent_emb, sent_mask, patch_emb, where)
    chunk = _chunk_size(caption_chunk, sent.shape[0], patch.shape[0], sent.shape[1],
                        patch.shape[1], where)
    return _local_scores(l2_normalize(sent), mask, l2_normalize(patch), chunk)


def _data_axes(mesh, data_axes):
    if data_axes is None:
        axes = tuple(mesh.axis_names)
    elif isinstance(data_axes, str):
        axes = (data_axes,)
    else:
        axes = tuple(data_axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if not axes or unknown:
        raise ValueError(f"data_axes {data_axes!r} must name axes of the mesh "
                         f"{tuple(mesh.axis_names)}")
    return axes


def sharded_local_similarity(mesh: Mesh, data_axes, sent_emb, sent_mask, patch_emb, *,
                             caption_chunk=None):
    """`local_similarity` with the batch split over `data_axes` of `mesh`.

    Each device all-gathers the patch embeddings (the global image batch), scores
    its own captions against every image in caption chunks, and keeps its row block:
    the outputs are the global [Bt, Bi] matrices sharded as P(data_axes, None).
    `data_axes=None` splits over every mesh axis.
    """
    where = "sharded_local_similarity"
    axes = _data_axes(mesh, data_axes)
    sent, mask, patch = _check_local_inputs(sent_emb, sent_mask, patch_emb, where)
    n_shards = math.prod(mesh.shape[a] for a in axes)
    for name, size in (("sent_emb", sent.shape[0]), ("patch_emb", patch.shape[0])):
        if size % n_shards:
            raise ValueError(f"{where}: {name} batch {size} is not divisible by the "
                             f"{n_shards} devices of mesh axes {axes}")
    chunk = _chunk_size(caption_chunk, sent.shape[0] // n_shards, patch.shape[0],
                        sent.shape[1], patch.shape[1], where)

    def per_device(t, m, p):
        # all_gather's transpose is a reduce-scatter, so patch gradients come back
        # to their owners summed over every device's captions.
        p_all = jax.lax.all_gather(p, axes, axis=0, tiled=True)
        return _local_scores(l2_normalize(t), m, l2_normalize(p_all), chunk)

    batch = P(axes)
    scores = jax.shard_map(per_device, mesh=mesh, in_specs=(batch, batch, batch),
                           out_specs=(P(axes, None), P(axes, None)))
    return scores(sent, mask, patch)


def local_loss(sent_emb, sent_mask, patch_emb, local_scale, *, directions="mean",
               caption_chunk=None, mesh=None, data_axes=None, half="both"):
    """Eq. 3: M = exp(local_scale)·c for c in (c_v, c_t), rows captions, columns images.

    "mean": L_local = ½(L^V + L^T) with L^X = ½[CE(M^X) + CE(M^Xᵀ)] (paper);
    "sum": the four CE terms summed (official, D2). With a mesh the similarity is
    computed by `sharded_local_similarity`; negatives are the global batch either way.
    half="visual" / "text" keeps only L^V / L^T (an ablation; "both" is eq. 3).
    """
    _check_directions(directions, LOCAL_DIRECTIONS, "local_loss")
    if half not in LOCAL_HALVES:
        raise ValueError(f"local_loss: half must be one of {LOCAL_HALVES}, got {half!r}")
    if mesh is None:
        c_v, c_t = local_similarity(sent_emb, sent_mask, patch_emb, caption_chunk=caption_chunk)
    else:
        c_v, c_t = sharded_local_similarity(mesh, data_axes, sent_emb, sent_mask, patch_emb,
                                            caption_chunk=caption_chunk)
    if c_v.shape[0] != c_v.shape[1]:
        raise ValueError(f"local_loss: caption j must pair with image j, but sent_emb has "
                         f"{c_v.shape[0]} captions and patch_emb {c_v.shape[1]} images")
    scale = jnp.exp(jnp.asarray(local_scale, _F32))
    loss_v = _paired_ce(scale * c_v, directions)
    loss_t = _paired_ce(scale * c_t, directions)
    if half != "both":
        return loss_v if half == "visual" else loss_t
    total = loss_v + loss_t
    return 0.5 * total if directions == "mean" else total
