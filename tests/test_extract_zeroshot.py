"""Embedding extraction and zero-shot classification on the tiny pretrained run."""

import json
import math
import os

import numpy as np
import pytest
from flax import nnx

from configs import extract as extract_config
from configs import zeroshot as zeroshot_config
from mama_jax import factory
from mama_jax.input import captions, pipeline
from mama_jax.input.augment import eval_transform
from mama_jax.evaluate import extract, metrics, restore, zeroshot
from mama_jax.input.tokenizer import encode_captions


def _text(v):
    v = v.item() if isinstance(v, np.ndarray) else v
    return v.decode() if isinstance(v, bytes) else v


# The model's own methods, jitted only because op-by-op execution is slow on CPU.
encode_texts = nnx.jit(lambda model, ids, mask: model.encode_texts(ids, mask))
encode_images = nnx.jit(lambda model, images: model.encode_images(images))


@pytest.fixture(scope="module")
def model_and_tok(pretrained_workdir):
    model, tok, _ = restore.restore_model(pretrained_workdir)
    return model, tok


@pytest.fixture(scope="module")
def zs_runs(pretrained_workdir, tmp_path_factory):
    """The same zero-shot run on the train split (36 images), single and double softmax."""
    out = {}
    for double in (False, True):
        cfg = zeroshot_config.get_config()
        cfg.pretrain_workdir = pretrained_workdir
        cfg.split = "train"
        cfg.tasks = ("density", "birads")
        cfg.double_softmax = double
        cfg.bootstrap = 0 if double else 20
        cfg.batch_size = 16
        cfg.max_length = 128  # the test run trained at 64 tokens: prefixed prompts would be cut
        workdir = str(tmp_path_factory.mktemp(f"zs_double{int(double)}"))
        out[double] = (zeroshot.run(cfg, workdir), workdir)
    return out


