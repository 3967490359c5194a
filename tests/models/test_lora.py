"""PEFT-style LoRA: maths of one layer, and that only LoRA trains in the scanned+remat decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mama_jax.models.convert_gpt2 import load_gpt2
from mama_jax.models.lora import (LORA_TARGETS, LoRAConfig, LoRALinear, lora_value_and_grad,
                                  peft_kaiming_uniform)
from mama_jax.models.text import AddedTokenEmbedding, last_token_features, text_config, trainable_filter

ALL_TARGETS = tuple(LORA_TARGETS)
VOCAB = 60


def _dropout_key(seed):
    # rbg keys compile far faster than threefry on CPU; the code is key-type agnostic.
    return jax.random.key(seed, impl="rbg")


def test_lora_config_validates_and_accepts_peft_names():
    assert LoRAConfig(targets=("attn.c_attn", "mlp.c_proj")).targets == ("c_attn", "mlp_c_proj")
    assert LoRAConfig(rank=8, alpha=32).scale == 4.0
    with pytest.raises(ValueError, match="q_proj"):
        LoRAConfig(targets=("q_proj",))


def test_peft_kaiming_uniform_bound():
    a = np.asarray(peft_kaiming_uniform(jax.random.key(0), (64, 8)))
    bound = 1 / np.sqrt(64)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.02


def test_lora_linear_matches_numpy_and_dropout_only_touches_the_lora_branch():
    cfg = LoRAConfig(rank=4, alpha=8, dropout=0.5)
    layer = LoRALinear(6, 5, lora=cfg, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    W, b, A = (np.asarray(v[...]) for v in (layer.kernel, layer.bias, layer.lora_a))
    # B = 0: exactly the base layer, with or without dropout.
    base = x @ layer.kernel[...] + layer.bias[...]
    np.testing.assert_array_equal(layer(x), base)
    np.testing.assert_allclose(base, x @ W + b, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(layer(x, deterministic=False, key=jax.random.key(1)), layer(x))
    B = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    layer.lora_b[...] = B
    np.testing.assert_allclose(layer(x), x @ W + b + (x @ A @ B) * 2.0, rtol=1e-5, atol=1e-5)
    noisy = layer(x, deterministic=False, key=jax.random.key(1))
    assert float(jnp.abs(noisy - layer(x)).max()) > 1e-3


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny random GPT-2 checkpoint: the base that LoRA adapts (as BioMedLM in training)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=1, eos_token_id=2, scale_attn_by_inverse_layer_idx=True)
    folder = tmp_path_factory.mktemp("gpt2_lora")
    transformers.GPT2Model(cfg).save_pretrained(folder)
    return str(folder)


def _load(folder, lora):
    return load_gpt2(folder, lora=lora, num_added_tokens=6, scan_layers=True, remat=True)


def _batch():
    ids = np.random.default_rng(0).integers(0, VOCAB + 6, (4, 10)).astype(np.int32)
    mask = np.ones((4, 10), np.int32)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def _loss(model, ids, mask, key):
    h = model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=key))
    # Weighted sum: a plain sum of LayerNorm outputs is constant at init (zero gradient).
    return jnp.mean(jnp.sum(last_token_features(h, mask) * jnp.arange(h.shape[-1]), axis=-1) ** 2)


def _frozen(model, wrt):
    return {k: np.array(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Not(wrt)))}


def _by_leaf(state, leaf):
    return [np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state) if k[-1] == leaf]


def test_zero_b_equals_base_model_exactly(gpt2_folder):
    base = load_gpt2(gpt2_folder, scan_layers=True, remat=True)  # no LoRA, no added rows
    model = _load(gpt2_folder, LoRAConfig(targets=ALL_TARGETS))
    ids, mask = _batch()
    ids = ids % VOCAB  # the base model has no added rows
    forward = nnx.jit(lambda m, i, k: m(i, k))
    np.testing.assert_array_equal(forward(model, ids, mask), forward(base, ids, mask))


def test_trainable_filter_selects_added_rows_only_when_asked(gpt2_folder):
    model = _load(gpt2_folder, LoRAConfig(targets=ALL_TARGETS))
    for train_added in (False, True):
        wrt = trainable_filter(text_config("tiny", train_added_embeddings=train_added))
        selected = {type(v) for _, v in nnx.to_flat_state(nnx.state(model, wrt))}
        assert selected == ({nnx.LoRAParam, AddedTokenEmbedding} if train_added else {nnx.LoRAParam})


def test_one_step_trains_lora_only_under_scan_and_remat(gpt2_folder):
    model = _load(gpt2_folder, LoRAConfig(targets=ALL_TARGETS))
    wrt = nnx.LoRAParam
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=wrt)
    frozen_before = _frozen(model, wrt)
    ids, mask = _batch()

    @nnx.jit
    def step(model, optimizer, key):
        loss, grads = lora_value_and_grad(_loss, wrt=wrt)(model, ids, mask, key)
        optimizer.update(model, grads)
        return loss, grads

    _, grads = step(model, optimizer, _dropout_key(0))
    assert {k[-1] for k, _ in nnx.to_flat_state(grads)} == {"lora_a", "lora_b"}
    # With B = 0, dL/dA = x^T (dL/dy) B^T = 0 exactly; B gets the gradient first.
    assert all(np.all(g == 0) for g in _by_leaf(grads, "lora_a"))
    assert all(np.abs(g).max() > 0 for g in _by_leaf(grads, "lora_b"))
    # After one step B != 0, so A's gradient is non-zero too.
    _, grads = step(model, optimizer, _dropout_key(1))
    assert all(np.abs(g).max() > 0 for g in _by_leaf(grads, "lora_a"))
    assert all(np.abs(g).max() > 0 for g in _by_leaf(grads, "lora_b"))

    frozen_after = _frozen(model, wrt)
    assert frozen_before.keys() == frozen_after.keys() and len(frozen_before) > 10
    assert any(k[-1] == "added_wte" for k in frozen_before)
    for path, before in frozen_before.items():
        assert np.array_equal(before, frozen_after[path]), f"frozen {path} changed"
    # Optimizer moments (adam mu, nu) exist only for the LoRA factors.
    moment_sizes = sum(x.size for x in jax.tree.leaves(nnx.state(optimizer, nnx.OptState))
                       if getattr(x, "ndim", 0) > 0)
    assert moment_sizes == 2 * sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))
