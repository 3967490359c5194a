"""Per-image class probabilities and their per-breast and per-study aggregates.

Rule (the one zero-shot evaluation uses with aggregate=breast / study): a group's
probabilities are the mean of its images' probabilities; its prediction is the argmax
of that mean. A breast is study + laterality (images without a laterality join their
study, not a breast); a study is the Study Instance UID (or the folder when a file has
none). Rows carry no header value beyond the SOP / Study Instance UIDs, laterality
and view.
"""

from __future__ import annotations

import dataclasses

import numpy as np

RULE = "mean of the images' class probabilities; prediction = argmax of the mean"
LEVELS = ("image", "breast", "study")


@dataclasses.dataclass
class Predictions:
    task: str
    head: str
    class_names: tuple[str, ...]
    images: list[dict]          # level image: path, sop_instance_uid, study, laterality, view, probs
    breasts: list[dict]         # level breast: study, laterality, n_images, probs
    studies: list[dict]         # level study: study, n_images, probs
    skipped: list[dict]         # path, reason
    rule: str = RULE
    seconds: dict = dataclasses.field(default_factory=dict)  # read / model time of predict_dicoms

    def rows(self) -> list[dict]:
        """Every row, image rows first, then breasts, studies and skipped files."""
        return self.images + self.breasts + self.studies + self.skipped


def _group(images: list[dict], key) -> list[tuple[tuple, list[dict]]]:
    groups: dict[tuple, list[dict]] = {}
    for row in images:
        k = key(row)
        if k is not None:
            groups.setdefault(k, []).append(row)
    return sorted(groups.items())


def _summary(level: str, members: list[dict], extra: dict, task: str, head: str) -> dict:
    probs = np.mean(np.stack([m["probs"] for m in members]), axis=0).astype(np.float32)
    return {"level": level, "task": task, "head": head, **extra, "n_images": len(members),
            "rule": RULE, "probs": probs, "prediction": int(np.argmax(probs))}


def build(task: str, head: str, class_names, images, probs: np.ndarray, skipped,
          ids: dict | None = None) -> Predictions:
    """Predictions of `images` (dicom_input.DicomImage) with probabilities [N, C].

    ids: {absolute path: {"image_id", "study_id"}}, the dataset's anonymised ids; a file
    listed there is keyed by them (its study is study_id) instead of the UIDs."""
    probs = np.asarray(probs, np.float32)
    if probs.shape != (len(images), len(class_names)):
        raise ValueError(f"probabilities of shape {probs.shape} for {len(images)} images and "
                         f"{len(class_names)} classes")
    ids = ids or {}
    rows = []
    for im, p in zip(images, probs):
        known = ids.get(im.path)
        rows.append({"level": "image", "task": task, "head": head, "path": im.path,
                     "sop_instance_uid": im.sop_instance_uid,
                     "image_id": known["image_id"] if known else "",
                     "study": known["study_id"] if known else im.study_key,
                     "laterality": im.laterality, "view": im.view, "n_images": 1, "rule": "",
                     "probs": p, "prediction": int(np.argmax(p))})
    breasts = [_summary("breast", m, {"study": k[0], "laterality": k[1]}, task, head)
               for k, m in _group(rows, lambda r: (r["study"], r["laterality"])
                                  if r["laterality"] in ("L", "R") else None)]
    studies = [_summary("study", m, {"study": k[0]}, task, head)
               for k, m in _group(rows, lambda r: (r["study"],))]
    skipped_rows = [{"level": "skipped", "task": task, "head": head, "path": s.path,
                     "reason": s.reason} for s in skipped]
    return Predictions(task, head, tuple(class_names), rows, breasts, studies, skipped_rows)
