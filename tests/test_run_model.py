"""A pretraining workdir describes its model (mama_jax/run_model.py): evaluation, export and
fine-tuning run from the run alone after the source weights and tokenizer have moved."""

import dataclasses
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import demo, extract as extract_config, finetune as finetune_config
from configs import linear_probe as probe_config
from configs import maps as maps_config, zeroshot as zeroshot_config
from mama_jax import export, factory, run_model
from mama_jax.train import pretrain
from mama_jax.evaluate import extract, finetune, linear_probe, maps, restore, zeroshot
from mama_jax.models import convert


def _zeroshot(pretrain_workdir, workdir):
    cfg = zeroshot_config.get_config()
    cfg.update(dict(pretrain_workdir=pretrain_workdir, split="train", tasks=("density",),
                    bootstrap=0, batch_size=16, max_length=128))
    result = zeroshot.run(cfg, workdir)
    return {k: v for k, v in result.items() if isinstance(v, float)}


@pytest.fixture(scope="module")
def run_with_weight_files(tiny_dataset, tmp_path_factory):
    """A 2-step run whose towers and tokenizer came from files, as a user's would: random
    tiny towers saved as converted towers, the demo's BPE as the tokenizer folder."""
    root = tmp_path_factory.mktemp("weights_run")
    cfg = demo.get_config("test")
    cfg.data.dataset_dir = tiny_dataset
    source = root / "source"
    tok = factory.tokenizer(cfg, str(source))  # writes source/tokenizer
    model = factory.model(cfg, tok)
    convert.save_tower(model.vision, str(source / "vit"))
    convert.save_tower(model.text, str(source / "text"))
    cfg.model.update(dict(random_init=False, vit_weights=str(source / "vit"),
                          text_weights=str(source / "text"), tokenizer=str(source / "tokenizer")))
    cfg.train.steps = 2
    workdir = str(root / "run")
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config_pretrain.json"), "w") as f:
        f.write(cfg.to_json_best_effort())
    pretrain.train(cfg, workdir)
    return workdir, source


def _numbers(tree) -> dict:
    """The float leaves of a job's result (its numbers), keyed by path."""
    if isinstance(tree, dict):
        return {f"{k}/{p}": v for k, sub in tree.items() for p, v in _numbers(sub).items()}
    return {"": tree} if isinstance(tree, float) else {}


def _every_job(workdir, out) -> dict:
    """Run extract, linear_probe, finetune and maps from the run; their numbers and arrays."""
    cfg = extract_config.get_config()
    cfg.update(dict(pretrain_workdir=workdir, splits=("train", "test"), batch_size=4))
    extract.run(cfg, out)
    got = {f"{split}/{k}": v for split in ("train", "test")
           for k, v in np.load(os.path.join(out, f"embeddings_{split}.npz")).items()
           if v.dtype.kind == "f"}
    cfg = probe_config.get_config("test")
    cfg.update(dict(pretrain_workdir=workdir, tasks=("density",), fractions=(1.0,),
                    bootstrap=0))
    got["linear_probe"] = _numbers(linear_probe.run(cfg, out))
    cfg = finetune_config.get_config("test")
    cfg.update(dict(pretrain_workdir=workdir, steps=2, bootstrap=0))
    got["finetune"] = _numbers(finetune.run(cfg, out))
    cfg = maps_config.get_config()
    cfg.update(dict(pretrain_workdir=workdir, num_images=1, display_size=0))
    with open(maps.run(cfg, out)["maps_json"]) as f:
        got["maps"] = _numbers(json.load(f))
    assert got["linear_probe"] and got["finetune"] and got["maps"]
    return got


def test_jobs_run_from_the_run_alone_after_the_weights_move(run_with_weight_files, tmp_path):
    workdir, source = run_with_weight_files
    assert run_model.exists(workdir)
    before_model, _, step = restore.restore_model(workdir)
    before_zs = _zeroshot(workdir, str(tmp_path / "zs_before"))
    before = _every_job(workdir, str(tmp_path / "before"))
    shutil.move(str(source), str(tmp_path / "moved"))  # vit, text and tokenizer are gone

    after_model, _, step_after = restore.restore_model(workdir)
    assert step_after == step == 2
    a = nnx.to_flat_state(nnx.state(after_model))
    b = dict(nnx.to_flat_state(nnx.state(before_model)))
    for path, value in a:
        np.testing.assert_array_equal(np.asarray(value), np.asarray(b[path]), err_msg=str(path))
    assert _zeroshot(workdir, str(tmp_path / "zs_after")) == before_zs
    after = _every_job(workdir, str(tmp_path / "after"))
    assert after.keys() == before.keys()
    for key, value in before.items():  # the same model and inputs: the same numbers
        if isinstance(value, dict):
            assert after[key] == value, key
        else:
            np.testing.assert_array_equal(after[key], value, err_msg=key)
    cfg = ml_collections.ConfigDict(dict(mode="export", pretrain_workdir=workdir, out_dir="",
                                         step=-1))
    assert export.run(cfg, str(tmp_path / "export"))["step"] == 2


def test_a_resume_with_another_architecture_is_refused(run_with_weight_files, tmp_path):
    workdir, _ = run_with_weight_files
    mcfg = run_model.read_config(workdir)
    other = dataclasses.replace(mcfg, embed_dim=mcfg.embed_dim * 2)
    with pytest.raises(run_model.RunModelError, match="model.json"):
        run_model.write(workdir, other, run_model.read_tokenizer(workdir))
    copy = tmp_path / "broken"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    with open(os.path.join(run_model.folder(str(copy)), run_model.CONFIG_FILE), "w") as f:
        json.dump({"vit": {}}, f)
    with pytest.raises(run_model.RunModelError, match="model.json"):
        run_model.read_config(str(copy))
