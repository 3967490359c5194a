"""InferenceModel: a loaded package's embeddings, zero-shot and head probabilities, and
predictions straight from DICOM files."""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from mama_jax.input import captions, tokenizer as tok_lib
from mama_jax.evaluate import extract, zeroshot
from mama_jax.export import dicom_input, predictions
from mama_jax.export.errors import PackageError
from mama_jax.export.heads import KINDS
from mama_jax.losses import l2_normalize

VIT_HF_DIR = "vit_hf"
ZERO_SHOT_PREFIX = "none"  # a DICOM's metadata is never read into a prompt


def _pad(images: np.ndarray, batch_size: int) -> np.ndarray:
    """Rows padded with copies of the first to batch_size: one compiled shape."""
    n = len(images)
    return images if n == batch_size else np.concatenate([images, np.repeat(images[:1], batch_size - n, 0)])


class InferenceModel:
    """A pretrained MaMA for inference: L2-normalised embeddings, zero-shot scores, the
    package's trained heads, and predict_dicoms."""

    def __init__(self, model, tok: tok_lib.TextTokenizer, *, image_size: int, max_length: int,
                 max_log_scale: float | None = None, step: int = -1, path: str = "",
                 decode: dict | None = None, heads: dict | None = None):
        self.model, self.tokenizer = model, tok
        self.image_size, self.max_length, self.step, self.path = image_size, max_length, step, path
        self.vit_hf_path = os.path.join(path, VIT_HF_DIR) if path else ""
        self.decode = decode      # data_prep reader settings; None in a version-1 package
        self.heads = heads or {}  # {(kind, task): ProbeHead | FinetuneHead}
        log_scale = float(np.asarray(model.logit_scale[...]))
        # Training clamps the scale (loss.max_log_scale); zero-shot uses what training saw.
        self.logit_scale = min(log_scale, max_log_scale) if max_log_scale else log_scale
        graphdef, state = nnx.split(model)
        self._state = state
        self._embed = extract.image_embed_fn(graphdef)  # (e_I(x), g(x)), as the extract job
        self._texts = jax.jit(lambda s, ids, mask: l2_normalize(
            nnx.merge(graphdef, s).encode_texts(ids, mask).astype(jnp.float32)))
        self._classifiers: dict = {}
        self._prompt_cache: dict[str, np.ndarray] = {}

    @property
    def embed_dim(self) -> int:
        return self.model.cfg.embed_dim

    # ------------------------------------------------------------------ arrays

    def preprocess(self, image_u16: np.ndarray) -> np.ndarray:
        """A uint16 [H, W] breast image (data_prep record) -> float32 [S, S, 3], as evaluation."""
        from mama_jax.input.augment import eval_transform

        image = np.asarray(image_u16)
        if image.ndim != 2:
            raise ValueError(f"preprocess: expected a 2-D uint16 image [H, W], got shape {image.shape}")
        return eval_transform(image, self.image_size)

    def _check_images(self, images, where: str) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{where}: expected images [B, S, S, 3], got shape {images.shape}")
        return images

    def image_features(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(e_I(x) [B, d] unnormalised, g(x) [B, Dv]) fp32: the extract job's two features."""
        emb, pooled = self._embed(self._state, self._check_images(images, "image_features"))
        return np.asarray(emb), np.asarray(pooled)

    def encode_images(self, images) -> np.ndarray:
        """Normalised images [B, S, S, 3] (see preprocess) -> L2-normalised embeddings [B, d]."""
        emb, _ = self._embed(self._state, self._check_images(images, "encode_images"))
        return np.asarray(l2_normalize(emb))

    def encode_texts(self, texts) -> np.ndarray:
        """Captions or prompts -> L2-normalised embeddings [B, d]."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_texts: expected a list of strings")
        enc = tok_lib.encode_captions(self.tokenizer, list(texts), self.max_length)
        return np.asarray(self._texts(self._state, enc.input_ids, enc.attention_mask))

    def zero_shot(self, images, prompts) -> np.ndarray:
        """Class probabilities [B, len(prompts)]: softmax(exp(logit_scale) * cos)."""
        if not prompts:
            raise ValueError("zero_shot: prompts is empty")
        scores = np.exp(self.logit_scale) * (self.encode_images(images) @ self.encode_texts(prompts).T)
        return np.asarray(jax.nn.softmax(jnp.asarray(scores, jnp.float32), axis=-1))

    # ------------------------------------------------------------------ tasks and heads

    def available_heads(self, task: str) -> list[str]:
        """Heads that answer `task`: zero-shot always, probe / finetune when carried."""
        _check_task(task)
        return ["zero-shot"] + [k for k in KINDS[1:] if (k, task) in self.heads]

    def _head(self, task: str, head: str):
        _check_task(task)
        if head not in KINDS:
            raise ValueError(f"unknown head {head!r}; choose from {', '.join(KINDS)}")
        if head != "zero-shot" and (head, task) not in self.heads:
            raise PackageError(f"{self.path}: the package carries no {head} head for {task} "
                               f"(available: {', '.join(self.available_heads(task))}); export it "
                               "with configs/export.py's probe_workdir / finetune_workdir")
        return self.heads.get((head, task))

    def prompts(self, task: str) -> list[str]:
        """The zero-shot class prompts (no metadata prefix: nothing of the DICOM is read)."""
        return captions.zero_shot_prompts(task, prefix=ZERO_SHOT_PREFIX)

    def _prompt_embeddings(self, task: str) -> np.ndarray:
        if task not in self._prompt_cache:
            self._prompt_cache[task] = self.encode_texts(self.prompts(task))
        return self._prompt_cache[task]

    def class_probabilities(self, images, task: str, head: str = "zero-shot") -> np.ndarray:
        """Class probabilities [B, C] of preprocessed images for `task` by `head`.

        zero-shot: the zero-shot job's rule (zeroshot.zero_shot_probs, one softmax);
        probe: linear_probe.predict_proba on the probe's feature; finetune: softmax of
        the classifier's logits."""
        from mama_jax.evaluate.linear_probe import predict_proba

        images = self._check_images(images, "class_probabilities")
        trained = self._head(task, head)
        if head == "finetune":
            return self._finetune_probs(trained, images)
        emb, pooled = self.image_features(images)
        if head == "probe":
            x = pooled if trained.feature == "pooled" else emb
            return predict_proba(trained.params, x).astype(np.float32)
        text = self._prompt_embeddings(task)[None]
        _, probs = zeroshot.zero_shot_probs(emb, text, np.zeros(len(emb), np.int64), self.logit_scale)
        return probs.astype(np.float32)

    def _finetune_probs(self, trained, images: np.ndarray) -> np.ndarray:
        if trained.task not in self._classifiers:
            graphdef, state = nnx.split(trained.classifier)
            fn = jax.jit(lambda s, x: jax.nn.softmax(nnx.merge(graphdef, s)(x).astype(jnp.float32), -1))
            self._classifiers[trained.task] = (fn, state)
        fn, state = self._classifiers[trained.task]
        return np.asarray(fn(state, images))

    # ------------------------------------------------------------------ DICOM files

    def _require_decode(self) -> None:
        if self.decode is None:
            raise PackageError(f"{os.path.join(self.path, 'config.json')}: no decode settings "
                               "(a format-1 package); export it again to read DICOMs")

    def predict_dicoms(self, paths, task: str, head: str = "zero-shot", *, batch_size: int = 8,
                       progress: bool = False, ids: dict | None = None,
                       workers: int = 1) -> predictions.Predictions:
        """Class probabilities per image, breast and study of DICOM files / folders.

        Each file is read by data_prep's reader with the package's decode settings (in
        `workers` processes when > 1, while the model runs), then preprocessed as
        evaluation; unreadable files are listed in `skipped` with their reason and the
        rest go on. `progress`: a tqdm bar over the files; `ids`: the dataset's
        anonymised ids per file (predictions.build)."""
        self._head(task, head)  # a bad task / head fails before any file is read
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._require_decode()
        files, skipped = dicom_input.expand_inputs(paths)
        images, probs, pending = [], [], []
        seconds = {"read": 0.0, "model": 0.0}  # reading + decode + crop; preprocess + model

        def flush():
            t0 = time.perf_counter()
            batch = np.stack([self.preprocess(im.pixels) for im in pending])
            probs.append(self.class_probabilities(_pad(batch, batch_size), task, head)[:len(pending)])
            seconds["model"] += time.perf_counter() - t0
            images.extend(dataclasses.replace(im, pixels=None) for im in pending)  # free the pixels
            pending.clear()

        reader = dicom_input.read_images(files, self.decode, workers)
        for _ in tqdm(files, desc=f"predict {task}", unit="img", disable=not progress):
            t0 = time.perf_counter()
            out = next(reader)  # with workers: the wait for the readers
            seconds["read"] += time.perf_counter() - t0
            if isinstance(out, dicom_input.Skipped):
                skipped.append(out)
                continue
            pending.append(out)
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        num_classes = len(captions.CLASS_NAMES[task])
        probs = np.concatenate(probs) if probs else np.zeros((0, num_classes), np.float32)
        preds = predictions.build(task, head, captions.CLASS_NAMES[task], images, probs, skipped, ids)
        preds.seconds = seconds
        return preds


def _check_task(task: str) -> None:
    if task not in captions.TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(captions.TASKS)}")
