"""Export packages: they load without the run, give the checkpoint's embeddings, and the
vision tower loads into PyTorch transformers with the same features."""

import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

import mama_jax
from configs import export as export_config
from mama_jax import export, factory
from mama_jax.input import captions, pipeline, tokenizer as tok_lib
from mama_jax.input.augment import eval_transform
from mama_jax.evaluate import restore
from mama_jax.losses import l2_normalize


@pytest.fixture(scope="module")
def exported(pretrained_workdir, tmp_path_factory):
    """(package path, the checkpoint's model, its tokenizer, its pretraining config)."""
    job_dir = str(tmp_path_factory.mktemp("export_job"))
    cfg = export_config.get_config()
    cfg.pretrain_workdir = pretrained_workdir
    result = export.run(cfg, job_dir)
    assert result["out_dir"] == os.path.join(job_dir, "export") and result["step"] == 3
    model, tok, _ = restore.restore_model(pretrained_workdir)
    return result["out_dir"], model, tok, restore.load_pretrain_config(pretrained_workdir)


@pytest.fixture(scope="module")
def records(exported):
    _, _, _, cfg = exported
    source = pipeline.open_split(cfg.data.dataset_dir, "test")
    return [source[i] for i in range(min(3, len(source)))]


def test_package_gives_the_checkpoint_embeddings(exported, records):
    path, model, tok, cfg = exported
    assert sorted(os.listdir(path)) == ["config.json", "model_config.json", "state", "tokenizer", "vit_hf"]
    package = mama_jax.load(path)
    assert package.step == 3 and package.image_size == cfg.data.image_size

    images = np.stack([package.preprocess(r["image"]) for r in records])
    np.testing.assert_array_equal(images[0], eval_transform(records[0]["image"], cfg.data.image_size))
    want = np.asarray(l2_normalize(model.encode_images(images)))
    got = package.encode_images(images)
    assert got.shape == (len(records), cfg.model.embed_dim)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    texts = [captions.build_caption(r, style=cfg.data.caption_style, mask_prob=0.0) for r in records]
    enc = tok_lib.encode_captions(tok, texts, cfg.data.max_length)
    want_t = np.asarray(l2_normalize(model.encode_texts(enc.input_ids, enc.attention_mask)))
    np.testing.assert_allclose(package.encode_texts(texts), want_t, atol=1e-5)

    prompts = captions.zero_shot_prompts("density", prefix="none")
    probs = package.zero_shot(images, prompts)
    assert probs.shape == (len(records), len(prompts)) and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    scores = np.exp(float(model.logit_scale[...])) * want @ package.encode_texts(prompts).T
    want_p = np.exp(scores - scores.max(1, keepdims=True))
    np.testing.assert_allclose(probs, want_p / want_p.sum(1, keepdims=True), atol=1e-5)


def test_saved_tokenizer_gives_the_same_ids(exported):
    path, _, tok, _ = exported
    back = tok_lib.load_tokenizer(os.path.join(path, "tokenizer"))
    assert len(back.hf) == len(tok.hf) and back.num_added_tokens == 0  # nothing added twice
    text = "Procedure: screening; BI-RADS Category 2. Breast composition: dense."
    np.testing.assert_array_equal(tok_lib.encode_caption(back, text, 48).input_ids,
                                  tok_lib.encode_caption(tok, text, 48).input_ids)


