"""The MaMA objective (paper eq. 4) from the loss terms of losses.py and losses_sigmoid.py:
the switches of Table 4 and the official code's departures (LossOptions), the local
weight w and per-device negatives."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from mama_jax import losses_sigmoid
from mama_jax.losses import (_F32, CLIP_DIRECTIONS, CLIP_KINDS, LOCAL_DIRECTIONS, LOCAL_HALVES,
                             _check_directions, _data_axes, clip_loss, local_loss, nt_xent_loss)


def per_device_mean(fn, mesh: Mesh, data_axes, *arrays):
    """mean over devices of fn(each device's batch slice of `arrays`) -> scalar.

    The official code's per-GPU negatives (D3): every loss sees only its own slice.
    """
    axes = _data_axes(mesh, data_axes)

    def local(*xs):
        return jax.lax.pmean(fn(*xs), axes)

    return jax.shard_map(local, mesh=mesh, in_specs=tuple(P(axes) for _ in arrays),
                         out_specs=P())(*arrays)


def local_weight(step, delta):
    """w of eq. 4: 0.0 for step < delta, else 1.0 (hard switch; jittable in step)."""
    return jnp.where(jnp.asarray(step) >= delta, 1.0, 0.0).astype(_F32)


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Switches of the eq. 4 objective. Defaults are the paper's (spec §0)."""

    use_vv: bool = True                 # L_VV (Table 4 "w/o L_VV" = False)
    use_second_view_clip: bool = True   # L_VT(ṽ,t) (Table 4 "w/o symmetric L_VT" = False)
    use_local: bool = True              # w·L_local (Table 4 "w/o SLA" = False)
    # Official D1: L_VV and L_VT(ṽ,t) also start at this step (8000); None = step 0.
    aux_start_step: int | None = None
    directions: str = "mean"            # "mean" paper, "sum" official (D2)
    clip_directions: str | None = None  # override for the CLIP terms, e.g. "i2t"
    caption_chunk: int | None = None    # captions per local-similarity chunk
    max_log_scale: float | None = None  # optional clamp of both scales (e.g. ln 100)
    # D3: "per_device" = the official run's CLIP and local negatives from each
    # device's own batch slice (NT-Xent stays global, as there); needs a mesh.
    negatives: str = "global"
    # "sigmoid": SigLIP replaces both CLIP terms (with the model's logit_bias); it is
    # symmetric, so directions / clip_directions do not apply to it.
    clip_kind: str = "softmax"
    local_half: str = "both"            # "visual" / "text": one half of eq. 3 (ablation)

    def __post_init__(self):
        if self.local_half not in LOCAL_HALVES:
            raise ValueError(f"LossOptions.local_half {self.local_half!r} not in {LOCAL_HALVES}")
        if self.clip_kind not in CLIP_KINDS:
            raise ValueError(f"LossOptions.clip_kind must be one of {CLIP_KINDS}, "
                             f"got {self.clip_kind!r}")
        if self.clip_kind == "sigmoid" and self.clip_directions is not None:
            raise ValueError("LossOptions.clip_directions sets the softmax CLIP terms' "
                             "directions; the sigmoid loss has none (leave it unset)")
        _check_directions(self.directions, LOCAL_DIRECTIONS, "LossOptions.directions")
        if self.clip_directions is not None:
            _check_directions(self.clip_directions, CLIP_DIRECTIONS,
                              "LossOptions.clip_directions")
        if self.negatives not in ("global", "per_device"):
            raise ValueError(f"LossOptions.negatives must be 'global' or 'per_device', "
                             f"got {self.negatives!r}")
        if self.aux_start_step is not None and self.aux_start_step < 0:
            raise ValueError(f"LossOptions.aux_start_step must be >= 0, "
                             f"got {self.aux_start_step}")


_NEEDS = {
    "always": ("img_global_1", "txt_global"),
    "use_second_view_clip": ("img_global_2",),
    "use_vv": ("simclr_1", "simclr_2"),
    "use_local": ("patch_1", "sent", "sent_mask"),
}


def _require(emb: Mapping[str, Any], options: LossOptions):
    for switch, keys in _NEEDS.items():
        if switch != "always" and not getattr(options, switch):
            continue
        for key in keys:
            if key not in emb:
                raise KeyError(f"mama_loss: emb is missing {key!r} (needed by {switch}); "
                               f"has {sorted(emb)}")


def mama_loss(emb: Mapping[str, Any], *, step, delta, logit_scale, local_scale,
              logit_bias=None, nt_xent_temperature=0.5, options: LossOptions = LossOptions(),
              mesh: Mesh | None = None, data_axes: str | Sequence[str] | None = None):
    """Eq. 4: L = L_VV(v,ṽ) + L_VT(v,t) + L_VT(ṽ,t) + w·L_local.

    `emb` keys: img_global_1/2 [B,d], txt_global [B,d], simclr_1/2 [B,d'],
    patch_1 [B,P,d] (anchor view), sent [B,S,d], sent_mask [B,S]. Returns
    (total, parts) with the unweighted terms vv, vt_1, vt_2, local (0 when switched
    off), the weights w (local) and w_aux (L_VV and L_VT(ṽ,t)), and total.
    With options.clip_kind="sigmoid" both L_VT terms are SigLIP's loss with temperature
    logit_scale and bias `logit_bias` (required then).
    """
    _require(emb, options)
    if options.clip_kind == "sigmoid" and logit_bias is None:
        raise ValueError("mama_loss: clip_kind='sigmoid' needs logit_bias (the model's "
                         "SigLIP bias)")
    zero = jnp.zeros((), _F32)
    logit_scale = jnp.asarray(logit_scale, _F32)
    local_scale = jnp.asarray(local_scale, _F32)
    if options.max_log_scale is not None:
        logit_scale = jnp.minimum(logit_scale, options.max_log_scale)
        local_scale = jnp.minimum(local_scale, options.max_log_scale)
    clip_dirs = options.clip_directions or options.directions
    w = local_weight(step, delta)
    w_aux = (local_weight(step, options.aux_start_step)
             if options.aux_start_step is not None else jnp.ones((), _F32))

    per_device = options.negatives == "per_device" and mesh is not None

    def image_text(images, texts, ring):
        if options.clip_kind == "softmax":
            # On a mesh plain jnp already sees the global batch (XLA adds the collectives).
            return clip_loss(images, texts, logit_scale, directions=clip_dirs)
        if ring:
            return losses_sigmoid.sharded_sigmoid_loss(mesh, data_axes, images, texts,
                                                       logit_scale, logit_bias)
        return losses_sigmoid.sigmoid_loss(images, texts, logit_scale, logit_bias)

    def clip(images):
        if per_device:
            return per_device_mean(lambda i, t: image_text(i, t, ring=False), mesh, data_axes,
                                   images, emb["txt_global"])
        return image_text(images, emb["txt_global"], ring=mesh is not None)

    def local_term():
        args = (emb["sent"], emb["sent_mask"], emb["patch_1"])
        kwargs = dict(directions=options.directions, caption_chunk=options.caption_chunk,
                      half=options.local_half)
        if per_device:
            return per_device_mean(lambda s, m, p: local_loss(s, m, p, local_scale, **kwargs),
                                   mesh, data_axes, *args)
        return local_loss(*args, local_scale, mesh=mesh, data_axes=data_axes, **kwargs)

    vt_1 = clip(emb["img_global_1"])
    vt_2 = clip(emb["img_global_2"]) if options.use_second_view_clip else zero
    vv = (nt_xent_loss(emb["simclr_1"], emb["simclr_2"], nt_xent_temperature)
          if options.use_vv else zero)
    local = local_term() if options.use_local else zero
    total = vt_1 + w_aux * (vv + vt_2) + w * local
    parts = {"vv": vv, "vt_1": vt_1, "vt_2": vt_2, "local": local, "w": w, "w_aux": w_aux,
             "total": total}
    return total, parts
