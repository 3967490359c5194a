"""DINOv2 ViT: parity with PyTorch transformers at tiny size, hub naming, scan/remat, strict loading."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from mama_jax.models import convert_dinov2
from mama_jax.models.convert_dinov2 import (abstract_dinov2, dinov2_state_from_tensors,
                                            hub_config_from_tensors, load_dinov2, read_dinov2)
from mama_jax.models.vit import (VisionTransformer, vit_config, vit_config_from_dict,
                                 vit_config_to_dict)
from mama_jax.models.weights import ConversionError, file_shapes, load_tensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZES = [(56, 56), (84, 84), (70, 98)]  # native grid, square resize, non-square resize
TOL = 1e-4


def _randomise(model, seed):
    """Random weights everywhere, so every tensor (pos table, tokens, layer scales) matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "layer_scale" in name:
                p.copy_(0.5 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def _hf_model(kind, seed):
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4,
                  patch_size=14, image_size=56, layerscale_value=0.5)
    if kind == "reg":
        cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **common)
        model = transformers.Dinov2WithRegistersModel(cfg)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    _randomise(model, seed)
    return model.eval()


def _images(h, w, seed=0):
    return np.random.default_rng(seed).standard_normal((2, h, w, 3)).astype(np.float32)


def _torch_features(model, images):
    with torch.no_grad():
        out = model(torch.from_numpy(images).permute(0, 3, 1, 2), output_hidden_states=True)
    return out.last_hidden_state.numpy(), out.hidden_states[-1].numpy()


# One jitted forward for all tests: models with equal configs share compilations.
_forward = nnx.jit(lambda model, images: model(images))


def _max_diffs(model, hf_model, h, w):
    images = _images(h, w)
    post, pre = _torch_features(hf_model, images)
    out = _forward(model, jnp.asarray(images))
    r = model.cfg.num_registers
    return {"cls": float(np.abs(np.asarray(out.cls) - post[:, 0]).max()),
            "patches": float(np.abs(np.asarray(out.patch_tokens) - post[:, 1 + r:]).max()),
            "prenorm": float(np.abs(np.asarray(out.prenorm) - pre).max())}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    models = {}
    for seed, kind in enumerate(("plain", "reg")):
        model = _hf_model(kind, seed)
        folder = tmp_path_factory.mktemp(f"dinov2_{kind}")
        model.save_pretrained(folder, safe_serialization=True)
        models[kind] = (model, str(folder))
    return models


@pytest.mark.parametrize("kind", ["plain", "reg"])
def test_transformers_parity(hf_models, kind):
    hf_model, folder = hf_models[kind]
    model = load_dinov2(folder)
    assert model.cfg.pos_antialias == (kind == "reg")
    assert model.cfg.num_registers == (4 if kind == "reg" else 0)
    for h, w in SIZES:
        diffs = _max_diffs(model, hf_model, h, w)
        print(kind, (h, w), diffs)
        assert max(diffs.values()) <= TOL, (kind, (h, w), diffs)


def test_grey_uint16_input_equals_three_normalised_channels(hf_models):
    """The pipeline's grey uint16 view, normalised in the tower with the patch kernel summed
    over its equal channels, against transformers fed the host's float32 [B, H, W, 3]."""
    hf_model, folder = hf_models["reg"]
    model = load_dinov2(folder)
    grey = np.random.default_rng(1).integers(0, 65536, (2, 56, 70), dtype=np.uint16)
    host = (grey.astype(np.float32) * np.float32(1 / 65535)) * np.float32(2) - np.float32(1)
    post, pre = _torch_features(hf_model, np.repeat(host[..., None], 3, axis=-1))
    out = _forward(model, jnp.asarray(grey))
    assert float(np.abs(np.asarray(out.prenorm) - pre).max()) <= TOL
    assert float(np.abs(np.asarray(out.cls) - post[:, 0]).max()) <= TOL
    with pytest.raises(ValueError, match="grey uint16"):
        model(jnp.zeros((2, 56, 56), jnp.float32))  # grey must be the record's uint16


