"""MaMA: the vision and text towers, their global / local / SimCLR heads, two temperatures.

Features (spec/reference_behaviour.md §1):
- image global g(x): mean of the ViT's pre-norm states over all tokens -> Linear -> d;
- image local: the post-norm patch tokens -> TokenMLP -> d;
- text global: the hidden state at the last non-padding token (D7) -> Linear -> d;
- text local: hidden states at every SEP token -> TokenMLP (masked BN) -> d (or, by
  option, each sentence's mean input-token embedding: see MaMAConfig.sentence_features);
- SimCLR head on g(x) for the image-image loss (D15).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mama_jax.models import text as text_lib
from mama_jax.models.heads import Scalar, TokenMLP
from mama_jax.models.text import TextConfig, TextDecoder
from mama_jax.models.vit import ViTConfig, VisionTransformer, vit_config_from_dict, vit_config_to_dict

TEXT_POOLS = ("last", "masked_mean", "official")
# "sep": the LM's state at each sentence's SEP (paper). "token_mean": the mean input
# embedding of each sentence's tokens, no context: for from-scratch demo LMs, whose SEP
# states stay too alike for any sentence map to find its finding (configs/demo.py).
SENTENCE_FEATURES = ("sep", "token_mean")
# Vision parameters that never train: the final norm only feeds the local
# branch in the official model and is frozen there; the mask token is unused.
FROZEN_VISION = ("norm", "mask_token")
LOCAL_GROUP = ("img_local", "txt_local", "local_scale")
SIMCLR_GROUP = ("simclr",)  # trained by L_VV only
# The image-text loss the model is trained with (config.loss.clip_kind). "sigmoid" (SigLIP)
# adds a learnable logit bias; "softmax" models keep the tree they always had. The same
# tuple as losses.CLIP_KINDS (models import no loss code; a test holds the two equal).
CLIP_KINDS = ("softmax", "sigmoid")
# SigLIP's initialisation (Zhai et al. 2023, §3.2 and Algorithm 1): t' = log 10, b = -10,
# b = -10 starts every pair near "negative", the prior of a batch with B - 1 negatives per
# positive, so training does not begin with a large correction of that imbalance.
SIGLIP_INIT_LOG_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0


@dataclasses.dataclass(frozen=True)
class MaMAConfig:
    vit: ViTConfig
    text: TextConfig
    sep_id: int
    embed_dim: int = 512
    local_hidden: int = 2048
    simclr_out: int = 512
    text_pool: str = "last"
    max_sentences: int = 16
    sentence_features: str = "sep"
    init_log_scale: float = math.log(1 / 0.07)
    freeze_llm: bool = False  # D5: LoRA frozen too (the official run's effective setting)
    train_text_base: bool = False  # the whole decoder trains (random-init demo only)
    # "sigmoid": logit_scale starts at SigLIP's log 10 (not init_log_scale) and a logit_bias
    # joins it; local_scale keeps init_log_scale.
    clip_kind: str = "softmax"

    def __post_init__(self):
        if self.clip_kind not in CLIP_KINDS:
            raise ValueError(f"MaMAConfig.clip_kind={self.clip_kind!r}; choose from {CLIP_KINDS}")
        if self.text_pool not in TEXT_POOLS:
            raise ValueError(f"MaMAConfig.text_pool={self.text_pool!r}; choose from {TEXT_POOLS}")
        if self.sentence_features not in SENTENCE_FEATURES:
            raise ValueError(f"MaMAConfig.sentence_features={self.sentence_features!r}; "
                             f"choose from {SENTENCE_FEATURES}")


def config_to_dict(cfg: MaMAConfig) -> dict:
    """JSON-safe {vit, text, mama}: how run workdirs and export packages store the architecture."""
    rest = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("vit", "text")}
    return {"vit": vit_config_to_dict(cfg.vit), "text": text_lib.text_config_to_dict(cfg.text),
            "mama": rest}


def config_from_dict(d: dict) -> MaMAConfig:
    """The inverse of config_to_dict; KeyError / TypeError / ValueError name what is wrong."""
    return MaMAConfig(vit=vit_config_from_dict(d["vit"]), text=text_lib.text_config_from_dict(d["text"]),
                      **d["mama"])


class MaMA(nnx.Module):
    def __init__(self, cfg: MaMAConfig, *, rngs: nnx.Rngs, vision: VisionTransformer | None = None,
                 text: TextDecoder | None = None):
        self.cfg = cfg
        dtype = cfg.vit.dtype
        dv, dt, d = cfg.vit.hidden, cfg.text.hidden, cfg.embed_dim
        self.vision = vision if vision is not None else VisionTransformer(cfg.vit, rngs=rngs)
        self.text = text if text is not None else TextDecoder(cfg.text, rngs=rngs)
        self.img_global = nnx.Linear(dv, d, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.txt_global = nnx.Linear(dt, d, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        # No Linear biases in the local heads (the official ones have them): each feeds a
        # BatchNorm, which removes it, so its true gradient is 0 and Adam would turn the
        # rounding noise of that 0 into lr-sized random steps.
        self.img_local = TokenMLP(dv, cfg.local_hidden, d, bias=False, final_affine=False,
                                  dtype=dtype, rngs=rngs)
        self.txt_local = TokenMLP(dt, cfg.local_hidden, d, bias=False, final_affine=False,
                                  dtype=dtype, rngs=rngs)
        self.simclr = TokenMLP(dv, dv, cfg.simclr_out, bias=False, final_affine=True,
                               dtype=dtype, rngs=rngs)
        sigmoid = cfg.clip_kind == "sigmoid"
        log_scale = SIGLIP_INIT_LOG_SCALE if sigmoid else cfg.init_log_scale
        self.logit_scale = Scalar(jnp.asarray(log_scale, jnp.float32))
        if sigmoid:
            self.logit_bias = Scalar(jnp.asarray(SIGLIP_INIT_BIAS, jnp.float32))
        self.local_scale = Scalar(jnp.asarray(cfg.init_log_scale, jnp.float32))

    # ------------------------------------------------------------ images
    def image_features(self, images: jax.Array):
        """(g(x) [B, Dv] fp32, post-norm patch tokens [B, P, Dv])."""
        out = self.vision(images)
        return out.prenorm.astype(jnp.float32).mean(axis=1), out.patch_tokens

    def encode_images(self, images: jax.Array) -> jax.Array:
        """Global image embeddings [B, d] (not normalised), as zero-shot uses them."""
        pooled, _ = self.image_features(images)
        return self.img_global(pooled).astype(jnp.float32)

    # ------------------------------------------------------------ text
    def text_states(self, input_ids, attention_mask, *, train: bool, rngs: nnx.Rngs | None = None):
        return self.text(input_ids, attention_mask, deterministic=not train, rngs=rngs)

    def pool_text(self, hidden, attention_mask) -> jax.Array:
        if self.cfg.text_pool == "last":
            return text_lib.last_token_features(hidden, attention_mask)
        if self.cfg.text_pool == "masked_mean":
            return text_lib.masked_mean(hidden, attention_mask)
        return hidden.astype(jnp.float32).mean(axis=1)  # official: pads included (D7)

    def sentence_inputs(self, hidden, input_ids):
        """What the text local head sees: ([B, S, Dt] per sentence, valid mask [B, S])."""
        if self.cfg.sentence_features == "token_mean":
            return text_lib.sentence_token_means(self.text.embed_tokens(input_ids), input_ids,
                                                 self.cfg.sep_id, self.cfg.max_sentences)
        return text_lib.sentence_features(hidden, input_ids, self.cfg.sep_id, self.cfg.max_sentences)

    def encode_texts(self, input_ids, attention_mask) -> jax.Array:
        """Global text embeddings [B, d] (not normalised)."""
        hidden = self.text_states(input_ids, attention_mask, train=False)
        return self.txt_global(self.pool_text(hidden, attention_mask)).astype(jnp.float32)

    # ------------------------------------------------------------ training forward
    def tower_features(self, batch: dict, *, train: bool = True, rngs: nnx.Rngs | None = None,
                       dropout_keys: jax.Array | None = None) -> dict:
        """What the heads read from the two towers, computed sample by sample.

        No op here mixes samples (the towers have no BatchNorm), so a micro-batch's
        features are the rows of the whole batch's: exact gradient accumulation
        (GradCache, train/grad_cache.py) caches these and runs the heads once on the
        whole batch.
        Keys: pooled_1 / pooled_2 g(x) of each view [B, Dv] fp32, patch_1 the anchor
        view's post-norm patch tokens [B, P, Dv], text_pooled [B, Dt], sent_in the
        text local head's input [B, S, Dt] and sent_mask [B, S] (valid sentences).
        """
        b = batch["view1"].shape[0]
        images = jnp.concatenate([batch["view1"], batch["view2"]], axis=0)
        pooled, patches = self.image_features(images)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        hidden = self.text(ids, mask, deterministic=not train, rngs=rngs, dropout_keys=dropout_keys)
        sent_in, sent_mask = self.sentence_inputs(hidden, ids)
        return {"pooled_1": pooled[:b], "pooled_2": pooled[b:], "patch_1": patches[:b],
                "text_pooled": self.pool_text(hidden, mask), "sent_in": sent_in,
                "sent_mask": sent_mask}

    def head_embeddings(self, feats: dict, *, train: bool = True) -> dict:
        """Embeddings for objective.mama_loss from tower_features of the whole batch (the
        heads' BatchNorm statistics are taken over it)."""
        b = feats["pooled_1"].shape[0]
        pooled = jnp.concatenate([feats["pooled_1"], feats["pooled_2"]], axis=0)
        img_global = self.img_global(pooled)
        simclr = self.simclr(pooled, train=train)
        sent_mask = feats["sent_mask"]
        return {
            "img_global_1": img_global[:b], "img_global_2": img_global[b:],
            "txt_global": self.txt_global(feats["text_pooled"]),
            "simclr_1": simclr[:b], "simclr_2": simclr[b:],
            "patch_1": self.img_local(feats["patch_1"], train=train),
            "sent": self.txt_local(feats["sent_in"], sent_mask, train=train), "sent_mask": sent_mask,
        }

    def __call__(self, batch: dict, *, train: bool = True, rngs: nnx.Rngs | None = None,
                 dropout_keys: jax.Array | None = None) -> dict:
        """Embeddings for objective.mama_loss from a batch {view1, view2, input_ids, attention_mask}.

        Text dropout draws from `rngs`, or from `dropout_keys`, one key per caption."""
        feats = self.tower_features(batch, train=train, rngs=rngs, dropout_keys=dropout_keys)
        return self.head_embeddings(feats, train=train)


def trainable_filter(cfg: MaMAConfig):
    """What the optimiser updates: the ViT (less its final norm and mask token),
    every head, both temperatures, and LoRA (unless freeze_llm); never the LM base."""
    vision_and_heads = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("text")),
                               *[nnx.Not(nnx.All(nnx.PathContains("vision"), nnx.PathContains(n)))
                                 for n in FROZEN_VISION])
    if cfg.train_text_base:
        return nnx.Any(vision_and_heads, nnx.All(nnx.PathContains("text"), nnx.Param))
    if cfg.freeze_llm:
        return vision_and_heads
    return nnx.Any(vision_and_heads, nnx.All(nnx.PathContains("text"), text_lib.trainable_filter(cfg.text)))
