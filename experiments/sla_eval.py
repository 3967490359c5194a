"""Held-out measurements of one pretraining run for experiments/sla_localisation.py.

- `localisation`: every sentence's map scored against the lesion boxes (map_scores.roi_scores),
  summarised per sentence kind; with the local heads' BatchNorm on running statistics
  (how maps.py draws) or on the held-out batch's own statistics (how training sees them).
- `identity`: is the local score high because a lesion sentence finds the lesion, or because
  some patch anywhere encodes the image? The true image's rank among all held-out images
  (a percentile, 0.5 = chance) when eq. 3's max runs over all patches or over all but the
  lesion's; eq. 3's c_v and c_t ranks; and how alike one image's patches are.
- `global_metrics`: zero-shot and linear-probe figures through the project's own jobs.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
from flax import nnx

from mama_jax import losses
from mama_jax.input import captions, pipeline
from mama_jax.input.augment import eval_geometry, eval_transform
from mama_jax.evaluate import extract, linear_probe, map_scores, maps, restore, zeroshot
from mama_jax.input.tokenizer import encode_captions

LESION_KINDS = (captions.MASS_SENTENCE, "Calcification")
DISPLAY = 448  # the canvas boxes and breast masks are scored on (maps.py's default)


def _embed(model, images, ids, mask, bn: str):
    """(patches [N, P, d], sentences [N, M, d], valid [N, M]) as numpy, L2-normalised.

    bn="running": the heads in eval mode (maps.py). bn="batch": BatchNorm normalises with
    this batch's statistics, as in a training step (on a copy: running stats stay put)."""
    if bn == "running":
        out = maps.local_embeddings(model, images, ids, mask)
    else:
        out = maps.local_embeddings(nnx.clone(model), images, ids, mask, batch_stats=True)
    return tuple(np.asarray(x) for x in out)


class HeldOut:
    """A split's records prepared once: images, captions, boxes; `scored` indexes those
    with lesion boxes (the maps are scored on them, the identity test uses all)."""

    def __init__(self, dataset_dir: str, split: str, image_size: int, caption_style: str):
        source = pipeline.open_split(dataset_dir, split)
        self.records = [source[i] for i in range(len(source))]
        boxed = set(maps._scored_records(source, -1))
        self.scored = [i for i in range(len(source)) if i in boxed]
        if not self.scored:
            raise ValueError(f"{dataset_dir} split {split!r}: no record has lesion boxes "
                             "(build the set with `python -m data_prep synthetic --localisation`)")
        self.split, self.size = split, image_size
        self.captions = [captions.build_caption(r, style=caption_style, mask_prob=0.0)
                         for r in self.records]
        self.sentences = [maps.split_sentences(c) for c in self.captions]
        self.images = np.stack([eval_transform(r["image"], image_size) for r in self.records])
        self.boxes, self.breasts = [], []
        for r in self.records:
            canvas = eval_geometry(r["image"], DISPLAY)
            self.boxes.append(map_scores.canvas_boxes(map_scores.record_boxes(r), r["image"].shape, DISPLAY))
            self.breasts.append(map_scores.breast_mask(canvas))


def _grid_maps(patches, sent, valid, gh, gw):
    """Per image: the [n_sentences, gh, gw] cosine maps of its own caption."""
    out = []
    for p, s, v in zip(patches, sent, valid):
        out.append((s[: int(v.sum())] @ p.T).reshape(-1, gh, gw))
    return out


def held_out_embeddings(model, tok, held: HeldOut, max_length: int, bn: str = "running"):
    """_embed of every held-out image with its own caption."""
    enc = encode_captions(tok, held.captions, max_length)
    return _embed(model, held.images, enc.input_ids, enc.attention_mask, bn)


def localisation(embedded, held: HeldOut, grid: tuple[int, int]) -> dict:
    """Per sentence kind: n, mean lift, pointing hit rate and its chance (map_scores.summarise_scores),
    over the images with lesion boxes. embedded: held_out_embeddings; grid: the patch grid."""
    patches, sent, valid = embedded
    gh, gw = grid
    all_maps = _grid_maps(patches, sent, valid, gh, gw)
    scores = []
    for k in held.scored:
        for j, sim in enumerate(all_maps[k]):
            roi = map_scores.roi_scores(sim, held.breasts[k], held.boxes[k])
            if roi is not None:
                scores.append({"query": captions.sentence_kind(held.sentences[k][j]), **roi})
    return map_scores.summarise_scores(scores)