def _hf_to_hub(state: dict) -> dict:
    """Rename a transformers Dinov2 state dict to torch-hub DinoVisionTransformer names."""
    top = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
           "embeddings.register_tokens": "register_tokens", "embeddings.position_embeddings": "pos_embed",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    layer = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
             "attention.output.dense": "attn.proj"}
    out = {top[k]: v for k, v in state.items() if k in top}
    n_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    for i in range(n_layers):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for a, b in layer.items():
            for t in ("weight", "bias"):
                out[f"{dst}{b}.{t}"] = state[f"{src}{a}.{t}"]
        out[dst + "ls1.gamma"] = state[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = state[src + "layer_scale2.lambda1"]
        for t in ("weight", "bias"):
            out[f"{dst}attn.qkv.{t}"] = torch.cat(
                [state[f"{src}attention.attention.{n}.{t}"] for n in ("query", "key", "value")])
    return {k: v.clone() for k, v in out.items()}


def _hf_state(folder):
    return {k: torch.from_numpy(v) for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}


def test_torch_hub_pth_parity(hf_models, tmp_path):
    hf_model, folder = hf_models["reg"]
    pth = tmp_path / "dinov2_tiny_reg4_pretrain.pth"
    torch.save(_hf_to_hub(_hf_state(folder)), pth)
    # Hub models have 64-dim heads, so the head count is dim / 64; the tiny model needs it given.
    with pytest.raises(ConversionError, match="64"):
        load_dinov2(str(pth))
    model = load_dinov2(str(pth), config_overrides={"heads": 2})
    cfg = model.cfg
    assert (cfg.hidden, cfg.depth, cfg.heads, cfg.num_registers, cfg.pos_grid) == (32, 2, 2, 4, 4)
    assert cfg.pos_antialias and cfg.pos_offset == 0.0
    diffs = _max_diffs(model, hf_model, 70, 98)
    print("hub-reg", (70, 98), diffs)
    assert max(diffs.values()) <= TOL, diffs


def test_torch_hub_plain_offset_interpolation(hf_models, tmp_path):
    """Plain hub models resize with scale_factor (n + 0.1) / grid, no antialias; HF uses size=."""
    _, folder = hf_models["plain"]
    pth = tmp_path / "dinov2_tiny_pretrain.pth"
    hub_state = _hf_to_hub(_hf_state(folder))
    torch.save(hub_state, pth)
    model = load_dinov2(str(pth), config_overrides={"heads": 2})
    assert not model.cfg.pos_antialias and model.cfg.pos_offset == pytest.approx(0.1)
    grids = [(5, 7), (3, 2), (4, 4)]  # (4, 4) at a non-square pixel size still resamples
    ours = nnx.jit(lambda m: [m.position_embedding(gh, gw, gh * 14, gw * 14 + 1) for gh, gw in grids])(model)
    # The torch-hub rule written out in torch.
    pos = hub_state["pos_embed"].float()
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    for (gh, gw), got in zip(grids, ours):
        ref = torch.nn.functional.interpolate(grid, scale_factor=((gh + 0.1) / 4, (gw + 0.1) / 4),
                                              mode="bicubic", antialias=False)
        ref = torch.cat([pos[:, :1], ref.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1).numpy()
        assert got.shape == ref.shape
        diff = float(np.abs(np.asarray(got) - ref).max())
        print("hub-plain pos", (gh, gw), diff)
        assert diff <= 1e-5, (gh, gw, diff)


def test_scanned_remat_matches_unscanned(hf_models):
    _, folder = hf_models["reg"]
    plain = load_dinov2(folder)
    scanned = load_dinov2(folder, scan_layers=True, remat=True,
                          config_overrides={"remat_policy": "dots_with_no_batch_dims_saveable"})
    assert nnx.state(scanned)["blocks"]["attn"]["query"]["kernel"][...].shape == (2, 32, 32)
    images = jnp.asarray(_images(56, 56)[:1])  # small: each gradient compile costs seconds on CPU

    @nnx.jit
    def features_and_grads(model):
        def loss(m):
            out = m(images)
            return jnp.mean(out.prenorm.mean(axis=1) ** 2) + jnp.mean(out.patch_tokens ** 2), out
        return nnx.grad(loss, has_aux=True)(model)

    ga, a = features_and_grads(plain)
    gb, b = features_and_grads(scanned)
    for x, y in ((a.cls, b.cls), (a.patch_tokens, b.patch_tokens), (a.prenorm, b.prenorm)):
        assert np.abs(np.asarray(x) - np.asarray(y)).max() <= 1e-5
    np.testing.assert_allclose(np.asarray(ga["patch_embed"]["kernel"][...]),
                               np.asarray(gb["patch_embed"]["kernel"][...]), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(ga["blocks"][1]["mlp"]["fc1"]["kernel"][...]),
                               np.asarray(gb["blocks"]["mlp"]["fc1"]["kernel"][...][1]), atol=1e-5, rtol=1e-4)


def test_bf16_compute_close_to_fp32(hf_models):
    _, folder = hf_models["reg"]
    ref = load_dinov2(folder)
    low = load_dinov2(folder, dtype=jnp.bfloat16)
    assert low.pos_embed[...].dtype == jnp.float32  # params stay fp32
    images = jnp.asarray(_images(84, 84))
    a, b = _forward(ref, images), _forward(low, images)
    assert b.patch_tokens.dtype == jnp.bfloat16
    for x, y in ((a.cls, b.cls), (a.patch_tokens, b.patch_tokens), (a.prenorm, b.prenorm)):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        rel = np.linalg.norm(x - y) / np.linalg.norm(x)
        assert rel < 3e-2, rel


def test_fresh_model_and_config_roundtrip():
    cfg = vit_config("tiny", num_registers=4, dtype=jnp.bfloat16, scan_layers=True, remat=True)
    assert cfg.pos_antialias and cfg.mlp_hidden == 128
    back = vit_config_from_dict(json.loads(json.dumps(vit_config_to_dict(cfg))))
    assert back == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        vit_config_from_dict({"hiden": 3})
    with pytest.raises(ValueError, match="remat_policy"):
        vit_config("tiny", remat_policy="nope")
    # Shapes only (abstract init and forward): random init compiles slowly on CPU and the
    # loaded-weight tests above already run scanned, remat and bf16 models.
    model = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    assert model.blocks.attn.query.kernel.shape == (2, 32, 32)
    assert model.register_tokens.shape == (1, 4, 32) and model.pos_embed.shape == (1, 17, 32)
    graphdef, state = nnx.split(model)
    forward = lambda s, x: nnx.merge(graphdef, s)(x)
    out = jax.eval_shape(forward, state, jax.ShapeDtypeStruct((1, 42, 70, 3), jnp.float32))  # 3x5 patches
    assert out.cls.shape == (1, 32) and out.patch_tokens.shape == (1, 15, 32)
    assert out.prenorm.shape == (1, 1 + 4 + 15, 32) and out.cls.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="images"):
        jax.eval_shape(forward, state, jax.ShapeDtypeStruct((1, 56, 56), jnp.float32))
    plain = nnx.eval_shape(lambda: VisionTransformer(vit_config("tiny"), rngs=nnx.Rngs(0)))
    assert len(plain.blocks) == 2 and plain.register_tokens is None
    assert plain.blocks[0].attn.query.kernel.shape == (32, 32)
    assert vit_config("base").pos_grid * 14 == 518 and vit_config("large").depth == 24


def test_missing_wrong_and_extra_tensors_are_named(hf_models, tmp_path):
    _, folder = hf_models["reg"]
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    broken = dict(tensors)
    del broken["encoder.layer.1.mlp.fc2.bias"]
    broken["encoder.layer.0.layer_scale1.lambda1"] = np.zeros(31, np.float32)
    broken["encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
    bad = tmp_path / "broken"
    bad.mkdir()
    save_file(broken, str(bad / "model.safetensors"))
    with open(os.path.join(folder, "config.json")) as f:
        (bad / "config.json").write_text(f.read())
    with pytest.raises(ConversionError) as err:
        load_dinov2(str(bad))
    msg = str(err.value)
    assert "encoder.layer.1.mlp.fc2.bias" in msg and "missing" in msg
    assert "encoder.layer.0.layer_scale1.lambda1" in msg and "(31,)" in msg
    assert "encoder.layer.0.extra.weight" in msg and "unexpected" in msg

    # A plain Dinov2 checkpoint (no registers) mapped as a register model.
    cfg = read_dinov2(folder).cfg
    with pytest.raises(ConversionError, match="embeddings.register_tokens"):
        dinov2_state_from_tensors(load_file(os.path.join(hf_models["plain"][1], "model.safetensors")), cfg)

    # torch-hub names: a fused qkv tensor missing is reported by its hub name.
    hub = {k: v.numpy() for k, v in _hf_to_hub(_hf_state(folder)).items()}
    del hub["blocks.1.attn.qkv.weight"]
    with pytest.raises(ConversionError, match=r"blocks\.1\.attn\.qkv\.weight"):
        dinov2_state_from_tensors(hub, hub_config_from_tensors(hub, "hub.pth", heads=2), source="hub.pth")

    # torch-hub file without the tensors that define a DINOv2.
    with pytest.raises(ConversionError, match="cls_token"):
        hub_config_from_tensors({"blocks.0.norm1.weight": np.zeros(4)}, "x.pth")


def test_gpt2_checkpoint_is_rejected(hf_models, tmp_path):
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8,
                                  bos_token_id=0, eos_token_id=0)
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Model(cfg).save_pretrained(gpt2, safe_serialization=True)
    with pytest.raises(ConversionError, match="gpt2"):
        load_dinov2(str(gpt2))
    # GPT-2 weights behind a DINOv2 config: every mismatch is named.
    with open(os.path.join(hf_models["reg"][1], "config.json")) as f:
        (gpt2 / "config.json").write_text(f.read())
    with pytest.raises(ConversionError) as err:
        load_dinov2(str(gpt2))
    msg = str(err.value)
    assert "embeddings.cls_token" in msg and "wte.weight" in msg


def test_shape_only_tower_reads_no_weights(hf_models, tmp_path, monkeypatch):
    """abstract_dinov2 gives load_dinov2's architecture from config.json or the file's
    shapes alone: with the weight reader broken it still works."""
    _, folder = hf_models["reg"]
    pth = tmp_path / "dinov2_tiny_reg4_pretrain.pth"
    torch.save(_hf_to_hub(_hf_state(folder)), pth)
    sources = {"hf folder": (folder, None),
               "hf safetensors file": (os.path.join(folder, "model.safetensors"), None),
               "hub pth": (str(pth), {"heads": 2})}
    loaded = {name: load_dinov2(path, config_overrides=heads) for name, (path, heads) in sources.items()}
    tensors, shapes = load_tensors(str(pth)), file_shapes(str(pth))
    assert {k: v.shape for k, v in shapes.items()} == {k: v.shape for k, v in tensors.items()}
    assert all(not any(v.strides) for v in shapes.values())  # stand-ins: no data behind them

    def no_weights(*_):
        raise AssertionError("weights read")

    monkeypatch.setattr(convert_dinov2, "load_tensors", no_weights)
    for name, (path, heads) in sources.items():
        abstract = abstract_dinov2(path, config_overrides=heads)
        assert abstract.cfg == loaded[name].cfg, name
        want = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(loaded[name]))
        assert jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(abstract)) == want, name
