"""VinDr-Mammo breast-level_annotations.csv -> canonical rows (datasets.md §3).

VinDr has no patient id: one study is one patient (patient_id = study_id).
BI-RADS keeps its category number (1..5, the schema's 0..6 scale) and density
A..D -> 1..4. The official split is kept: "test" stays test; validation is
carved from the "training" studies by a seeded, persisted study-level split
(10 %). Procedure, reason, race, ethnicity, age, cancer and the mass /
calcification fields are unknown here; finding_annotations.csv is not read.
"""

from __future__ import annotations

import re

from data_prep import schema, splits
from data_prep.tables import TableError, clean_laterality, clean_text, image_table_rows

ANNOTATION_FILE = "breast-level_annotations.csv"
ANNOTATION_COLUMNS = ("study_id", "image_id", "laterality", "view_position", "breast_birads",
                      "breast_density", "split")
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {ANNOTATION_FILE: ANNOTATION_COLUMNS}
TRAIN_FRACTIONS = {"train": 0.9, "validation": 0.1}
OFFICIAL_SPLITS = {"training": "train", "test": "test"}
_BIRADS = re.compile(r"^bi-?rads\s*([0-6])$", re.IGNORECASE)
_DENSITY = re.compile(r"^density\s*([a-d])$", re.IGNORECASE)


def birads_of(value, where: str = ANNOTATION_FILE) -> int:
    """"BI-RADS 1".."BI-RADS 5" -> 1..5, missing -> -1, anything else a TableError."""
    text = clean_text(value)
    if not text:
        return -1
    match = _BIRADS.match(text)
    if not match:
        raise TableError(f"{where}: breast_birads {text!r} is not 'BI-RADS <n>'")
    return int(match.group(1))


def density_of(value, where: str = ANNOTATION_FILE) -> int:
    """"DENSITY A".."DENSITY D" -> 1..4, missing -> -1, anything else a TableError."""
    text = clean_text(value)
    if not text:
        return -1
    match = _DENSITY.match(text)
    if not match:
        raise TableError(f"{where}: breast_density {text!r} is not 'DENSITY A'..'DENSITY D'")
    return "abcd".index(match.group(1).lower()) + 1


def official_split_of(value, where: str = ANNOTATION_FILE) -> str:
    text = clean_text(value).lower()
    if text not in OFFICIAL_SPLITS:
        raise TableError(f"{where}: split {clean_text(value)!r} is not 'training' or 'test'")
    return OFFICIAL_SPLITS[text]


def load_rows(tables_dir: str, images_dir: str, *, splits_file: str,
              seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(rows, dropped) for every image of breast-level_annotations.csv."""
    name, kept, dropped = image_table_rows(tables_dir, images_dir, file=ANNOTATION_FILE,
                                           columns=ANNOTATION_COLUMNS, group_column="study_id",
                                           suffix=".dicom", image_subdir="images")
    rows = []
    for rec, image_id, study_id, dicom_path, where in kept:
        row = schema.empty_row()
        row.update(patient_id=study_id, study_id=study_id, image_id=image_id,
                   laterality=clean_laterality(rec["laterality"]),
                   view=clean_text(rec["view_position"]), image_type="2D",
                   birads=birads_of(rec["breast_birads"], where),
                   density=density_of(rec["breast_density"], where),
                   split=official_split_of(rec["split"], where), in_birads_test_subset=0,
                   in_density_test_subset=0, dicom_path=dicom_path)
        rows.append(row)

    # A study's images must agree on the official split, or the study would straddle two.
    official: dict[str, str] = {}
    for r in rows:
        if official.setdefault(r["study_id"], r["split"]) != r["split"]:
            raise TableError(f"{name}: study {r['study_id']} has images in both the "
                             f"training and the test split")
    training = sorted(s for s, v in official.items() if v == "train")
    assignment = splits.load_or_create_splits(splits_file, training, TRAIN_FRACTIONS, seed)
    # The official split wins: a stored file must not move studies across it.
    clash = sorted(s for s, v in official.items()
                   if (v == "test") != (assignment.get(s, "test") == "test"))
    if clash:
        raise ValueError(f"{splits_file}: studies stored on the wrong side of the official "
                         f"VinDr training/test split (e.g. {clash[:3]}); use a splits file "
                         f"made for VinDr")
    for r in rows:
        if r["split"] == "train":
            r["split"] = assignment[r["study_id"]]
        schema.validate_row(r, where=f"{name} image {r['image_id']}")
    return rows, dropped
