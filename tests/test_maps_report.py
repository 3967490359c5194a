"""Similarity maps (paper Fig. 3) and the evaluation report."""

import json
import os

import matplotlib.image as mpimg
import numpy as np
import pytest

from configs import maps as maps_config
from configs import report as report_config
from mama_jax import factory
from mama_jax.input import captions, pipeline
from mama_jax.input.augment import eval_transform
from mama_jax.evaluate import map_scores, maps, report, restore
from mama_jax.input.tokenizer import encode_captions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def restored(pretrained_workdir):
    model, tok, _ = restore.restore_model(pretrained_workdir)
    return model, tok, restore.load_pretrain_config(pretrained_workdir)


@pytest.fixture(scope="module")
def mass_record(tiny_dataset):
    source = pipeline.open_split(tiny_dataset, "train")
    for i in range(len(source)):
        if source[i]["mass_shape"] and source[i]["birads"] >= 0:
            return source[i]
    pytest.fail("the tiny dataset has no train record with a mass and a BI-RADS")


# ----------------------------------------------------------------------------- sentences

def test_find_sentence_follows_the_tokenizer_sentence_rule():
    caption = ("Procedure reported: MG Screening;\nReason for procedure: screening;\n"
               "Findings: The mammogram shows that a benign finding is present. "
               "The mass is oval and equal density.\nImpressions: BI-RADS Category 2: benign finding.")
    assert maps.split_sentences(caption)[3] == "The mass is oval and equal density"
    assert maps.find_sentence(caption, "Procedure") == 0
    assert maps.find_sentence(caption, "Reason") == 1  # ";" ends a sentence too
    assert maps.find_sentence(caption, "The mass") == 3
    assert maps.find_sentence(caption, "Impressions") == 4
    # Text after the last sentence end has no SEP token, so it is no sentence.
    assert maps.split_sentences("A. B; trailing") == ["A", "B"]
    with pytest.raises(ValueError, match="Overall"):
        maps.find_sentence(caption, "Overall")


def test_sentences_line_up_with_sep_tokens(restored, mass_record):
    model, tok, _ = restored
    caption = captions.build_caption(mass_record, style="structured")
    ids = encode_captions(tok, [caption], 256).input_ids[0]
    assert int((ids == tok.sep_id).sum()) == len(maps.split_sentences(caption))


# ----------------------------------------------------------------------------- maps

