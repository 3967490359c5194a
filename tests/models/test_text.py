"""GPT-2 text tower: parity with PyTorch transformers, conversion strictness, pooling helpers."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mama_jax.models.convert_gpt2 import gpt2_state_from_tensors, load_gpt2, text_config_from_hf
from mama_jax.models.lora import LoRAConfig
from mama_jax.models.text import (TextDecoder, attention_with_dropout, last_token_features, masked_mean,
                                  sentence_features, sentence_token_means, text_config,
                                  text_config_from_dict, text_config_to_dict)
from mama_jax.models.weights import ConversionError, load_tensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, POSITIONS, LAYERS = 100, 40, 3


def _gpt2_config(**kw):
    base = dict(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=32, n_layer=LAYERS, n_head=2,
                bos_token_id=1, eos_token_id=2, scale_attn_by_inverse_layer_idx=True,
                attn_implementation="eager")
    return transformers.GPT2Config(**{**base, **kw})


def _randomise(model):
    """Non-trivial LayerNorm weights and biases so a wrong mapping shows."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith(("ln_f", "transformer.ln_f")):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif "c_attn.weight" in name:  # large q.k logits, so attention scaling shows
                p.normal_(0.0, 0.5, generator=gen)
            elif name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (3, 12)).astype(np.int64)
    mask = np.ones((3, 12), np.int64)
    mask[0, 7:] = 0
    mask[1, 10:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, batch):
    """Tiny random GPT2Model saved as safetensors, plus its reference outputs."""
    torch.manual_seed(0)
    model = _randomise(transformers.GPT2Model(_gpt2_config()))
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    ids, mask = batch
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    return model, str(folder), ref


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def _run(model, batch):
    ids, mask = batch
    return np.asarray(_forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))


def _max_diff_on_tokens(out, ref, mask):
    return float(np.abs(out - ref)[mask.astype(bool)].max())


def test_parity_with_transformers_gpt2model(gpt2, batch):
    _, folder, ref = gpt2
    diff = _max_diff_on_tokens(_run(load_gpt2(folder), batch), ref, batch[1])
    print(f"GPT2Model parity max abs diff (non-pad): {diff:.2e}")
    assert diff < 1e-4
    # The inverse-layer-index scaling matters: without it the outputs are far off.
    wrong = load_gpt2(folder, scale_attn_by_inverse_layer_idx=False)
    assert _max_diff_on_tokens(_run(wrong, batch), ref, batch[1]) > 1e-3


def test_pad_tokens_do_not_touch_real_tokens(gpt2, batch):
    _, folder, _ = gpt2
    model = load_gpt2(folder)
    ids, mask = batch
    other = np.where(mask.astype(bool), ids, (ids + 37) % VOCAB)
    a, b = _run(model, (ids, mask)), _run(model, (other, mask))
    np.testing.assert_allclose(a[mask.astype(bool)], b[mask.astype(bool)], atol=1e-6)


def test_scanned_remat_matches_unscanned(gpt2, batch):
    _, folder, _ = gpt2
    plain = _run(load_gpt2(folder), batch)
    scanned = _run(load_gpt2(folder, scan_layers=True, remat=True, remat_policy="dots_saveable"), batch)
    diff = float(np.abs(plain - scanned).max())
    print(f"scan+remat vs unscanned max abs diff: {diff:.2e}")
    assert diff < 1e-5


def test_bf16_base_with_fp32_lora(gpt2, batch):
    _, folder, ref = gpt2
    # Storage dtypes, from shapes only (no compile): base bf16, LoRA and added rows fp32.
    cfg = text_config("tiny", dtype="bfloat16", param_dtype="bfloat16")
    abstract = nnx.eval_shape(lambda: TextDecoder(cfg, rngs=nnx.Rngs(0)))
    dtypes = {(type(v).__name__, v.get_value().dtype.name) for _, v in nnx.to_flat_state(nnx.state(abstract))}
    assert dtypes == {("Param", "bfloat16"), ("LoRAParam", "float32"), ("AddedTokenEmbedding", "float32")}
    model = load_gpt2(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert model.blocks[0].attn.c_attn.kernel.get_value().dtype == jnp.bfloat16
    out = _forward(model, jnp.asarray(batch[0], jnp.int32), jnp.asarray(batch[1], jnp.int32))
    assert out.dtype == jnp.bfloat16
    diff = _max_diff_on_tokens(np.asarray(out, np.float32), ref, batch[1])
    print(f"bf16 vs fp32 torch max abs diff: {diff:.3f} (max |ref| {np.abs(ref).max():.2f})")
    assert diff < 0.05 * np.abs(ref).max()


def test_lm_head_model_with_prefix_and_tied_head(tmp_path, batch):
    torch.manual_seed(2)
    lm = _randomise(transformers.GPT2LMHeadModel(_gpt2_config()))
    lm.save_pretrained(tmp_path)
    names = set(load_tensors(str(tmp_path)))
    assert any(n.startswith("transformer.") for n in names)
    ids, mask = batch
    with torch.no_grad():
        ref = lm.transformer(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    diff = _max_diff_on_tokens(_run(load_gpt2(str(tmp_path)), batch), ref.numpy(), mask)
    print(f"GPT2LMHeadModel parity max abs diff: {diff:.2e}")
    assert diff < 1e-4


def test_sharded_safetensors_and_pytorch_bin(gpt2, tmp_path, batch):
    model, _, ref = gpt2
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert _max_diff_on_tokens(_run(load_gpt2(str(sharded)), batch), ref, batch[1]) < 1e-4
    # transformers 5 only writes safetensors; write the legacy pickle by hand.
    legacy = tmp_path / "legacy"
    model.config.save_pretrained(legacy)
    torch.save(model.state_dict(), legacy / "pytorch_model.bin")
    assert _max_diff_on_tokens(_run(load_gpt2(str(legacy)), batch), ref, batch[1]) < 1e-4


def test_wrong_architecture_is_rejected(tmp_path):
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    mlp_ratio=2, image_size=28, patch_size=14)
    transformers.Dinov2Model(cfg).save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="dinov2"):
        load_gpt2(str(tmp_path))
    # The tensor mapping alone also names what is missing and what is foreign.
    gpt_cfg = text_config_from_hf(json.loads(_gpt2_config(n_layer=1).to_json_string()))
    with pytest.raises(ConversionError) as err:
        gpt2_state_from_tensors(load_tensors(str(tmp_path)), gpt_cfg, source="dino")
    assert "wte.weight" in str(err.value) and "embeddings.cls_token" in str(err.value)


