"""The convert command: source checkpoint -> Orbax tower that restores to the same model."""

import numpy as np
import pytest
from flax import nnx

from mama_jax.models import convert
from mama_jax.models.weights import ConversionError


@pytest.fixture(scope="module")
def hf_dinov2(tmp_path_factory):
    import torch
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    mlp_ratio=2, patch_size=14, image_size=56,
                                    num_register_tokens=4, layerscale_value=0.5)
    path = tmp_path_factory.mktemp("dinov2")
    Dinov2WithRegistersModel(cfg).eval().save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=1, eos_token_id=1, scale_attn_by_inverse_layer_idx=True)
    path = tmp_path_factory.mktemp("gpt2")
    GPT2Model(cfg).eval().save_pretrained(path, safe_serialization=True)
    return str(path)


def _params(model):
    return nnx.to_pure_dict(nnx.state(model))


def _assert_same(a, b):
    import jax

    la, lb = jax.tree.leaves(_params(a)), jax.tree.leaves(_params(b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_dinov2_round_trip_through_the_cli(hf_dinov2, tmp_path):
    dst = str(tmp_path / "vit")
    assert convert.main(["--kind", "dinov2", "--src", hf_dinov2, "--dst", dst]) == 0
    restored = convert.load_tower(dst, expect="dinov2")
    _assert_same(restored, convert.load_dinov2(hf_dinov2))
    images = np.random.default_rng(0).normal(size=(1, 56, 56, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(restored(images).cls),
                                  np.asarray(convert.load_dinov2(hf_dinov2)(images).cls))


def test_gpt2_round_trip_keeps_the_storage_dtype(hf_gpt2, tmp_path):
    dst = str(tmp_path / "lm")
    assert convert.main(["--kind", "gpt2", "--src", hf_gpt2, "--dst", dst,
                         "--param-dtype", "bfloat16"]) == 0
    import jax.numpy as jnp

    restored = convert.load_tower(dst, expect="gpt2")
    _assert_same(restored, convert.load_gpt2(hf_gpt2, param_dtype=jnp.bfloat16))


def test_wrong_kind_and_missing_metadata_are_named(hf_gpt2, tmp_path):
    dst = str(tmp_path / "lm")
    convert.main(["--kind", "gpt2", "--src", hf_gpt2, "--dst", dst])
    with pytest.raises(ConversionError, match="holds a gpt2 tower, expected dinov2"):
        convert.load_tower(dst, expect="dinov2")
    with pytest.raises(ConversionError, match="tower.json"):
        convert.load_tower(str(tmp_path))
    with pytest.raises(ConversionError, match="model_type|cls_token|config"):
        convert.main(["--kind", "dinov2", "--src", hf_gpt2, "--dst", str(tmp_path / "bad")])
