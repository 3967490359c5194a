"""Config -> objects: the tokenizer, the MaMA model, the data and loss settings.

Every path a run needs is a config field; a missing one stops with a message
that says which field and how to set it.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from mama_jax import losses, objective
from mama_jax.input import captions, pipeline, tokenizer as tok_lib
from mama_jax.models import convert, mama, text, vit
from mama_jax.models.lora import LoRAConfig
from mama_jax.train import sharding


class ConfigError(ValueError):
    """A config field is missing or inconsistent; the message names it."""


def require_path(value: str, field: str, how: str) -> str:
    if not value:
        raise ConfigError(f"config.{field} is not set: {how}")
    if not os.path.exists(value):
        raise ConfigError(f"config.{field}={value!r} does not exist: {how}")
    return value


def data_config(cfg, *, seed: int | None = None) -> pipeline.DataConfig:
    d = cfg.data
    require_path(d.dataset_dir, "data.dataset_dir",
                 "build a dataset with `python -m data_prep build ... --out OUT` and pass "
                 "--config.data.dataset_dir=OUT/tfds/mammography/<dataset>/1.0.0")
    return pipeline.DataConfig(
        dataset_dir=d.dataset_dir, image_size=d.image_size, global_batch_size=d.global_batch_size,
        max_length=d.max_length, second_view=d.second_view, p_self=d.p_self,
        caption_style=d.caption_style, mask_prob=d.mask_prob,
        seed=cfg.seed if seed is None else seed, num_threads=d.num_threads, prefetch=d.prefetch,
        crop_scale=tuple(d.crop_scale), hflip=d.hflip, vflip=d.vflip, jitter_prob=d.jitter_prob,
        brightness=d.brightness, contrast=d.contrast, blur_prob=d.blur_prob,
        transfer=d.get("transfer", "grey"))  # configs saved before the option: grey


def clip_kind(cfg) -> str:
    """config.loss.clip_kind, checked: it sets both the loss and the model's parameters."""
    kind = cfg.loss.get("clip_kind", "softmax")  # configs saved before the option: softmax
    if kind not in losses.CLIP_KINDS:
        raise ConfigError(f"config.loss.clip_kind={kind!r} is not one of {losses.CLIP_KINDS} "
                          "(softmax = CLIP's eq. 2 terms, sigmoid = SigLIP)")
    if kind == "sigmoid" and cfg.loss.clip_directions:
        raise ConfigError(f"config.loss.clip_directions={cfg.loss.clip_directions!r} applies to "
                          "the softmax CLIP terms only; leave it empty with "
                          "config.loss.clip_kind='sigmoid'")
    return kind


def loss_options(cfg) -> objective.LossOptions:
    l = cfg.loss
    return objective.LossOptions(
        use_vv=l.use_vv, use_second_view_clip=l.use_second_view_clip, use_local=l.use_local,
        aux_start_step=l.aux_start_step if l.aux_start_step >= 0 else None,
        directions=l.directions, clip_directions=l.clip_directions or None,
        caption_chunk=l.caption_chunk or None, max_log_scale=l.max_log_scale or None,
        negatives=l.negatives, clip_kind=clip_kind(cfg),
        local_half=l.get("local_half", "both"))  # configs saved before the option: both


def tokenizer(cfg, workdir: str) -> tok_lib.TextTokenizer:
    """The configured tokenizer; with none configured and random_init, a tiny BPE
    trained on the training split's captions (kept in WORKDIR/tokenizer)."""
    if cfg.model.tokenizer:
        return tok_lib.load_tokenizer(cfg.model.tokenizer)
    if not cfg.model.random_init:
        raise ConfigError("config.model.tokenizer is not set: pass a local tokenizer folder "
                          "(e.g. the BioMedLM folder) or a hub id")
    folder = os.path.join(workdir, "tokenizer")
    if jax.process_index() == 0 and not os.path.exists(os.path.join(folder, "tokenizer_config.json")):
        source = pipeline.open_split(data_config(cfg).dataset_dir, "train")
        texts = [captions.build_caption(source[i], style="structured_nomask")
                 for i in range(len(source))]
        texts += [p for task in ("birads", "density") for p in captions.zero_shot_prompts(task, prefix="none")]
        tok_lib.build_tiny_tokenizer(folder, texts, vocab_size=1000)
    sharding.barrier("tokenizer")  # the other processes read what process 0 wrote
    return tok_lib.load_tokenizer(folder)


def _lora(cfg) -> LoRAConfig:
    m = cfg.model
    return LoRAConfig(rank=m.lora_rank, alpha=m.lora_alpha, dropout=m.lora_dropout,
                      targets=tuple(m.lora_targets))