def test_missing_and_misshaped_tensors_are_named(gpt2, tmp_path):
    from safetensors.numpy import save_file

    _, folder, _ = gpt2
    tensors = load_tensors(folder)
    del tensors["h.1.mlp.c_fc.bias"]
    tensors["h.0.attn.c_proj.weight"] = tensors["h.0.attn.c_proj.weight"].T[:, :16].copy()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with open(os.path.join(folder, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    with pytest.raises(ConversionError) as err:
        load_gpt2(str(tmp_path))
    msg = str(err.value)
    assert "missing tensors: h.1.mlp.c_fc.bias" in msg
    assert "h.0.attn.c_proj.weight" in msg and "wrong shapes" in msg


def test_unsupported_activation_is_rejected():
    hf = json.loads(_gpt2_config(activation_function="relu").to_json_string())
    with pytest.raises(ConversionError, match="activation_function"):
        text_config_from_hf(hf)


def test_added_token_rows_and_lora_get_fresh_init(gpt2):
    _, folder, _ = gpt2
    model = load_gpt2(folder, num_added_tokens=3, lora=LoRAConfig(targets=("c_attn", "mlp.c_proj")))
    added = np.asarray(model.added_wte[...])
    assert added.shape == (3, 32) and 0.005 < added.std() < 0.05  # N(0, 0.02)
    ids = jnp.array([[VOCAB + 2, 5, VOCAB]])
    emb = np.asarray(nnx.jit(lambda m, i: m.embed_tokens(i))(model, ids))
    np.testing.assert_array_equal(emb[0, 0], added[2])
    np.testing.assert_array_equal(emb[0, 2], added[0])
    np.testing.assert_array_equal(emb[0, 1], np.asarray(model.wte.embedding[...])[5])
    assert np.abs(np.asarray(model.blocks[0].attn.c_attn.lora_a[...])).max() > 0
    assert np.all(np.asarray(model.blocks[2].mlp.c_proj.lora_b[...]) == 0)


def test_dropout_only_when_not_deterministic(gpt2, batch):
    _, folder, ref = gpt2
    model = load_gpt2(folder, attn_dropout=0.2, resid_dropout=0.1, embd_dropout=0.1)
    ids, mask = (jnp.asarray(a, jnp.int32) for a in batch)
    real = batch[1].astype(bool)
    # rbg keys compile much faster than threefry on CPU; the model takes either.
    train = nnx.jit(lambda m, i, k, key: m(i, k, deterministic=False, rngs=nnx.Rngs(dropout=key)))
    train_a, train_b, train_c = (np.asarray(train(model, ids, mask, jax.random.key(s, impl="rbg")))
                                 for s in (1, 1, 2))
    np.testing.assert_array_equal(train_a, train_b)  # seeded
    assert np.abs(train_a - ref)[real].max() > 1e-2
    assert np.abs(train_a - train_c)[real].max() > 1e-2
    assert _max_diff_on_tokens(_run(model, batch), ref, batch[1]) < 1e-4  # eval: no dropout
    with pytest.raises(ValueError, match="rngs"):
        model(ids, mask, deterministic=False)


def test_per_row_dropout_keys_give_each_caption_its_own_masks(gpt2, batch):
    """With one key per row a caption's dropout masks do not depend on the batch it is in:
    the rows of a batch run whole equal the same rows run in two halves (LoRA dropout,
    attention and residual dropout all active)."""
    _, folder, ref = gpt2
    model = load_gpt2(folder, attn_dropout=0.2, resid_dropout=0.1, embd_dropout=0.1,
                      lora=LoRAConfig(dropout=0.3))
    ids, mask = (jnp.asarray(np.concatenate([a, a[::-1]]), jnp.int32) for a in batch)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(5), jnp.arange(len(ids)))
    train = nnx.jit(lambda m, i, k, keys: m(i, k, deterministic=False, dropout_keys=keys))
    whole = np.asarray(train(model, ids, mask, keys))
    half = len(ids) // 2
    parts = np.concatenate([np.asarray(train(model, ids[s], mask[s], keys[s]))
                            for s in (slice(0, half), slice(half, None))])
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(parts[real], whole[real], rtol=1e-5, atol=1e-5)
    assert np.abs(whole[:len(ref)] - ref)[batch[1].astype(bool)].max() > 1e-2  # dropout is on
    # The same caption with another key gets other masks.
    other = np.asarray(train(model, ids, mask, jax.random.split(jax.random.key(6), len(ids))))
    assert np.abs(other - whole)[real].max() > 1e-2


def test_attention_with_dropout_matches_fused_attention_at_rate_zero():
    q, k, v = np.random.default_rng(0).normal(size=(3, 2, 6, 2, 4)).astype(np.float32)
    key_mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool)

    @jax.jit
    def both(q, k, v, key_mask):
        ref = jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :], scale=0.3,
                                           is_causal=True)
        return ref, attention_with_dropout(q, k, v, key_mask, 0.3, 0.0, None)

    ref, out = both(q, k, v, key_mask)
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_config_dict_round_trip():
    cfg = text_config("biomedlm")
    back = text_config_from_dict(json.loads(json.dumps(text_config_to_dict(cfg))))
    assert back == cfg
    with pytest.raises(ValueError, match="bogus"):
        text_config_from_dict({**text_config_to_dict(cfg), "bogus": 1})


