"""What the viewer shows of one DICOM: the crop as the model sees it, class probabilities
per task and head, and sentence-to-patch similarity maps (evaluate/maps.py).

Only laterality and view leave the DICOM header (export/dicom_input.py); the name shown
is the upload's file name as the browser gave it.
"""

from __future__ import annotations

import base64
import collections
import os
import tempfile
import threading
import uuid

import cv2
import numpy as np

from mama_jax.input import captions
from mama_jax.evaluate import maps
from mama_jax.export import dicom_input

MAX_IMAGES = 64  # images kept for maps; the oldest are dropped


def png_data_url(rgb_or_gray: np.ndarray) -> str:
    image = np.asarray(rgb_or_gray)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def canvas_gray(canvas: np.ndarray) -> np.ndarray:
    """The model's input [S, S, 3] in [-1, 1] -> uint8 [S, S]: exactly what the ViT sees."""
    return np.clip(np.rint((np.asarray(canvas)[..., 0] + 1.0) * 127.5), 0, 255).astype(np.uint8)


def class_sentences(task: str) -> list[dict]:
    """The zero-shot report sentences of each class of `task` ({class, sentences})."""
    prompts = captions.zero_shot_prompts(task, prefix="none")
    return [{"class": name, "sentences": maps.split_sentences(p)}
            for name, p in zip(captions.CLASS_NAMES[task], prompts)]


class Analyzer:
    """Holds the loaded InferenceModel; one model call at a time (a lock)."""

    def __init__(self, model, upload_dir: str):
        self.model, self.upload_dir = model, upload_dir
        self._lock = threading.Lock()
        self._canvases: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

    def info(self) -> dict:
        tasks = {t: {"heads": self.model.available_heads(t), "classes": list(captions.CLASS_NAMES[t]),
                     "report_sentences": class_sentences(t)} for t in captions.TASKS}
        return {"model": os.path.basename(self.model.path.rstrip("/")), "step": self.model.step,
                "image_size": self.model.image_size, "tasks": tasks}

    def analyze(self, name: str, data: bytes) -> dict:
        """One uploaded file: written to the temporary folder, read, deleted at once."""
        path = os.path.join(tempfile.mkdtemp(dir=self.upload_dir), "upload.dcm")
        try:
            with open(path, "wb") as f:
                f.write(data)
            out = dicom_input.read_image(path, self.model.decode)
        finally:
            if os.path.exists(path):
                os.remove(path)
            os.rmdir(os.path.dirname(path))
        if isinstance(out, dicom_input.Skipped):
            return {"name": name, "error": out.reason}
        canvas = self.model.preprocess(out.pixels)
        result = {"name": name, "laterality": out.laterality, "view": out.view,
                  "crop_png": png_data_url(canvas_gray(canvas)), "record_shape": list(out.pixels.shape),
                  "predictions": {}}
        with self._lock:
            for task in captions.TASKS:
                result["predictions"][task] = {
                    head: [float(p) for p in self.model.class_probabilities(canvas[None], task, head)[0]]
                    for head in self.model.available_heads(task)}
            image_id = uuid.uuid4().hex
            self._canvases[image_id] = canvas
            while len(self._canvases) > MAX_IMAGES:
                self._canvases.popitem(last=False)
        result["id"] = image_id
        return result

    def sentence_maps(self, image_id: str, text: str) -> dict:
        """Similarity map of each sentence of `text` over the image (a sentence ends at "."
        or ";"; a missing final one is added)."""
        canvas = self._canvases.get(image_id)
        if canvas is None:
            raise KeyError(f"unknown image {image_id!r} (upload it again)")
        text = " ".join(text.split())
        if not text:
            raise ValueError("type a sentence first")
        if not text.endswith(tuple(captions.SENTENCE_ENDS)):
            text += "."
        with self._lock:
            sims = maps.sentence_patch_maps(self.model.model, self.model.tokenizer, canvas, text,
                                            self.model.max_length)
        sentences = maps.split_sentences(text)[:len(sims)]
        gray = canvas_gray(canvas).astype(np.float32) / 255.0
        out = []
        for sentence, sim in zip(sentences, sims):
            out.append({"sentence": sentence, "png": png_data_url(maps.overlay_rgb(gray, sim)),
                        "min": float(sim.min()), "max": float(sim.max())})
        return {"id": image_id, "maps": out}