def test_vit_hf_matches_the_flax_tower_in_pytorch(exported):
    torch = pytest.importorskip("torch")
    from flax import nnx
    from transformers import AutoModel, Dinov2WithRegistersModel

    from mama_jax.models.convert_dinov2 import load_dinov2

    path, model, _, cfg = exported
    vit = model.vision
    hf, info = AutoModel.from_pretrained(os.path.join(path, "vit_hf"), output_loading_info=True)
    assert isinstance(hf, Dinov2WithRegistersModel) and vit.cfg.num_registers > 0
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    hf.eval()
    rng = np.random.default_rng(0)
    size = cfg.data.image_size
    forward = nnx.jit(lambda m, images: m(images))
    for side in (size, 2 * size):  # native grid, then a resized position table
        x = rng.normal(size=(2, side, side, 3)).astype(np.float32)
        with torch.no_grad():
            out = hf(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
        ours = forward(vit, x)
        np.testing.assert_allclose(out.pooler_output.numpy(), np.asarray(ours.cls), atol=1e-4)
        np.testing.assert_allclose(out.last_hidden_state[:, 1 + vit.cfg.num_registers:].numpy(),
                                   np.asarray(ours.patch_tokens), atol=1e-4)
    # Our own transformers reader takes the folder back to the same tensors.
    back = load_dinov2(os.path.join(path, "vit_hf"), scan_layers=vit.cfg.scan_layers)
    np.testing.assert_array_equal(np.asarray(back.blocks.mlp.fc1.kernel[...]),
                                  np.asarray(vit.blocks.mlp.fc1.kernel[...]))
    np.testing.assert_array_equal(np.asarray(back.patch_embed.kernel[...]),
                                  np.asarray(vit.patch_embed.kernel[...]))


def test_plain_unscanned_tower_exports_as_dinov2model(tmp_path):
    torch = pytest.importorskip("torch")
    import jax
    from flax import nnx
    from transformers import AutoModel, Dinov2Model

    from mama_jax.models import vit as vit_lib
    from mama_jax.export.hf import export_dinov2_hf

    cfg = vit_lib.vit_config("tiny", num_registers=0, scan_layers=False)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: vit_lib.VisionTransformer(cfg, rngs=nnx.Rngs(0))))
    # Random values everywhere (norms, layer scales, mask token too), no init program to compile.
    rng = np.random.default_rng(1)
    nnx.replace_by_pure_dict(state, jax.tree.map(
        lambda a: np.asarray(rng.normal(0.0, 0.3, a.shape), np.float32), nnx.to_pure_dict(state)))
    vit = nnx.merge(graphdef, state)
    hf, info = AutoModel.from_pretrained(export_dinov2_hf(vit, str(tmp_path / "plain")),
                                         output_loading_info=True)
    assert isinstance(hf, Dinov2Model)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    x = np.random.default_rng(1).normal(size=(2, 56, 56, 3)).astype(np.float32)
    with torch.no_grad():
        out = hf.eval()(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
    ours = nnx.jit(lambda m, images: m(images))(vit, x)
    np.testing.assert_allclose(out.last_hidden_state[:, 0].numpy(), np.asarray(ours.cls), atol=1e-4)
    np.testing.assert_allclose(out.last_hidden_state[:, 1:].numpy(), np.asarray(ours.patch_tokens), atol=1e-4)


def _edit_json(path, edit):
    with open(path) as f:
        d = json.load(f)
    edit(d)
    with open(path, "w") as f:
        json.dump(d, f)


def test_tampered_package_is_refused(exported, tmp_path):
    path = exported[0]
    edited = str(tmp_path / "edited")
    shutil.copytree(path, edited)
    _edit_json(os.path.join(edited, "config.json"), lambda d: d["config"]["model"].update(embed_dim=99))
    with pytest.raises(export.PackageError, match=r"config\.json: config\.model\.embed_dim=99"):
        mama_jax.load(edited)
    # Both configs edited consistently: the stored state no longer fits.
    _edit_json(os.path.join(edited, "model_config.json"), lambda d: d["mama"].update(embed_dim=99))
    with pytest.raises(export.PackageError, match=r"state: state does not match .*img_global/kernel"):
        mama_jax.load(edited)
    with pytest.raises(export.PackageError, match="config.json: missing"):
        mama_jax.load(str(tmp_path))
    no_tokenizer = str(tmp_path / "no_tokenizer")
    shutil.copytree(path, no_tokenizer)
    shutil.rmtree(os.path.join(no_tokenizer, "tokenizer"))
    with pytest.raises(export.PackageError, match="tokenizer: missing tokenizer folder"):
        mama_jax.load(no_tokenizer)


def test_export_refuses_bad_input(exported, tmp_path):
    _, model, tok, cfg = exported
    other = tmp_path / "not_a_package"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(export.PackageError, match="not an export package"):
        export.write_package(model, tok, {}, 3, str(other))
    assert (other / "notes.txt").read_text() == "keep me"
    missing = ml_collections.ConfigDict(dict(mode="export", pretrain_workdir="", out_dir="", step=-1))
    with pytest.raises(factory.ConfigError, match="pretrain_workdir"):
        export.run(missing, str(tmp_path))


def test_import_mama_jax_does_not_import_jax():
    code = "import sys, mama_jax; assert callable(mama_jax.load); print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
