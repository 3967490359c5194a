"""HF GPT-2-family checkpoints (BioMedLM) -> TextDecoder.

Conv1D weights are already (in, out) like nnx kernels: copied, never
transposed. Names may carry the `transformer.` prefix (GPT2LMHeadModel) or not
(GPT2Model). `lm_head.weight` (tied to wte) and the old `attn.bias` /
`attn.masked_bias` mask buffers are dropped by rule; anything else left over,
missing or mis-shaped is a ConversionError naming the tensors.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from mama_jax.models.lora import LoRAConfig
from mama_jax.models.text import (ACTIVATIONS, AddedTokenEmbedding, TextConfig, TextDecoder,
                                  text_config_from_dict, text_config_to_dict)
from mama_jax.models.weights import ConversionError, StrictTensors, load_tensors

__all__ = ["load_gpt2", "gpt2_state_from_tensors", "text_config_from_hf", "read_hf_config",
           "text_config_to_dict", "text_config_from_dict"]

# Variables that are not in a GPT-2 checkpoint and keep their fresh init.
FRESH_VARIABLES = nnx.Any(nnx.LoRAParam, AddedTokenEmbedding)


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"{path}: no config.json (expected a transformers GPT-2 folder)")
    with open(cfg_path) as f:
        return json.load(f)


def text_config_from_hf(hf: dict, *, source: str = "config.json", **overrides) -> TextConfig:
    """TextConfig from a GPT-2 config.json dict; overrides set dtype, LoRA, scan, ..."""
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise ConversionError(f"{source}: model_type={model_type!r} (architectures="
                              f"{hf.get('architectures')}), expected a GPT-2 family model ('gpt2')")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ConversionError(f"{source}: activation_function={act!r} unsupported; "
                              f"supported: {sorted(ACTIVATIONS)}")
    # reorder_and_upcast_attn only changes where fp32 upcasting happens; we
    # always take logits and softmax in fp32, so it needs no handling.
    if hf.get("add_cross_attention"):
        raise ConversionError(f"{source}: add_cross_attention=true is not supported")
    try:
        fields = dict(
            vocab_size=int(hf["vocab_size"]),
            n_positions=int(hf["n_positions"] if "n_positions" in hf else hf["n_ctx"]),
            hidden=int(hf["n_embd"]), layers=int(hf["n_layer"]), heads=int(hf["n_head"]),
            inner=hf.get("n_inner"), ln_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            activation=act, scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
            embd_dropout=float(hf.get("embd_pdrop", 0.1)), attn_dropout=float(hf.get("attn_pdrop", 0.1)),
            resid_dropout=float(hf.get("resid_pdrop", 0.1)))
    except KeyError as err:
        raise ConversionError(f"{source}: missing field {err.args[0]!r}") from err
    return TextConfig(**{**fields, **overrides})


def _find_prefix(tensors: dict) -> str:
    return "transformer." if any(k.startswith("transformer.") for k in tensors) else ""


def gpt2_state_from_tensors(tensors: dict[str, np.ndarray], cfg: TextConfig,
                            source: str = "checkpoint") -> dict:
    """Pure nested dict (numpy) of every checkpoint-backed TextDecoder variable.

    Matches `nnx.to_pure_dict` of the model's base params: LoRA factors and
    `added_wte` are not in it. Layers are stacked on axis 0 when cfg.scan_layers.
    Raises ConversionError listing all missing / wrong-shape / unexpected tensors.
    """
    st = StrictTensors(tensors, source)
    p = _find_prefix(tensors)
    st.ignore(r"lm_head\.weight")
    st.ignore(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")
    D, I = cfg.hidden, cfg.inner_dim

    def linear(name, n_in, n_out):
        return {"kernel": st.take(f"{name}.weight", (n_in, n_out)), "bias": st.take(f"{name}.bias", (n_out,))}

    def norm(name):
        return {"scale": st.take(f"{name}.weight", (D,)), "bias": st.take(f"{name}.bias", (D,))}

    layers = []
    for i in range(cfg.layers):
        h = f"{p}h.{i}"
        layers.append({
            "ln_1": norm(f"{h}.ln_1"),
            "attn": {"c_attn": linear(f"{h}.attn.c_attn", D, 3 * D), "c_proj": linear(f"{h}.attn.c_proj", D, D)},
            "ln_2": norm(f"{h}.ln_2"),
            "mlp": {"c_fc": linear(f"{h}.mlp.c_fc", D, I), "c_proj": linear(f"{h}.mlp.c_proj", I, D)},
        })
    state = {
        "wte": {"embedding": st.take(f"{p}wte.weight", (cfg.vocab_size, D))},
        "wpe": {"embedding": st.take(f"{p}wpe.weight", (cfg.n_positions, D))},
        "ln_f": norm(f"{p}ln_f"),
    }
    st.finish()  # raises before any None leaf is used
    if cfg.scan_layers:
        state["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    else:
        state["blocks"] = dict(enumerate(layers))
    return state


def _fill(abstract_state: nnx.State, pure: dict, dtype: Any, source: str) -> nnx.State:
    """Put converted arrays into the abstract base state, checking keys and shapes."""
    want = {path: var.get_value() for path, var in nnx.to_flat_state(abstract_state)}
    got = traverse_util.flatten_dict(pure)
    if set(want) != set(got):
        raise ConversionError(f"{source}: converted variables do not match the model: "
                              f"missing {sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}")
    for path, var in want.items():
        if tuple(var.shape) != tuple(got[path].shape):
            raise ConversionError(f"{source}: {'/'.join(map(str, path))} has shape "
                                  f"{got[path].shape}, model wants {var.shape}")
    filled = jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), pure)
    nnx.replace_by_pure_dict(abstract_state, filled)
    return abstract_state


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fresh_variables(cfg: TextConfig, seed: int) -> nnx.State:
    """Initial LoRA factors and added rows. Under jit the random base weights are
    dead code, so a 2.7B model is never initialised just to be overwritten."""
    return nnx.state(TextDecoder(cfg, rngs=nnx.Rngs(seed)), FRESH_VARIABLES)


def gpt2_config(path: str, **overrides) -> TextConfig:
    """The TextConfig of a transformers GPT-2 folder (its config.json; no weight is read)."""
    path = os.fspath(path)
    return text_config_from_hf(read_hf_config(path), source=os.path.join(path, "config.json"),
                               **overrides)


def abstract_gpt2(path: str, **overrides) -> TextDecoder:
    """The shape-only decoder that `load_gpt2` (same arguments) would fill."""
    cfg = gpt2_config(path, **overrides)
    return nnx.eval_shape(lambda: TextDecoder(cfg, rngs=nnx.Rngs(0)))


def load_gpt2(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32, lora: LoRAConfig | None = None,
              num_added_tokens: int = 0, scan_layers: bool = False, remat: bool = False,
              rngs_seed: int = 0, **config_overrides) -> TextDecoder:
    """TextDecoder from a transformers GPT-2 folder (safetensors, sharded, or pytorch_model.bin).

    Base weights come from the checkpoint (cast to param_dtype); LoRA factors
    and added-token rows get their fresh init from `rngs_seed`. Other
    TextConfig fields (remat_policy, attention_impl, train_added_embeddings,
    dropouts) can be passed as keyword overrides.
    """
    path = os.fspath(path)
    cfg = gpt2_config(path, dtype=dtype, param_dtype=param_dtype, lora=lora,
                      num_added_tokens=num_added_tokens, scan_layers=scan_layers, remat=remat,
                      **config_overrides)
    pure = gpt2_state_from_tensors(load_tensors(path), cfg, source=path)

    graphdef, fresh_abstract, base_abstract = nnx.split(
        nnx.eval_shape(lambda: TextDecoder(cfg, rngs=nnx.Rngs(rngs_seed))), FRESH_VARIABLES, ...)
    fresh = _fresh_variables(cfg, rngs_seed) if len(nnx.to_flat_state(fresh_abstract)) else fresh_abstract
    base = _fill(base_abstract, pure, cfg.param_dtype, path)
    return nnx.merge(graphdef, fresh, base)
