"""Sentence-to-patch similarity maps (paper Fig. 3): where a caption sentence lands on the image.

The map is the cosine between one sentence's local text embedding (hidden state at its
SEP -> txt_local head) and every patch's local image embedding (post-norm patch token
-> img_local head), i.e. the similarity the local alignment loss is built from, on the
ViT's patch grid. Heat maps are min-max normalised to [0, 1] for display, as in the paper.

  python -m mama_jax.main --config=configs/maps.py --workdir=DIR \
      --config.pretrain_workdir=PRETRAIN_DIR
"""

from __future__ import annotations

import functools
import json
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
from matplotlib import colormaps  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mama_jax import losses  # noqa: E402
from mama_jax.evaluate import extract, restore  # noqa: E402
from mama_jax.evaluate.map_scores import (breast_mask, canvas_boxes, record_boxes,  # noqa: E402
                                          roi_scores, summarise_scores, upsample)
from mama_jax.input import captions, pipeline  # noqa: E402
from mama_jax.input.augment import eval_geometry, eval_transform  # noqa: E402
from mama_jax.input.study_index import record_text  # noqa: E402
from mama_jax.input.tokenizer import SENTENCE_ENDS, encode_captions  # noqa: E402

MAPS_DIR = "maps"
MAPS_JSON = "maps.json"
HEAT_ALPHA = 0.45
COLORMAP = "jet"


# ----------------------------------------------------------------------------- sentences

def split_sentences(caption: str) -> list[str]:
    """The caption's sentences, one per SEP token the tokenizer emits, stripped.

    Same rule as the tokenizer: newlines are spaces and every "." and ";" ends a
    sentence; text after the last end has no SEP and is no sentence.
    """
    text = caption.replace("\r", " ").replace("\n", " ")
    pieces = re.split("|".join(re.escape(m) for m in SENTENCE_ENDS), text)
    return [p.strip() for p in pieces[:-1]]


def find_sentence(caption: str, startswith: str) -> int:
    """Index of the first sentence that starts with `startswith` (ValueError if none)."""
    sentences = split_sentences(caption)
    for i, sentence in enumerate(sentences):
        if sentence.startswith(startswith.strip()):
            return i
    raise ValueError(f"no sentence starts with {startswith!r} among the caption's "
                     f"{len(sentences)} sentences: {sentences}")


# ----------------------------------------------------------------------------- embeddings

@functools.partial(nnx.jit, static_argnames="batch_stats")
def local_embeddings(model, images, input_ids, attention_mask, *, batch_stats: bool = False):
    """(patches [B, P, d], sentences [B, M, d], sentence mask [B, M]), L2-normalised, fp32.

    batch_stats: the local heads' BatchNorm normalises with this batch's statistics, as in
    a training step, and updates the running ones (pass a copy); else their running ones."""
    _, patch_tokens = model.image_features(images)
    patches = losses.l2_normalize(model.img_local(patch_tokens, train=batch_stats)
                                  .astype(np.float32))
    hidden = model.text_states(input_ids, attention_mask, train=False)
    sent, valid = model.sentence_inputs(hidden, input_ids)
    sent = losses.l2_normalize(model.txt_local(sent, valid, train=batch_stats).astype(np.float32))
    return patches, sent, valid


def patch_grid(model, image_size: int) -> tuple[int, int]:
    p = model.cfg.vit.patch_size
    return image_size // p, image_size // p