def _box_cells(boxes, breast, gh, gw):
    """Patch cells touched by the boxes (cut to the breast), as map_scores.roi_scores counts them."""
    region = np.zeros(breast.shape, bool)
    for y0, x0, y1, x1 in boxes:
        region[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return (map_scores._cell_means(region & breast, gh, gw) > 0).reshape(-1)


def identity(embedded, held: HeldOut, grid: tuple[int, int]) -> dict:
    """Where the local scores come from (see the module docstring). For each sentence kind
    that only lesion captions have ("The mass") or whose wording differs with the lesion
    ("Impressions"): the true image's rank among all held-out images when the max over
    patches runs over every patch, over the lesion's only, or over the rest. embedded: the
    running-statistics held_out_embeddings."""
    patches, sent, valid = embedded
    gh, gw = grid
    in_box = np.stack([_box_cells(b, m, gh, gw) for b, m in zip(held.boxes, held.breasts)])
    out = {}
    for kind, slug in ((captions.MASS_SENTENCE, "mass"), ("Impressions", "impressions")):
        rows, vecs = [], []
        for i in held.scored:
            kinds = [captions.sentence_kind(t) for t in held.sentences[i][: int(valid[i].sum())]]
            if kind in kinds:
                rows.append(i)
                vecs.append(sent[i, kinds.index(kind)])
        if not rows:
            continue
        sim = np.einsum("rd,npd->rnp", np.stack(vecs), patches)              # [R, N, P]
        for name, keep in (("all", np.ones_like(in_box)), ("without_lesion", ~in_box)):
            # an image without a box keeps all its patches: a sentence that still ranks its
            # image first with the lesion cut out finds the image elsewhere (identity)
            score = np.where(keep[None], sim, -np.inf).max(-1)               # [R, N]
            out[f"{slug}_rank_{name}"] = _true_pair_percentile(score, rows)
    # eq. 3's two aggregates over all sentences, as the loss sees them
    c_v, c_t = (np.asarray(x) for x in losses.local_similarity(sent, valid, patches))
    every = list(range(len(held.records)))
    out["c_v_rank"] = _true_pair_percentile(c_v, every)
    out["c_t_rank"] = _true_pair_percentile(c_t, every)
    gram = np.einsum("npd,mqd->nmpq", patches, patches).mean(axis=(2, 3))    # [N, N]
    out["patch_cos_within_image"] = float(np.mean(np.diag(gram)))
    out["patch_cos_between_images"] = float(gram[~np.eye(len(gram), dtype=bool)].mean())
    return out


def _true_pair_percentile(score, rows):
    """Mean fraction of the other images the true image outscores, per caption (0.5 = chance)."""
    pct = []
    for r, n in enumerate(rows):
        others = np.delete(score[r], n)
        pct.append(float((others < score[r, n]).mean()))
    return float(np.mean(pct))


def global_metrics(pretrain_workdir: str, split: str, eval_dir: str) -> dict:
    """Zero-shot (density, BI-RADS) on `split`, and a linear probe (all training patients)
    trained on the train split's pooled features and scored on `split`."""
    zcfg = ml_collections.ConfigDict(dict(
        mode="zeroshot", pretrain_workdir=pretrain_workdir, dataset_dir="", split=split, step=0,
        tasks=("density", "birads"), prefix="official", aggregate="image", double_softmax=False,
        max_length=0, batch_size=32, bootstrap=0, seed=0))
    zs = zeroshot.run(zcfg, eval_dir)
    ecfg = ml_collections.ConfigDict(dict(mode="extract", pretrain_workdir=pretrain_workdir,
                                          dataset_dir="", splits=("train", split), batch_size=32))
    extract.run(ecfg, eval_dir)
    lcfg = ml_collections.ConfigDict(dict(
        mode="linear_probe", pretrain_workdir=pretrain_workdir, train_file="",
        test_file=extract.embeddings_path(eval_dir, split), feature="pooled",
        tasks=("density", "birads"), fractions=(1.0,), optimizer="lbfgs", epochs=200, lr=1e-2,
        weight_decay=1e-3, seed=0, bootstrap=0))
    lp = linear_probe.run(lcfg, eval_dir)
    out = {}
    for task in ("density", "birads"):
        out[f"zs_{task}_bacc"] = zs[f"{task}/balanced_accuracy"]
        out[f"zs_{task}_auc"] = zs[f"{task}/auc"]
        out[f"lp_{task}_bacc"] = lp[f"{task}/lp100%/test/bacc"]
        out[f"lp_{task}_auc"] = lp[f"{task}/lp100%/test/auc"]
    return out


def evaluate_run(pretrain_workdir: str, split: str, *, diagnostics: bool, with_global: bool = True
                 ) -> dict:
    """Everything the experiment's table reads for one run, on `split`."""
    pcfg = restore.load_pretrain_config(pretrain_workdir)
    model, tok, step = restore.restore_model(pretrain_workdir)
    size = int(pcfg.data.image_size)
    held = HeldOut(pcfg.data.dataset_dir, split, size, pcfg.data.caption_style)
    max_length = int(model.cfg.text.n_positions)
    grid = maps.patch_grid(model, size)
    running = held_out_embeddings(model, tok, held, max_length)  # how maps.py draws
    result = {"step": int(step), "split": split, "n_images": len(held.scored),
              "n_images_all": len(held.records),
              "maps": localisation(running, held, grid)}
    if diagnostics:
        batch = held_out_embeddings(model, tok, held, max_length, bn="batch")
        result["maps_bn_batch"] = localisation(batch, held, grid)
        result["identity"] = identity(running, held, grid)
    if with_global:
        result["global"] = global_metrics(pretrain_workdir, split,
                                          os.path.join(pretrain_workdir, f"eval_{split}"))
    return result