def test_map_is_the_cosine_of_the_local_embeddings(restored, mass_record):
    model, tok, pcfg = restored
    size = pcfg.data.image_size
    image = eval_transform(mass_record["image"], size)
    caption = captions.build_caption(mass_record, style="structured")
    k = maps.find_sentence(caption, "The mass")
    sim = maps.sentence_patch_map(model, tok, image, caption, k, 160)
    assert sim.shape == (size // 14, size // 14)

    # Independent recomputation, eager, from the same model pieces.
    _, patch_tokens = model.image_features(image[None])
    patches = _unit(model.img_local(patch_tokens, train=False))[0]
    enc = encode_captions(tok, [caption], 160)
    ids = np.asarray(enc.input_ids)[0]
    seps = np.nonzero(ids == model.cfg.sep_id)[0][:model.cfg.max_sentences]
    if model.cfg.sentence_features == "token_mean":  # each sentence's mean token embedding
        embeds = np.asarray(model.text.embed_tokens(enc.input_ids))[0]
        starts = np.concatenate([[0], seps[:-1] + 1])
        rows = [embeds[a:b + 1].mean(0) for a, b in zip(starts, seps)]
    else:  # the LM's state at each SEP
        hidden = np.asarray(model.text_states(enc.input_ids, enc.attention_mask, train=False))[0]
        rows = [hidden[p] for p in seps]
    rows += [np.zeros_like(rows[0])] * (model.cfg.max_sentences - len(rows))
    valid = np.arange(model.cfg.max_sentences)[None] < len(seps)
    sent = _unit(model.txt_local(np.stack(rows)[None], valid, train=False))[0]
    expected = (patches @ sent[k]).reshape(sim.shape)
    np.testing.assert_allclose(sim, expected, atol=1e-5)

    n = int(np.asarray(valid).sum())
    np.testing.assert_allclose(maps.sentence_patch_map(model, tok, image, caption, -1, 160),
                               (patches @ sent[n - 1]).reshape(sim.shape), atol=1e-5)
    with pytest.raises(ValueError, match=f"{n} sentences"):
        maps.sentence_patch_map(model, tok, image, caption, n, 160)
    every = maps.sentence_patch_maps(model, tok, image, caption, 160)  # one pass, all sentences
    np.testing.assert_allclose(every, (sent[:n] @ patches.T).reshape((n,) + sim.shape), atol=1e-5)


def test_overlay_png_has_the_image_size_and_shows_the_heat(tmp_path):
    image = np.full((100, 80), 30000, np.uint16)
    sim = np.zeros((4, 4), np.float32)
    sim[0, 0] = 1.0  # hot top-left corner, cold elsewhere
    path = maps.overlay_png(image, sim, str(tmp_path / "sub" / "m.png"), "Impressions")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    rgb = mpimg.imread(path)
    assert rgb.shape[:2] == (100, 80)
    hot, cold = rgb[2, 2, :3], rgb[-2, -2, :3]
    assert hot[0] > hot[2] and cold[2] > cold[0]  # jet: red where similar, blue where not

    canvas = np.linspace(-1, 1, 56 * 56 * 3, dtype=np.float32).reshape(56, 56, 3)
    path = maps.overlay_png(canvas, sim, str(tmp_path / "f.png"), "")
    assert mpimg.imread(path).shape[:2] == (56, 56)
    with pytest.raises(ValueError, match="sim_map"):
        maps.overlay_png(image, sim[0], str(tmp_path / "bad.png"), "")


def test_overlay_png_outlines_the_boxes(tmp_path):
    image = np.zeros((60, 60), np.uint16)
    path = maps.overlay_png(image, np.zeros((2, 2), np.float32), str(tmp_path / "b.png"), "",
                            boxes=[(10, 20, 30, 40)])
    rgb = mpimg.imread(path)[..., :3]
    assert rgb[10, 25].min() == 1.0 and rgb[29, 39].min() == 1.0  # white outline
    assert rgb[20, 30].max() < 1.0 and rgb[5, 5].max() < 1.0  # inside and outside are not


# ----------------------------------------------------------------------------- lesion scores

def test_roi_scores_of_a_map_with_a_known_hot_spot():
    breast = np.zeros((112, 112), bool)
    breast[:, :84] = True                          # the breast fills the left 6 of 8 columns
    box = [(30, 30, 40, 40)]                       # inside patch cell (2, 2) (14 px cells)
    sim = np.zeros((8, 8), np.float32)
    sim[2, 2] = 1.0
    hot = map_scores.roi_scores(sim, breast, box)
    assert hot["hit"] and hot["peak_rank"] == 1 and hot["peak_percentile"] == 100.0
    assert hot["lift"] > 5
    assert hot["chance_hit"] == pytest.approx(1 / 48)  # one box cell among 6 x 8 breast cells
    assert hot["box_fraction"] == pytest.approx(100 / (112 * 84))
    cold = map_scores.roi_scores(-sim, breast, box)
    assert not cold["hit"] and cold["peak_rank"] == 48 and cold["lift"] < 0.5
    # Rank on the patch grid: 1 + the breast patches outside the box that are hotter.
    rng = np.random.default_rng(0)
    sim = rng.permutation(64).reshape(8, 8).astype(np.float32)
    got = map_scores.roi_scores(sim, breast, box)
    others = np.delete(sim[:, :6].ravel(), 2 * 6 + 2)
    assert got["peak_rank"] == 1 + int((others > sim[2, 2]).sum())
    assert got["peak_percentile"] == pytest.approx(100 * (others < sim[2, 2]).mean())
    # Heat in the box: the more of the map's heat sits there, the higher the lift.
    ramp = np.tile(np.arange(8, dtype=np.float32), (8, 1))  # hot to the right
    assert map_scores.roi_scores(ramp, breast, [(0, 70, 112, 84)])["lift"] > 1.5
    assert map_scores.roi_scores(ramp, breast, [(0, 0, 112, 14)])["lift"] < 0.5
    assert map_scores.roi_scores(sim, breast, []) is None


def test_roi_scores_ignore_the_part_of_a_box_outside_the_breast():
    breast = np.zeros((112, 112), bool)
    breast[:, :84] = True                          # breast: cell columns 0-5; air: 6-7
    box = [(30, 75, 40, 105)]                      # row 2, from cell column 5 into the air
    sim = np.zeros((8, 8), np.float32)
    sim[:, 6:] = 1.0                               # a map that lights the air, not the lesion
    sim[2, 0] = 0.5                                # the breast's hottest cell is elsewhere
    got = map_scores.roi_scores(sim, breast, box)
    assert not got["hit"] and got["peak_rank"] == 2        # box cell (2, 5) vs 47 others
    assert got["chance_hit"] == pytest.approx(1 / 48)
    assert got["box_fraction"] == pytest.approx(10 * 9 / (112 * 84))
    cut = map_scores.roi_scores(sim, breast, [(30, 75, 40, 84)])  # the box cut at the skin line
    assert got == cut                              # the air part of the box changes nothing
    assert map_scores.roi_scores(sim, breast, [(30, 90, 40, 105)]) is None  # box wholly in the air


def test_boxes_from_records_onto_the_canvas():
    assert map_scores.record_boxes({"image_id": b"x"}) == []          # dataset from before the field
    assert map_scores.record_boxes({"roi_boxes": b""}) == []
    assert map_scores.record_boxes({"roi_boxes": b"1,2,3,4;5,6,7,9"}) == [(1, 2, 3, 4), (5, 6, 7, 9)]
    with pytest.raises(ValueError, match="roi_boxes"):
        map_scores.record_boxes({"roi_boxes": b"1,2,3"})
    # A 100 x 50 image on a 200 px canvas: scaled by 2 and centred (50 px padding left).
    assert map_scores.canvas_boxes([(10, 10, 21, 20)], (100, 50), 200) == [(20, 70, 42, 90)]
    canvas = np.zeros((40, 40), np.float32)
    canvas[5:35, 10:30] = 0.6
    mask = map_scores.breast_mask(canvas)
    assert mask[20, 20] and not mask[2, 2] and mask.sum() == 600


def test_choose_records_takes_mass_images_first_or_the_given_ids():
    source = [{"image_id": b"a", "mass_shape": b""}, {"image_id": b"b", "mass_shape": b"oval"},
              {"image_id": b"c", "mass_shape": b" "}, {"image_id": b"d", "mass_shape": b"round"}]
    assert maps.choose_records(source, 3) == [1, 3, 0]
    assert maps.choose_records(source, 9) == [1, 3, 0, 2]
    assert maps.choose_records(source, 1, ("c", "a")) == [2, 0]
    with pytest.raises(KeyError, match="zz"):
        maps.choose_records(source, 1, ("a", "zz"))
    with pytest.raises(ValueError, match="num_images"):
        maps.choose_records(source, 0)


def test_run_writes_maps_for_mass_images_first(pretrained_workdir, tiny_dataset, tmp_path):
    cfg = maps_config.get_config()
    with pytest.raises(factory.ConfigError, match="pretrain_workdir"):
        maps.run(cfg, str(tmp_path))
    cfg.pretrain_workdir = pretrained_workdir
    cfg.num_images = 3
    cfg.display_size = 0  # the model's own image size: keeps the test quick
    result = maps.run(cfg, str(tmp_path))

    source = pipeline.open_split(tiny_dataset, "test")
    has_mass = [bool(source[i]["mass_shape"]) for i in range(len(source))]
    expected = ([i for i, m in enumerate(has_mass) if m]
                + [i for i, m in enumerate(has_mass) if not m])[:3]
    with open(os.path.join(tmp_path, "maps", "maps.json")) as f:
        written = json.load(f)
    assert result["num_maps"] == len(written["maps"]) > 0
    chosen = list(dict.fromkeys(m["record_index"] for m in written["maps"] + written["skipped"]
                                if "record_index" in m))
    assert chosen == expected
    size = restore.load_pretrain_config(pretrained_workdir).data.image_size
    for entry in written["maps"]:
        assert entry["sentence"].startswith(entry["query"])
        assert entry["grid"] == [size // 14, size // 14] and entry["min"] <= entry["max"]
        assert mpimg.imread(entry["png"]).shape[:2] == (size, size)
        assert has_mass[entry["record_index"]] or entry["query"] != "The mass"
    queries = {(m["record_index"], m["query"]) for m in written["maps"]}
    for i in expected:
        assert (i, "The mass" if has_mass[i] else "Impressions") in queries
    # Every record with lesion boxes is scored, drawn or not; drawn ones carry their score.
    with_boxes = [i for i in range(len(source)) if source[i]["roi_boxes"]]
    assert with_boxes and {s["record_index"] for s in written["roi_scores"]} == set(with_boxes)
    for entry in written["maps"]:
        assert ("roi" in entry) == (entry["record_index"] in with_boxes)
    # ... every sentence of it, under its kind, so one sees which sentences find the lesion.
    for i in with_boxes:
        caption = captions.build_caption(source[i], style="structured")
        rows = [s for s in written["roi_scores"] if s["record_index"] == i]
        assert [s["sentence"] for s in rows] == maps.split_sentences(caption)
        assert all(s["query"] == captions.sentence_kind(s["sentence"]) for s in rows)
    summary = written["roi_summary"]
    assert set(summary) == {s["query"] for s in written["roi_scores"]}
    assert {"Procedure reported", "Breast composition", "Impressions"} <= set(summary)
    for query, v in summary.items():
        lifts = [s["lift"] for s in written["roi_scores"] if s["query"] == query]
        assert v["n"] == len(lifts) and v["mean_lift"] == pytest.approx(np.mean(lifts))
        assert 0 <= v["chance_hit_rate"] <= 1


# ----------------------------------------------------------------------------- report

def _summary(bacc, auc, confusion, names):
    return {"balanced_accuracy": bacc, "auc": auc, "accuracy": bacc, "confusion": confusion,
            "per_class_recall": [row[i] / max(sum(row), 1) for i, row in enumerate(confusion)],
            "support": [sum(r) for r in confusion], "class_names": names, "n": 6}


def _write_results(workdir):
    names = list(captions.CLASS_NAMES["density"])
    cm = [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    zs = {"step": 600, "split": "test", "prefix": "official", "aggregate": "image", "tasks": {
        "density": {"metrics": _summary(0.7512, 0.93456, cm, names), "n": 6,
                    "ci": {"balanced_accuracy": [0.6, 0.88], "auc": [0.9, None]},
                    "subsets": {"test_subset": {"metrics": _summary(0.8, 0.95, cm, names),
                                                "n": 4, "ci": {}}}}}}
    # linear_probe.json layout: per fraction an "eval" dict of metrics.summary + "ci95".
    lp = {"tasks": {"density": {"fractions": {
        "0.01": {"eval": {"test": {**_summary(0.5, 0.81234, cm, names),
                                   "ci95": {"balanced_accuracy": [0.41, 0.59]}}},
                 "warnings": ["train sample at fraction 0.01 holds 2 of 4 classes"]},
        "1.0": {"eval": {"test": _summary(0.625, 0.9, cm, names),
                         "test_subset": _summary(0.6, 0.88, cm, names)}}}}}}
    # finetune_<task>.json layout: tasks/<task>/eval/<split> = metrics.summary + "ci95".
    fft = {"task": "density", "tasks": {"density": {"eval": {"test": {
        **_summary(0.7, 0.91, cm, names), "ci95": {"balanced_accuracy": [0.65, 0.75]}}}}}}
    with open(os.path.join(workdir, "finetune_density.json"), "w") as f:
        json.dump(fft, f)
    with open(os.path.join(workdir, "zeroshot.json"), "w") as f:
        json.dump(zs, f)
    with open(os.path.join(workdir, "linear_probe.json"), "w") as f:
        json.dump(lp, f)
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 1, 2, 3, 3])
    probs = rng.dirichlet(np.ones(4), size=6).astype(np.float32)
    np.savez(os.path.join(workdir, "zeroshot_density_test.npz"), label=labels, probs=probs)
    png = maps.overlay_png(np.ones((8, 8), np.uint16), np.eye(2),
                           os.path.join(workdir, "maps", "a.png"), "")
    with open(os.path.join(workdir, "maps", "maps.json"), "w") as f:
        json.dump({"checkpoint_step": 3, "split": "test", "maps": [
            {"image_id": "img1", "query": "Impressions", "sentence": "Impressions: BI-RADS 2",
             "png": png, "min": -0.25, "max": 0.5,
             "roi": {"lift": 1.5, "peak_rank": 2}}],
            "roi_summary": {"The mass": {"n": 3, "mean_lift": 1.75, "median_lift": 1.5,
                                         "hit_rate": 2 / 3, "chance_hit_rate": 0.05,
                                         "mean_peak_percentile": 97.25}},
            "skipped": [{"image_id": "img2", "query": "The mass", "reason": "no sentence"}]}, f)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step in (1, 2, 3):
            f.write(json.dumps({"step": step, "total": 9.0 - step, "vt_1": 2.0, "vv": 3.0,
                                "local": 2.5, "logit_scale": 2.65}) + "\n")


def test_report_tables_and_figures(tmp_path):
    workdir = str(tmp_path)
    _write_results(workdir)
    result = report.run(report_config.get_config(), workdir)
    with open(os.path.join(workdir, "report.md")) as f:
        md = f.read()
    # Table 2 layout: ZS, LP 1 %, 10 %, 100 %, FFT as "bACC [CI] / AUC [CI]" in %; the
    # paper's test subset first where flagged, then the whole test split.
    assert "| MaMA (this run), test subset | 80.00 / 95.00 | not run | not run | 60.00 / 88.00 | " \
           "not run |\n| MaMA (this run), whole test split | 75.12 [60.00, 88.00] / 93.46 | " \
           "50.00 [41.00, 59.00] / 81.23 | not run | 62.50 / 90.00 | 70.00 [65.00, 75.00] / 91.00 |" in md
    assert "| MaMA (paper) | 75.40 / 93.46 | 76.26 / 93.11 | 78.11 / 93.62 | 78.09 / 93.65 | " \
           "78.02 / 93.65 |" in md
    assert "- finetune_<task>.json: tasks density" in md
    assert "| 100% | 62.50 / 90.00 | 60.00 / 88.00 |" in md  # the test subset is listed
    assert "- LP 1%: train sample at fraction 0.01 holds 2 of 4 classes" in md
    assert "EMBED BI-RADS" not in md  # no task results, no table
    assert "1: scattered fibroglandular densities | 50.00 | 2 |" in md
    for name in ("confusion_density_zeroshot.png", "confusion_density_lp1.png",
                 "confusion_density_lp100.png", "roc_density_zeroshot.png", "losses.png"):
        path = os.path.join(workdir, "report", name)
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC, name
        assert f"](report/{name})" in md
    assert "**img1**: \"Impressions: BI-RADS 2\" cosine -0.250..0.500, lesion lift 1.50, " \
           "peak rank 2" in md
    assert "| The mass | 3 | 1.75 | 1.50 | 67% | 5% | 97.2 |" in md
    assert "![Impressions](maps/a.png)" in md and "skipped img2 / The mass: no sentence" in md
    assert result["zeroshot_tasks"] == 1 and result["finetune_tasks"] == 1
    assert result["loss_curves"] == 1 and result["figures"] == 5


def test_report_without_probabilities_has_confusion_only(tmp_path):
    workdir = str(tmp_path)
    _write_results(workdir)
    os.remove(os.path.join(workdir, "zeroshot_density_test.npz"))
    report.run(report_config.get_config(), workdir)
    assert not os.path.exists(os.path.join(workdir, "report", "roc_density_zeroshot.png"))
    assert os.path.exists(os.path.join(workdir, "report", "confusion_density_zeroshot.png"))
    with open(os.path.join(workdir, "report.md")) as f:
        assert "no ROC for density zero-shot" in f.read()


def test_report_with_nothing_says_not_run(tmp_path):
    result = report.run(report_config.get_config(), str(tmp_path))
    with open(result["report"]) as f:
        md = f.read()
    for name in ("zeroshot.json", "linear_probe.json", "maps/maps.json", "metrics.jsonl"):
        assert f"{name}" in md
    assert md.count("not run") >= 6
    assert "Similarity maps: not run" in md and "Loss curves: not run" in md
    assert "Zero-shot: not run. Linear probe: not run." in md
    assert result["figures"] == 0 and result["loss_curves"] == 0


def test_report_rejects_a_broken_results_file(tmp_path):
    (tmp_path / "zeroshot.json").write_text("{not json")
    with pytest.raises(ValueError, match="zeroshot.json"):
        report.run(report_config.get_config(), str(tmp_path))