def sentence_patch_maps(model, tok, image: np.ndarray, caption: str, max_length: int) -> np.ndarray:
    """Cosine of every sentence with every patch: float32 [n, gh, gw], one forward pass.

    image: eval-transformed float32 [S, S, 3]; n counts the sentences that survived
    tokenisation (truncation and max_sentences drop late ones).
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[0] != image.shape[1] or image.shape[2] != 3:
        raise ValueError(f"image must be an eval-transformed [S, S, 3] array, got shape {image.shape}")
    enc = encode_captions(tok, [caption], max_length)
    patches, sent, valid = local_embeddings(model, image[None], enc.input_ids, enc.attention_mask)
    count = int(np.asarray(valid[0]).sum())
    sims = np.asarray(sent[0, :count]) @ np.asarray(patches[0]).T  # [n, P]
    gh, gw = patch_grid(model, image.shape[0])
    if sims.shape[1] != gh * gw:
        raise ValueError(f"the ViT returned {sims.shape[1]} patches for a {gh}x{gw} grid")
    return sims.reshape(count, gh, gw).astype(np.float32)


def pick_sentence(maps: np.ndarray, sentence_index: int, max_length: int, max_sentences: int):
    """maps[sentence_index] of sentence_patch_maps (negative counts back from the last)."""
    count = len(maps)
    index = sentence_index + count if sentence_index < 0 else sentence_index
    if not 0 <= index < count:
        raise ValueError(f"sentence_index {sentence_index} is out of range: the caption has {count} "
                         f"sentences after tokenisation (max_length {max_length}, "
                         f"max_sentences {max_sentences})")
    return maps[index]


def sentence_patch_map(model, tok, image: np.ndarray, caption: str, sentence_index: int,
                       max_length: int) -> np.ndarray:
    """Cosine of sentence `sentence_index` with every patch: float32 [gh, gw]."""
    maps = sentence_patch_maps(model, tok, image, caption, max_length)
    return pick_sentence(maps, sentence_index, max_length, model.cfg.max_sentences)


# ----------------------------------------------------------------------------- drawing

def _gray01(image: np.ndarray) -> np.ndarray:
    """Any mammogram array (uint16 [H, W], float [H, W] or [H, W, 3]) -> float [H, W] in [0, 1]."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., 0]
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"image must be [H, W] or [H, W, C], got shape {image.shape}")
    image = image.astype(np.float32)
    lo, hi = float(image.min()), float(image.max())
    return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def overlay_rgb(gray01: np.ndarray, sim_map: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3]: the map bilinearly upsampled to the grey [0, 1] image, min-max
    normalised, as a translucent heat map over it."""
    h, w = gray01.shape
    up = upsample(sim_map, h, w)
    lo, hi = float(up.min()), float(up.max())
    heat = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    rgb = (1 - HEAT_ALPHA) * np.repeat(gray01[..., None], 3, axis=2) \
        + HEAT_ALPHA * colormaps[COLORMAP](heat)[..., :3]
    return np.ascontiguousarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def overlay_png(image: np.ndarray, sim_map: np.ndarray, path: str, title: str,
                boxes=()) -> str:
    """The map, bilinearly upsampled and normalised to [0, 1], as a translucent heat map on
    the grey image; a PNG of exactly the image's size (title drawn in and kept as metadata).
    `boxes` (y0, x0, y1, x1) in the image's pixels (lesion ROIs) are outlined in white."""
    rgb = overlay_rgb(_gray01(image), sim_map)
    h, w = rgb.shape[:2]
    thickness = max(1, w // 300)
    for y0, x0, y1, x1 in boxes:
        cv2.rectangle(rgb, (int(x0), int(y0)), (int(x1) - 1, int(y1) - 1), (255, 255, 255),
                      thickness)
    if title and w >= 128:  # on smaller images the text would cover the picture
        font, scale = cv2.FONT_HERSHEY_SIMPLEX, w / 900.0
        text_w = cv2.getTextSize(title, font, scale, 1)[0][0]
        scale = min(scale, scale * (w - 8) / max(text_w, 1))  # shrink long titles to fit
        (text_w, text_h), base = cv2.getTextSize(title, font, scale, 1)
        rgb[:text_h + base + 8, :text_w + 8] //= 3  # darken behind the text so it reads on any colour
        cv2.putText(rgb, title, (4, 4 + text_h), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    mpimg.imsave(path, rgb, format="png", metadata={"Title": title})
    return path


# ----------------------------------------------------------------------------- job

def choose_records(source, num_images: int, image_ids=()) -> list[int]:
    """Record indices: the given image ids (in order), or the first `num_images` records
    with a mass, topped up with the first records without one."""
    image_ids = [str(i) for i in image_ids]
    if image_ids:
        ids = extract.record_fields(source, ("image_id",))["image_id"]
        found = {}
        for i, image_id in enumerate(ids):
            found.setdefault(str(image_id), i)
        missing = [i for i in image_ids if i not in found]
        if missing:
            raise KeyError(f"config.image_ids: not in this split: {', '.join(missing)}")
        return [found[i] for i in image_ids]
    if num_images < 1:
        raise ValueError(f"config.num_images must be >= 1, got {num_images}")
    has_mass = np.char.str_len(np.char.strip(
        extract.record_fields(source, ("mass_shape",))["mass_shape"].astype(str))) > 0
    order = np.concatenate([np.flatnonzero(has_mass), np.flatnonzero(~has_mass)])
    return [int(i) for i in order[:num_images]]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text.strip()).strip("_") or "sentence"


def _scored_records(source, limit: int) -> list[int]:
    """The first `limit` records (split order) with lesion boxes; [] for datasets built
    before records carried roi_boxes."""
    if limit == 0 or len(source) == 0 or "roi_boxes" not in source[0]:
        return []
    boxes = extract.record_fields(source, ("roi_boxes",))["roi_boxes"].astype(str)
    found = np.flatnonzero(np.char.str_len(np.char.strip(boxes)) > 0)
    return [int(i) for i in (found if limit < 0 else found[:limit])]


def run(cfg, workdir: str) -> dict:
    """Similarity maps of cfg.sentence (and "The mass" where present) for a few images:
    PNGs and maps.json under WORKDIR/maps (skipped queries listed with their reason).

    Where records carry lesion boxes, the maps of every sentence of up to
    cfg.score_images such records are scored against them (roi_scores) and summarised
    per sentence kind (captions.sentence_kind) in maps.json: which sentences find the lesion.
    """
    extract.require_pretrain_workdir(cfg)
    pcfg = restore.load_pretrain_config(cfg.pretrain_workdir)
    source = pipeline.open_split(extract.eval_data_config(cfg, pcfg).dataset_dir, cfg.split)
    records = choose_records(source, int(cfg.num_images), tuple(cfg.image_ids))
    scored = _scored_records(source, int(cfg.get("score_images", 0)))
    step = cfg.get("step", -1)
    model, tok, step = restore.restore_model(cfg.pretrain_workdir,
                                             step=None if step is None or step < 0 else step)
    # The ViT resizes its position table to any grid, so maps can be drawn at a finer
    # patch grid than pretraining used.
    size = int(cfg.get("image_size", 0)) or int(pcfg.data.image_size)
    # The LM is causal: a sentence's state never depends on later tokens, so a longer
    # max_length than pretraining's only keeps late sentences from being cut off.
    max_length = int(cfg.get("max_length", 0)) or int(model.cfg.text.n_positions)
    if not 2 <= max_length <= model.cfg.text.n_positions:
        raise ValueError(f"config.max_length={max_length}: must be in 2..{model.cfg.text.n_positions} "
                         "(the text tower's n_positions), or 0 for the whole context")
    display = max(size, int(cfg.get("display_size", 448)))
    out_dir = os.path.join(workdir, MAPS_DIR)
    os.makedirs(out_dir, exist_ok=True)

    style = pcfg.data.get("caption_style", "structured")  # the captions it was trained on
    maps, skipped, scores = [], [], []
    drawn = set(records)
    for index in records + [i for i in scored if i not in drawn]:
        record = source[index]
        image_id = record_text(record["image_id"])
        caption = captions.build_caption(record, style=style, mask_prob=0.0)
        sentences = split_sentences(caption)
        queries = [cfg.sentence] if index in drawn else []  # scored-only records draw nothing
        mass = captions.MASS_SENTENCE
        if queries and cfg.sentence != mass and any(s.startswith(mass) for s in sentences):
            queries.append(mass)
        image = eval_transform(record["image"], size)
        canvas = eval_geometry(record["image"], display)
        boxes = canvas_boxes(record_boxes(record), record["image"].shape, display)
        breast = breast_mask(canvas) if boxes else None
        all_maps = sentence_patch_maps(model, tok, image, caption, max_length)
        # Every sentence of the caption is scored: which of them finds the lesion?
        rois = [roi_scores(sim, breast, boxes) if boxes else None for sim in all_maps]
        for j, roi in enumerate(rois):
            if roi is not None:
                scores.append({"image_id": image_id, "record_index": int(index),
                               "query": captions.sentence_kind(sentences[j]),
                               "sentence": sentences[j], **roi})
        for query in queries:
            try:
                k = find_sentence(caption, query)
                sim = pick_sentence(all_maps, k, max_length, model.cfg.max_sentences)
            except ValueError as err:
                skipped.append({"image_id": image_id, "record_index": int(index), "query": query,
                                "reason": str(err)})
                continue
            text, roi = sentences[k], rois[k]
            png = os.path.join(out_dir, f"{_slug(image_id)}_{_slug(query)}.png")
            short_id = image_id if len(image_id) <= 12 else "..." + image_id[-8:]
            overlay_png(canvas, sim, png, f"{short_id}: {text}", boxes=boxes)
            entry = {"image_id": image_id, "record_index": int(index), "query": query,
                     "sentence": text, "sentence_index": k, "png": png,
                     "grid": list(sim.shape), "min": float(sim.min()), "max": float(sim.max())}
            if roi is not None:
                entry["roi"] = roi
            maps.append(entry)

    result = {"pretrain_workdir": cfg.pretrain_workdir, "checkpoint_step": int(step),
              "split": cfg.split, "image_size": size, "maps": maps, "skipped": skipped,
              "roi_summary": summarise_scores(scores), "roi_scores": scores}
    path = os.path.join(out_dir, MAPS_JSON)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return {"num_maps": len(maps), "num_skipped": len(skipped), "maps_json": path,
            "checkpoint_step": int(step), "num_scored": len(scores),
            "roi_summary": result["roi_summary"]}