def test_extract_writes_every_record(pretrained_workdir, tiny_dataset, model_and_tok, tmp_path):
    cfg = extract_config.get_config()
    cfg.pretrain_workdir = pretrained_workdir
    cfg.splits = ("test",)
    cfg.batch_size = 3  # 4 records: the last batch is padded
    result = extract.run(cfg, str(tmp_path))
    source = pipeline.open_split(tiny_dataset, "test")
    with np.load(os.path.join(tmp_path, "embeddings_test.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    n = len(source)
    assert result["n_test"] == n
    model, _ = model_and_tok
    d, dv = model.cfg.embed_dim, model.cfg.vit.hidden
    assert arrays["image_emb"].shape == (n, d) and arrays["image_emb"].dtype == np.float32
    assert arrays["pooled"].shape == (n, dv) and arrays["pooled"].dtype == np.float32
    assert np.isfinite(arrays["image_emb"]).all() and np.isfinite(arrays["pooled"]).all()
    for i in range(n):
        record = source[i]
        for k in extract.ID_FIELDS:
            assert arrays[k][i] == _text(record[k]), k
        for k in extract.FLAG_FIELDS + ("birads", "cancer"):
            assert arrays[k][i] == int(record[k]), k
        assert arrays["density"][i] == pipeline.density_label(int(record["density"]))
    # the embedding of one record equals the model's own forward on its eval image
    size = restore.load_pretrain_config(pretrained_workdir).data.image_size
    image = eval_transform(source[2]["image"], size)[None]
    expected = np.asarray(encode_images(model, image))[0]
    np.testing.assert_allclose(arrays["image_emb"][2], expected, atol=1e-5, rtol=1e-5)
    # every row is distinct (no row copied from padding or another record)
    assert len(np.unique(arrays["image_emb"].round(5), axis=0)) == n


def test_zero_shot_scores_match_a_numpy_recomputation(zs_runs, pretrained_workdir, tiny_dataset,
                                                      model_and_tok):
    result, workdir = zs_runs[False]
    model, tok = model_and_tok
    pcfg = restore.load_pretrain_config(pretrained_workdir)
    source = pipeline.open_split(tiny_dataset, "train")
    scale = math.exp(float(np.asarray(model.logit_scale[...])))
    for task in ("density", "birads"):
        with np.load(os.path.join(workdir, f"zeroshot_{task}_train.npz")) as z:
            per = {k: z[k] for k in z.files}
        row = len(per["index"]) // 2
        record = source[int(per["index"][row])]
        assert per["image_id"][row] == _text(record["image_id"])
        prompts = captions.zero_shot_prompts(task, record, prefix="official")
        enc = encode_captions(tok, prompts, result["max_length"])
        assert not enc.truncated.any()
        txt = np.asarray(encode_texts(model, enc.input_ids, enc.attention_mask), np.float64)
        img = np.asarray(encode_images(model, eval_transform(record["image"], pcfg.data.image_size)[None]),
                         np.float64)[0]
        cos = (txt / np.linalg.norm(txt, axis=1, keepdims=True)) @ (img / np.linalg.norm(img))
        scores = scale * cos
        probs = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        np.testing.assert_allclose(per["scores"][row], scores, atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(per["probs"][row], probs, atol=1e-5)
        # the label of that image is the record's own
        expected = pipeline.density_label(int(record["density"])) if task == "density" else int(record["birads"])
        assert per["label"][row] == expected


def test_zero_shot_json_structure(zs_runs):
    result, workdir = zs_runs[False]
    with open(os.path.join(workdir, "zeroshot.json")) as f:
        saved = json.load(f)
    assert saved["split"] == "train" and saved["prefix"] == "official" and saved["double_softmax"] is False
    source_counts = {"density": 36, "birads": 36}  # the tiny train split: every label known
    for task, entry in saved["tasks"].items():
        assert set(entry) >= {"metrics", "n", "ci", "example", "n_unknown_label", "n_prompt_sets"}
        assert entry["n"] == source_counts[task] and entry["n_unknown_label"] == 0
        assert entry["truncated_prompts"] == 0
        m = entry["metrics"]
        assert m["num_classes"] == len(captions.CLASS_NAMES[task])
        assert sum(map(sum, m["confusion"])) == entry["n"]
        assert 0.0 <= m["balanced_accuracy"] <= 1.0
        lo, hi = entry["ci"]["balanced_accuracy"]
        assert lo <= hi
        # official prefix: the image's own metadata precedes the class sentences
        assert len(entry["example"]["prompts"]) == len(captions.CLASS_NAMES[task])
        assert entry["example"]["prompts"][0].startswith("Procedure reported:")
        assert entry["n_prompt_sets"] > 1  # prompts differ between images
        assert result[f"{task}/balanced_accuracy"] == pytest.approx(m["balanced_accuracy"])
    # metrics are those of the saved probabilities
    with np.load(os.path.join(workdir, "zeroshot_birads_train.npz")) as z:
        again = metrics.summary(z["label"], z["probs"])
    reported = saved["tasks"]["birads"]["metrics"]["balanced_accuracy"]
    assert again["balanced_accuracy"] == pytest.approx(reported)


def test_double_softmax_squashes_probabilities_not_predictions(zs_runs):
    (_, single_dir), (double_result, double_dir) = zs_runs[False], zs_runs[True]
    for task in ("density", "birads"):
        with np.load(os.path.join(single_dir, f"zeroshot_{task}_train.npz")) as a, \
                np.load(os.path.join(double_dir, f"zeroshot_{task}_train.npz")) as b:
            np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-6)
            assert not np.allclose(a["probs"], b["probs"], atol=1e-4)
            np.testing.assert_array_equal(a["probs"].argmax(1), b["probs"].argmax(1))
            np.testing.assert_allclose(b["probs"], zeroshot.softmax(a["probs"]), atol=1e-6)
            # the AUC reported with the option is the AUC of the squashed scores
            auc = metrics.summary(b["label"], b["probs"])["auc"]
        reported = double_result["tasks"][task]["metrics"]["auc"]
        assert (math.isnan(auc) and math.isnan(reported)) or reported == pytest.approx(auc)


def test_task_without_labels_is_a_clear_error(pretrained_workdir, tiny_dataset, monkeypatch, tmp_path):
    real = pipeline.open_split(tiny_dataset, "test")
    unlabelled = [{**real[i], "cancer": np.int32(-1)} for i in range(len(real))]
    monkeypatch.setattr(pipeline, "open_split", lambda dataset_dir, split: unlabelled)
    cfg = zeroshot_config.get_config()
    cfg.pretrain_workdir = pretrained_workdir
    cfg.tasks = ("cancer",)
    with pytest.raises(ValueError, match="dataset has no cancer labels"):
        zeroshot.run(cfg, str(tmp_path))


def test_bad_configs_are_named(tmp_path):
    cfg = zeroshot_config.get_config()
    with pytest.raises(factory.ConfigError, match="pretrain_workdir"):
        zeroshot.run(cfg, str(tmp_path))
    cfg.pretrain_workdir = str(tmp_path)
    cfg.tasks = ("mass",)
    with pytest.raises(ValueError, match="unknown task 'mass'"):
        zeroshot.run(cfg, str(tmp_path))


def test_aggregate_means_probabilities_and_takes_the_max_label():
    probs = np.array([[0.8, 0.2], [0.4, 0.6], [0.1, 0.9]], np.float32)
    labels = np.array([0, 1, 0], np.int32)
    keys = zeroshot.group_keys({"study_id": np.array(["s1", "s1", "s2"]),
                                "laterality": np.array(["L", "L", "R"])}, "breast")
    p, y, uniq = zeroshot.aggregate(probs, labels, keys)
    assert list(uniq) == ["s1|L", "s2|R"]
    np.testing.assert_allclose(p, [[0.6, 0.4], [0.1, 0.9]], atol=1e-6)
    np.testing.assert_array_equal(y, [1, 0])
    assert zeroshot.group_keys({}, "image") is None


def test_zero_shot_also_scores_the_flagged_test_subset(pretrained_workdir, monkeypatch, tmp_path):
    """Where records flag the paper's class-stratified test subset, zero-shot scores it
    beside the whole split: its metrics are those of the flagged images' own probabilities."""
    real = extract.extract_split

    def half_flagged(*args, **kwargs):
        arrays = real(*args, **kwargs)
        for task in ("density", "birads"):
            flags = np.zeros_like(arrays[f"in_{task}_test_subset"])
            flags[::2] = 1  # a strict subset: every other image
            arrays[f"in_{task}_test_subset"] = flags
        return arrays

    monkeypatch.setattr(extract, "extract_split", half_flagged)
    cfg = zeroshot_config.get_config()
    cfg.update(dict(pretrain_workdir=pretrained_workdir, split="test", tasks=("density", "birads"),
                    bootstrap=0, batch_size=16, max_length=128))
    result = zeroshot.run(cfg, str(tmp_path))
    for task in ("density", "birads"):
        entry = result["tasks"][task]
        with np.load(os.path.join(tmp_path, f"zeroshot_{task}_test.npz")) as z:
            probs, labels, index = z["probs"], z["label"], z["index"]
        inside = index % 2 == 0  # the extracted arrays are in record order
        want = metrics.summary(labels[inside], probs[inside],
                               class_names=list(captions.CLASS_NAMES[task]))
        got = entry["subsets"]["test_subset"]
        assert got["n"] == int(inside.sum()) < entry["n"]
        assert got["metrics"]["balanced_accuracy"] == pytest.approx(want["balanced_accuracy"])
    with open(os.path.join(tmp_path, "zeroshot.json")) as f:
        assert "test_subset" in json.load(f)["tasks"]["density"]["subsets"]