def vision_tower(cfg, dtype=None, *, shapes_only: bool = False) -> vit.VisionTransformer:
    """The configured ViT: the source weights when model.vit_weights is set, else an
    abstract (shape-only) tower that a checkpoint restore or `model` fills.

    shapes_only: abstract in every case; the architecture still comes from
    model.vit_weights when set (its config, not its weights, is read).
    """
    dtype = jnp.dtype(cfg.model.dtype) if dtype is None else dtype
    m = cfg.model
    overrides = dict(attention_impl=m.attention_impl or None)
    if m.vit_weights:
        if os.path.exists(os.path.join(m.vit_weights, convert.TOWER_FILE)):
            load = convert.abstract_tower if shapes_only else convert.load_tower
            return load(m.vit_weights, expect="dinov2")
        load = convert.abstract_dinov2 if shapes_only else convert.load_dinov2
        return load(m.vit_weights, dtype=dtype, scan_layers=m.scan_layers, remat=m.remat,
                    config_overrides=overrides)
    if not m.random_init:
        require_path("", "model.vit_weights", "point it at dinov2_vitb14_reg4_pretrain.pth, a "
                     "transformers Dinov2 folder or a converted tower, or set "
                     "--config.model.random_init=True")
    vc = vit.vit_config(m.vit, num_registers=m.num_registers, dtype=dtype, scan_layers=m.scan_layers,
                        remat=m.remat, layerscale_init=m.vit_layerscale_init, **overrides)
    return nnx.eval_shape(lambda: vit.VisionTransformer(vc, rngs=nnx.Rngs(0)))


def _text(cfg, tok, dtype, *, shapes_only: bool = False) -> text.TextDecoder:
    m = cfg.model
    base_dtype = jnp.dtype(m.text_param_dtype)
    common = dict(lora=_lora(cfg), num_added_tokens=tok.num_added_tokens, scan_layers=m.scan_layers,
                  remat=m.remat)
    if m.text_weights:
        if os.path.exists(os.path.join(m.text_weights, convert.TOWER_FILE)):
            load = convert.abstract_tower if shapes_only else convert.load_tower
            model = load(m.text_weights, expect="gpt2")
        else:
            load = convert.abstract_gpt2 if shapes_only else convert.load_gpt2
            model = load(m.text_weights, dtype=dtype, param_dtype=base_dtype, **common)
        tok.check_model(model.cfg.vocab_size, model.cfg.num_added_tokens)
        return model
    if not m.random_init:
        require_path("", "model.text_weights", "point it at a BioMedLM (GPT-2) transformers folder "
                     "or a converted tower, or set --config.model.random_init=True")
    tc = text.text_config(m.text, vocab_size=tok.base_vocab_size, dtype=dtype,
                          param_dtype=base_dtype, **common)
    return nnx.eval_shape(lambda: text.TextDecoder(tc, rngs=nnx.Rngs(0)))


def _model_config(cfg, tok: tok_lib.TextTokenizer, vision_cfg, text_cfg) -> mama.MaMAConfig:
    return mama.MaMAConfig(vit=vision_cfg, text=text_cfg, sep_id=tok.sep_id,
                           embed_dim=cfg.model.embed_dim, local_hidden=cfg.model.local_hidden,
                           simclr_out=cfg.model.simclr_out, text_pool=cfg.model.text_pool,
                           max_sentences=cfg.model.max_sentences,
                           # runs saved before the option existed used SEP states
                           sentence_features=cfg.model.get("sentence_features", "sep"),
                           freeze_llm=cfg.model.freeze_llm,
                           train_text_base=cfg.model.train_text_base,
                           clip_kind=clip_kind(cfg))  # the sigmoid loss's bias is a parameter


def model_config(cfg, tok: tok_lib.TextTokenizer) -> mama.MaMAConfig:
    """The configured architecture, read from the weights' configs only (no weights)."""
    dtype = jnp.dtype(cfg.model.dtype)
    return _model_config(cfg, tok, vision_tower(cfg, dtype, shapes_only=True).cfg,
                         _text(cfg, tok, dtype, shapes_only=True).cfg)


def model(cfg, tok: tok_lib.TextTokenizer, mesh=None) -> mama.MaMA:
    """MaMA with pretrained towers where configured; random parts are initialised
    inside jit (from cfg.seed) so nothing is built twice on the host, and with a `mesh`
    straight into the training shardings (no device holds the whole model first)."""
    dtype = jnp.dtype(cfg.model.dtype)
    vision, lm = vision_tower(cfg, dtype), _text(cfg, tok, dtype)
    mcfg = _model_config(cfg, tok, vision.cfg, lm.cfg)

    def init():
        rngs = nnx.Rngs(cfg.seed)
        fresh_vision = vit.VisionTransformer(vision.cfg, rngs=rngs)
        fresh_text = text.TextDecoder(lm.cfg, rngs=rngs)
        return nnx.state(mama.MaMA(mcfg, rngs=rngs, vision=fresh_vision, text=fresh_text))

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: mama.MaMA(mcfg, rngs=nnx.Rngs(0))))
    placed = sharding.state_shardings(abstract, mesh) if mesh is not None else None
    state = jax.jit(init, out_shardings=placed)()
    # Pretrained towers replace their random init (abstract towers stay random).
    for name, tower in (("vision", vision), ("text", lm)):
        tower_state = nnx.state(tower)
        if all(isinstance(x, jax.Array) for x in jax.tree.leaves(tower_state)):
            state[name] = tower_state
    return nnx.merge(graphdef, state)