# ---------------------------------------------------------------- pooling helpers

SEP = 7


@pytest.fixture()
def hand_batch():
    ids = np.array([[1, 4, SEP, 5, SEP, 2, 0, 0],
                    [1, SEP, 3, SEP, 6, SEP, 8, 2],
                    [1, 2, 0, 0, 0, 0, 0, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8, [1, 1, 0, 0, 0, 0, 0, 0]], np.int32)
    hidden = np.random.default_rng(3).normal(size=(3, 8, 5)).astype(np.float32)
    return hidden, ids, mask


def test_last_token_features(hand_batch):
    hidden, _, mask = hand_batch
    want = np.stack([hidden[b, np.nonzero(mask[b])[0][-1]] for b in range(3)])
    got = jax.jit(last_token_features)(hidden, mask)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("max_sentences", [2, 4, 10])
def test_sentence_features(hand_batch, max_sentences):
    hidden, ids, _ = hand_batch
    want = np.zeros((3, max_sentences, 5), np.float32)
    want_mask = np.zeros((3, max_sentences), bool)
    for b in range(3):
        for s, pos in enumerate(np.nonzero(ids[b] == SEP)[0][:max_sentences]):
            want[b, s], want_mask[b, s] = hidden[b, pos], True
    fn = jax.jit(sentence_features, static_argnums=(2, 3))
    feats, valid = fn(hidden, ids, SEP, max_sentences)
    np.testing.assert_array_equal(valid, want_mask)
    np.testing.assert_array_equal(feats, want)


@pytest.mark.parametrize("max_sentences", [2, 4, 10])
def test_sentence_token_means(hand_batch, max_sentences):
    embeds, ids, _ = hand_batch  # the hidden states stand in for token embeddings
    want = np.zeros((3, max_sentences, 5), np.float32)
    want_mask = np.zeros((3, max_sentences), bool)
    for b in range(3):
        start = 0
        for s, sep in enumerate(np.nonzero(ids[b] == SEP)[0]):
            if s < max_sentences:  # tokens since the previous SEP, this SEP included
                want[b, s], want_mask[b, s] = embeds[b, start:sep + 1].mean(0), True
            start = sep + 1
    fn = jax.jit(sentence_token_means, static_argnums=(2, 3))
    feats, valid = fn(embeds, ids, SEP, max_sentences)
    np.testing.assert_array_equal(valid, want_mask)
    np.testing.assert_allclose(feats, want, rtol=1e-6, atol=1e-7)
    # A sentence's mean ignores every other token: change all of them, it stays.
    others = np.where((np.arange(8) < 3)[None, :, None], embeds, -embeds)
    again, _ = fn(others, ids, SEP, max_sentences)
    np.testing.assert_allclose(np.asarray(again)[0, 0], want[0, 0], rtol=1e-6)


def test_masked_mean(hand_batch):
    hidden, _, mask = hand_batch
    want = np.stack([hidden[b, mask[b].astype(bool)].mean(0) for b in range(3)])
    np.testing.assert_allclose(masked_mean(hidden, mask), want, rtol=1e-6)
