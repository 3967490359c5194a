"""Sentence-to-patch similarity maps (paper Fig. 3): where a caption sentence lands on the image.

The map is the cosine between one sentence's local text embedding (hidden state at its
SEP -> txt_local head) and every patch's local image embedding (post-norm patch token
-> img_local head), i.e. the similarity the local alignment loss is built from, on the
ViT's patch grid. Heat maps are min-max normalised to [0, 1] for display, as in the paper.

  python -m mama_jax.main --config=configs/maps.py --workdir=DIR \
      --config.pretrain_workdir=PRETRAIN_DIR
"""

from __future__ import annotations

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

from mama_jax import captions, data, losses  # noqa: E402
from mama_jax.augment import eval_geometry, eval_transform  # noqa: E402
from mama_jax.evaluate import extract, restore  # noqa: E402
from mama_jax.models import text as text_lib  # noqa: E402
from mama_jax.models.tokenizer import SENTENCE_ENDS, encode_captions  # noqa: E402

MAPS_DIR = "maps"
MAPS_JSON = "maps.json"
MASS_SENTENCE = "The mass"
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

@nnx.jit
def _local_embeddings(model, images, input_ids, attention_mask):
    """(patches [B, P, d], sentences [B, M, d], sentence mask [B, M]), L2-normalised, fp32."""
    _, patch_tokens = model.image_features(images)
    patches = losses.l2_normalize(model.img_local(patch_tokens, train=False).astype(np.float32))
    hidden = model.text_states(input_ids, attention_mask, train=False)
    sent, valid = text_lib.sentence_features(hidden, input_ids, model.cfg.sep_id,
                                             model.cfg.max_sentences)
    sent = losses.l2_normalize(model.txt_local(sent, valid, train=False).astype(np.float32))
    return patches, sent, valid


def patch_grid(model, image_size: int) -> tuple[int, int]:
    p = model.cfg.vit.patch_size
    return image_size // p, image_size // p


def sentence_patch_map(model, tok, image: np.ndarray, caption: str, sentence_index: int,
                       max_length: int) -> np.ndarray:
    """Cosine of sentence `sentence_index` with every patch: float32 [gh, gw].

    image: eval-transformed float32 [S, S, 3]. A negative index counts back from the
    last sentence that survived tokenisation (truncation and max_sentences drop some).
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[0] != image.shape[1] or image.shape[2] != 3:
        raise ValueError(f"image must be an eval-transformed [S, S, 3] array, got shape {image.shape}")
    enc = encode_captions(tok, [caption], max_length)
    patches, sent, valid = _local_embeddings(model, image[None], enc.input_ids, enc.attention_mask)
    count = int(np.asarray(valid[0]).sum())
    index = sentence_index + count if sentence_index < 0 else sentence_index
    if not 0 <= index < count:
        raise ValueError(f"sentence_index {sentence_index} is out of range: the caption has {count} "
                         f"sentences after tokenisation (max_length {max_length}, "
                         f"max_sentences {model.cfg.max_sentences})")
    sim = np.asarray(patches[0]) @ np.asarray(sent[0, index])
    gh, gw = patch_grid(model, image.shape[0])
    if sim.shape[0] != gh * gw:
        raise ValueError(f"the ViT returned {sim.shape[0]} patches for a {gh}x{gw} grid")
    return sim.reshape(gh, gw).astype(np.float32)


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


def overlay_png(image: np.ndarray, sim_map: np.ndarray, path: str, title: str) -> str:
    """The map, bilinearly upsampled and normalised to [0, 1], as a translucent heat map on
    the grey image; a PNG of exactly the image's size (title drawn in and kept as metadata)."""
    gray = _gray01(image)
    sim_map = np.asarray(sim_map, np.float32)
    if sim_map.ndim != 2:
        raise ValueError(f"sim_map must be 2-D [gh, gw], got shape {sim_map.shape}")
    h, w = gray.shape
    up = cv2.resize(sim_map, (w, h), interpolation=cv2.INTER_LINEAR)
    lo, hi = float(up.min()), float(up.max())
    heat = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    rgb = (1 - HEAT_ALPHA) * np.repeat(gray[..., None], 3, axis=2) \
        + HEAT_ALPHA * colormaps[COLORMAP](heat)[..., :3]
    rgb = np.ascontiguousarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
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

def _text(value) -> str:
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


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


def run(cfg, workdir: str) -> dict:
    """Similarity maps of cfg.sentence (and "The mass" where present) for a few images:
    PNGs and maps.json under WORKDIR/maps (skipped queries listed with their reason)."""
    extract.require_pretrain_workdir(cfg)
    pcfg = restore.load_pretrain_config(cfg.pretrain_workdir)
    source = data.open_split(extract.eval_data_config(cfg, pcfg).dataset_dir, cfg.split)
    records = choose_records(source, int(cfg.num_images), tuple(cfg.image_ids))
    step = cfg.get("step", -1)
    model, tok, step = restore.restore_model(cfg.pretrain_workdir, cfg=pcfg,
                                             step=None if step is None or step < 0 else step)
    size = int(pcfg.data.image_size)
    # The LM is causal: a sentence's state never depends on later tokens, so a longer
    # max_length than pretraining's only keeps late sentences from being cut off.
    max_length = int(cfg.get("max_length", 0)) or int(model.cfg.text.n_positions)
    if not 2 <= max_length <= model.cfg.text.n_positions:
        raise ValueError(f"config.max_length={max_length}: must be in 2..{model.cfg.text.n_positions} "
                         "(the text tower's n_positions), or 0 for the whole context")
    display = max(size, int(cfg.get("display_size", 448)))
    out_dir = os.path.join(workdir, MAPS_DIR)
    os.makedirs(out_dir, exist_ok=True)

    maps, skipped = [], []
    for index in records:
        record = source[index]
        image_id = _text(record["image_id"])
        caption = captions.build_caption(record, style="structured", mask_prob=0.0)
        queries = [cfg.sentence]
        if cfg.sentence != MASS_SENTENCE and any(
                s.startswith(MASS_SENTENCE) for s in split_sentences(caption)):
            queries.append(MASS_SENTENCE)
        image = eval_transform(record["image"], size)
        for query in queries:
            try:
                k = find_sentence(caption, query)
                sim = sentence_patch_map(model, tok, image, caption, k, max_length)
            except ValueError as err:
                skipped.append({"image_id": image_id, "record_index": int(index), "query": query,
                                "reason": str(err)})
                continue
            png = os.path.join(out_dir, f"{_slug(image_id)}_{_slug(query)}.png")
            text = split_sentences(caption)[k]
            short_id = image_id if len(image_id) <= 12 else "..." + image_id[-8:]
            overlay_png(eval_geometry(record["image"], display), sim, png, f"{short_id}: {text}")
            maps.append({"image_id": image_id, "record_index": int(index), "query": query,
                         "sentence": text, "sentence_index": k, "png": png,
                         "grid": list(sim.shape), "min": float(sim.min()), "max": float(sim.max())})

    result = {"pretrain_workdir": cfg.pretrain_workdir, "checkpoint_step": int(step),
              "split": cfg.split, "image_size": size, "maps": maps, "skipped": skipped}
    path = os.path.join(out_dir, MAPS_JSON)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return {"num_maps": len(maps), "num_skipped": len(skipped), "maps_json": path,
            "checkpoint_step": int(step)}
