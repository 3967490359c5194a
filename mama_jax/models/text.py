"""GPT-2-family decoder (BioMedLM) as the MaMA text tower, in flax.nnx.

The LM head is dropped: the model returns hidden states after `ln_f`.
Layout follows HF GPT-2 names (wte, wpe, blocks.attn.c_attn, ..., ln_f) so
conversion is a name table; Conv1D kernels are (in, out) like nnx kernels.
Tokens the tokenizer adds (BOS/PAD/SEP/...) live in a separate `added_wte`
parameter (type `AddedTokenEmbedding`) so they can be frozen or trained apart
from the pretrained `wte`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mama_jax.models import config_dict
from mama_jax.models.lora import LoRAConfig, dropout, make_linear, split_key

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh GELU (GPT-2)
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf GELU
}
REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots",
                  "checkpoint_dots_with_no_batch_dims")


class AddedTokenEmbedding(nnx.Param):
    """Embedding rows of tokens added on top of the pretrained vocabulary."""


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int  # rows of the pretrained wte
    n_positions: int
    hidden: int
    layers: int
    heads: int
    inner: int | None = None  # None -> 4 * hidden
    ln_eps: float = 1e-5
    activation: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    embd_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    dtype: Any = "float32"  # compute dtype
    param_dtype: Any = "float32"  # storage dtype of the frozen base
    lora: LoRAConfig | None = None
    scan_layers: bool = False
    remat: bool = False
    remat_policy: str | None = None  # a jax.checkpoint_policies name; None = save nothing
    attention_impl: str | None = None  # jax.nn.dot_product_attention implementation
    num_added_tokens: int = 0
    train_added_embeddings: bool = False
    added_init_std: float = 0.02

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        if self.hidden % self.heads:
            raise ValueError(f"TextConfig.hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"TextConfig.activation={self.activation!r} unsupported; "
                             f"supported: {sorted(ACTIVATIONS)}")
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"TextConfig.remat_policy={self.remat_policy!r}; choose from {REMAT_POLICIES}")
        if self.attention_impl not in (None, "xla", "cudnn"):
            raise ValueError(f"TextConfig.attention_impl={self.attention_impl!r}; use None, 'xla' or 'cudnn'")
        if self.num_added_tokens < 0:
            raise ValueError("TextConfig.num_added_tokens must be >= 0")

    @property
    def inner_dim(self) -> int:
        return self.inner if self.inner is not None else 4 * self.hidden

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def total_vocab(self) -> int:
        return self.vocab_size + self.num_added_tokens

    @property
    def uses_dropout(self) -> bool:
        lora_rate = self.lora.dropout if self.lora is not None else 0.0
        return max(self.embd_dropout, self.attn_dropout, self.resid_dropout, lora_rate) > 0


def text_config(name: str, **overrides) -> TextConfig:
    """Presets: "tiny" (tests, demo; pass vocab_size from the tiny tokenizer) and "biomedlm"."""
    presets = {
        "tiny": dict(vocab_size=512, n_positions=160, hidden=32, layers=2, heads=2,
                     scale_attn_by_inverse_layer_idx=True, embd_dropout=0.1, attn_dropout=0.1,
                     resid_dropout=0.1, lora=LoRAConfig(), num_added_tokens=6),
        # stanford-crfm/BioMedLM + the 6 MaMA special tokens (28,902 rows in all).
        "biomedlm": dict(vocab_size=28896, n_positions=1024, hidden=2560, layers=32, heads=20,
                         scale_attn_by_inverse_layer_idx=True, embd_dropout=0.1, attn_dropout=0.1,
                         resid_dropout=0.1, dtype="bfloat16", param_dtype="bfloat16",
                         lora=LoRAConfig(), num_added_tokens=6, scan_layers=True, remat=True),
    }
    if name not in presets:
        raise ValueError(f"unknown text config preset {name!r}; choose from {sorted(presets)}")
    return TextConfig(**{**presets[name], **overrides})


def text_config_to_dict(cfg: TextConfig) -> dict:
    """JSON-friendly dict (dtypes as names, LoRA as a nested dict)."""
    out = config_dict.to_dict(cfg)
    if cfg.lora is not None:
        out["lora"] = dict(dataclasses.asdict(cfg.lora), targets=list(cfg.lora.targets))
    return out


def text_config_from_dict(d: dict) -> TextConfig:
    d = config_dict.known_fields(TextConfig, d, "text config")
    if d.get("lora") is not None and not isinstance(d["lora"], LoRAConfig):
        lora = dict(d["lora"])
        lora["targets"] = tuple(lora.get("targets", ("c_attn",)))
        d["lora"] = LoRAConfig(**lora)
    return TextConfig(**d)


def trainable_filter(cfg: TextConfig):
    """What trains in the text tower: LoRA factors, plus the added rows if configured."""
    if cfg.train_added_embeddings:
        return nnx.Any(nnx.LoRAParam, AddedTokenEmbedding)
    return nnx.LoRAParam


def _layer_norm(cfg: TextConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance like torch (the fast E[x^2]-E[x]^2 form loses digits); stats in fp32.
    return nnx.LayerNorm(cfg.hidden, epsilon=cfg.ln_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         use_fast_variance=False, rngs=rngs)


def attention_with_dropout(q, k, v, key_mask, scale: float, rate: float, key) -> jax.Array:
    """Explicit causal attention (fp32 logits/softmax) with dropout on the probabilities.

    jax.nn.dot_product_attention has no dropout, so training with attn_pdrop > 0 uses this.
    q, k, v: [B, L, N, H]; key_mask: [B, L] bool.
    """
    L = q.shape[1]
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    causal = jnp.tril(jnp.ones((L, L), bool))
    allowed = causal[None, None] & key_mask[:, None, None, :]
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = dropout(probs, rate, key, deterministic=False)
    return jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)


def _linear(cfg: TextConfig, name: str, d_in: int, d_out: int, rngs: nnx.Rngs, *,
            residual: bool = False):
    """A (LoRA-capable) GPT-2 Linear; residual projections start scaled by 1/sqrt(2 n_layer)."""
    std = 0.02 / np.sqrt(2 * cfg.layers) if residual else 0.02
    return make_linear(name, d_in, d_out, kernel_init=nnx.initializers.normal(std), lora=cfg.lora,
                       dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.c_attn = _linear(cfg, "c_attn", cfg.hidden, 3 * cfg.hidden, rngs)
        self.c_proj = _linear(cfg, "attn_c_proj", cfg.hidden, cfg.hidden, rngs, residual=True)

    def __call__(self, x, key_mask, layer_scale, *, deterministic: bool, key=None):
        cfg = self.cfg
        keys = split_key(key, 4) if key is not None else [None] * 4
        B, L, _ = x.shape
        qkv = self.c_attn(x, deterministic=deterministic, key=keys[0])
        q, k, v = (t.reshape(B, L, cfg.heads, cfg.head_dim) for t in jnp.split(qkv, 3, axis=-1))
        # The per-layer 1/(layer_idx+1) factor goes on q, so `scale` stays a static
        # float (the cuDNN kernel needs that) while layer_idx is a scanned input.
        q = q * layer_scale.astype(q.dtype)
        scale = cfg.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
        if deterministic or cfg.attn_dropout == 0.0:
            out = jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :], scale=scale,
                                               is_causal=True, implementation=cfg.attention_impl)
        else:
            out = attention_with_dropout(q, k, v, key_mask, scale, cfg.attn_dropout, keys[1])
        out = self.c_proj(out.reshape(B, L, cfg.hidden), deterministic=deterministic, key=keys[2])
        return dropout(out, cfg.resid_dropout, keys[3], deterministic)


class MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.c_fc = _linear(cfg, "c_fc", cfg.hidden, cfg.inner_dim, rngs)
        self.c_proj = _linear(cfg, "mlp_c_proj", cfg.inner_dim, cfg.hidden, rngs, residual=True)

    def __call__(self, x, *, deterministic: bool, key=None):
        keys = split_key(key, 3) if key is not None else [None] * 3
        h = ACTIVATIONS[self.cfg.activation](self.c_fc(x, deterministic=deterministic, key=keys[0]))
        h = self.c_proj(h, deterministic=deterministic, key=keys[1])
        return dropout(h, self.cfg.resid_dropout, keys[2], deterministic)


class Block(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.ln_2 = _layer_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, key_mask, layer_scale, *, deterministic: bool, key=None):
        keys = split_key(key, 2) if key is not None else [None, None]
        x = x + self.attn(self.ln_1(x), key_mask, layer_scale, deterministic=deterministic, key=keys[0])
        return x + self.mlp(self.ln_2(x), deterministic=deterministic, key=keys[1])


def _remat_policy(name: str | None):
    return None if name is None else getattr(jax.checkpoint_policies, name)


class TextDecoder(nnx.Module):
    """`model(input_ids, attention_mask)` -> hidden states [B, L, D] after ln_f.

    Right padding: a causal mask plus a key mask keep pad tokens from touching
    real ones; positions are arange(L) as in GPT-2.
    """

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte = nnx.Embed(cfg.vocab_size, cfg.hidden, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.wpe = nnx.Embed(cfg.n_positions, cfg.hidden, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             embedding_init=nnx.initializers.normal(0.01), rngs=rngs)
        if cfg.num_added_tokens:
            # fp32: small, and trainable when train_added_embeddings is set.
            self.added_wte = AddedTokenEmbedding(
                cfg.added_init_std * jax.random.normal(rngs.params(), (cfg.num_added_tokens, cfg.hidden)))
        else:
            self.added_wte = None
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_blocks(r):
                return Block(cfg, rngs=r)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.layers)])
        self.ln_f = _layer_norm(cfg, rngs)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.cfg
        # Two gathers + select instead of concatenating [wte; added_wte]: avoids
        # copying the whole (bf16, 28,896-row) table every step.
        x = jnp.take(self.wte.embedding[...], jnp.clip(input_ids, 0, cfg.vocab_size - 1), axis=0)
        x = x.astype(cfg.dtype)
        if self.added_wte is not None:
            added_idx = jnp.clip(input_ids - cfg.vocab_size, 0, cfg.num_added_tokens - 1)
            added = jnp.take(self.added_wte[...], added_idx, axis=0).astype(cfg.dtype)
            x = jnp.where((input_ids >= cfg.vocab_size)[..., None], added, x)
        return x

    def __call__(self, input_ids, attention_mask=None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None, dropout_keys: jax.Array | None = None) -> jax.Array:
        """dropout_keys: one key per row ([B]) instead of rngs: each caption's dropout masks
        then depend on its own key only, whatever batch it comes in."""
        cfg = self.cfg
        B, L = input_ids.shape
        if L > cfg.n_positions:
            raise ValueError(f"input_ids length {L} exceeds n_positions={cfg.n_positions}")
        if attention_mask is None:
            attention_mask = jnp.ones((B, L), jnp.int32)
        key_mask = attention_mask.astype(bool)

        need_keys = not deterministic and cfg.uses_dropout
        if need_keys and rngs is None and dropout_keys is None:
            raise ValueError("TextDecoder: deterministic=False with dropout needs "
                             "rngs=nnx.Rngs(dropout=...) or per-row dropout_keys")
        if need_keys:
            embd_key, layers_key = split_key(rngs.dropout() if dropout_keys is None else dropout_keys, 2)
            layer_keys = split_key(layers_key, cfg.layers)
        else:
            embd_key, layer_keys = None, None

        x = self.embed_tokens(input_ids) + self.wpe.embedding[...][:L].astype(cfg.dtype)[None]
        x = dropout(x, cfg.embd_dropout, embd_key, deterministic)

        idx = jnp.arange(cfg.layers, dtype=jnp.float32)
        layer_scales = 1.0 / (idx + 1.0) if cfg.scale_attn_by_inverse_layer_idx else jnp.ones_like(idx)

        def body(block, h, scale, key):
            return block(h, key_mask, scale, deterministic=deterministic, key=key)

        if cfg.remat:
            body = nnx.remat(body, policy=_remat_policy(cfg.remat_policy), prevent_cse=not cfg.scan_layers)

        if cfg.scan_layers:
            # Stacked blocks, per-layer scale and dropout key are scanned over; h is the carry.
            scan_fn = nnx.scan(body, in_axes=(0, nnx.Carry, 0, 0 if need_keys else None),
                               out_axes=nnx.Carry)
            x = scan_fn(self.blocks, x, layer_scales, layer_keys)
        else:
            for i, block in enumerate(self.blocks):
                x = body(block, x, layer_scales[i], None if layer_keys is None else layer_keys[i])
        return self.ln_f(x)


# ---------------------------------------------------------------- pooling helpers

def last_token_features(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Hidden state at the last non-padding position (EOS under right padding): [B, D].

    A row with no real token falls back to position 0.
    """
    last = jnp.maximum(jnp.sum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def sentence_features(hidden: jax.Array, input_ids: jax.Array, sep_id: int,
                      max_sentences: int) -> tuple[jax.Array, jax.Array]:
    """Hidden states at every SEP token, in order: ([B, S, D], valid mask [B, S]).

    Slots past a caption's SEP count are zeros and masked; SEPs beyond
    `max_sentences` are dropped.
    """
    L = hidden.shape[1]
    is_sep = input_ids == sep_id
    # Stable sort puts SEP positions first, in their original order.
    order = jnp.argsort(~is_sep, axis=1, stable=True)
    if max_sentences > L:
        order = jnp.pad(order, ((0, 0), (0, max_sentences - L)))
    pos = order[:, :max_sentences]
    valid = _valid_sentences(is_sep, max_sentences)
    feats = jnp.take_along_axis(hidden, pos[:, :, None], axis=1)
    feats = jnp.where(valid[:, :, None], feats, jnp.zeros((), hidden.dtype))
    return feats, valid


def sentence_token_means(token_embeds: jax.Array, input_ids: jax.Array, sep_id: int,
                         max_sentences: int) -> tuple[jax.Array, jax.Array]:
    """Per sentence, the mean of its tokens' input embeddings: ([B, S, D], valid [B, S]).

    A sentence is its SEP and the tokens since the previous SEP (BOS included for the
    first). No context enters, unlike the SEP states of `sentence_features`. Slots and
    the valid mask are those of `sentence_features`; tokens after the last SEP (EOS,
    padding) belong to no valid slot.
    """
    is_sep = input_ids == sep_id
    sentence = jnp.cumsum(is_sep, axis=1) - is_sep          # SEPs before each token
    member = jax.nn.one_hot(sentence, max_sentences, dtype=jnp.float32)  # [B, L, S]
    sums = jnp.einsum("bls,bld->bsd", member, token_embeds.astype(jnp.float32))
    means = sums / jnp.maximum(member.sum(axis=1), 1.0)[:, :, None]
    valid = _valid_sentences(is_sep, max_sentences)
    feats = jnp.where(valid[:, :, None], means, 0.0).astype(token_embeds.dtype)
    return feats, valid


def _valid_sentences(is_sep: jax.Array, max_sentences: int) -> jax.Array:
    """[B, S]: slot s holds a sentence (the caption has more than s SEPs)."""
    count = jnp.sum(is_sep, axis=1)
    return jnp.arange(max_sentences)[None, :] < count[:, None]


def masked_mean(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean over non-padding positions (fp32 accumulation): [B, D]."""
    m = attention_mask.astype(jnp.float32)[:, :, None]
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
    return (total / jnp.maximum(jnp.sum(m, axis=1), 1.0)).astype(hidden.dtype)
