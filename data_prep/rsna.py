"""RSNA Screening Mammography train.csv -> canonical rows (datasets.md §2).

RSNA has no exam id, so study_id = patient_id (all of a patient's images form
one "study" for the second-view sampler). Procedure, reason, race and ethnicity
are not given ("" = unknown); every image is a 2D full-field mammogram.

Split (the real test set is hidden): patient-grouped, stratified by "patient has
any cancer image", seeded and persisted: 85 % train+validation / 15 % test, with
validation = 10 % of the train+validation patients -> train .765 / validation
.085 / test .15 (MaMA paper 85/15; D14: validation carved from train patients).
"""

from __future__ import annotations


from data_prep import schema, splits
from data_prep.tables import (TableError, clean_laterality, clean_text, image_table_rows,
                              parse_int, parse_number)

TRAIN_FILE = "train.csv"
TRAIN_COLUMNS = ("patient_id", "image_id", "laterality", "view", "age", "cancer",
                 "BIRADS", "density")
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {TRAIN_FILE: TRAIN_COLUMNS}
FRACTIONS = {"train": 0.765, "validation": 0.085, "test": 0.15}
DENSITY_LETTERS = {"A": 1, "B": 2, "C": 3, "D": 4}


def density_of(value, where: str = TRAIN_FILE) -> int:
    """Density letter A..D -> 1..4, missing -> -1; anything else is a TableError."""
    text = clean_text(value).upper()
    if not text:
        return -1
    if text not in DENSITY_LETTERS:
        raise TableError(f"{where}: density {text!r} is not one of A, B, C, D")
    return DENSITY_LETTERS[text]


def _small_int(value, column: str, allowed: range, where: str) -> int:
    """A coded integer column (BIRADS, cancer): missing -> -1, out of range -> TableError."""
    number = parse_number(value)
    if number is None:
        if clean_text(value):
            raise TableError(f"{where}: {column} {clean_text(value)!r} is not a number")
        return -1
    if number != int(number) or int(number) not in allowed:
        raise TableError(f"{where}: {column} {clean_text(value)!r} not in "
                         f"{allowed.start}..{allowed.stop - 1}")
    return int(number)


def birads_of(value, where: str = TRAIN_FILE) -> int:
    return _small_int(value, "BIRADS", range(0, 7), where)


def cancer_of(value, where: str = TRAIN_FILE) -> int:
    return _small_int(value, "cancer", range(0, 2), where)


def load_rows(tables_dir: str, images_dir: str, *, splits_file: str,
              seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(rows, dropped) for every image of train.csv; images lacking an id are dropped."""
    name, kept, dropped = image_table_rows(tables_dir, images_dir, file=TRAIN_FILE,
                                           columns=TRAIN_COLUMNS, group_column="patient_id",
                                           suffix=".dcm", image_subdir="train_images")
    rows = []
    for rec, image_id, patient_id, dicom_path, where in kept:
        age = parse_int(rec["age"])
        row = schema.empty_row()
        row.update(patient_id=patient_id, study_id=patient_id, image_id=image_id,
                   laterality=clean_laterality(rec["laterality"]), view=clean_text(rec["view"]),
                   image_type="2D", age=age if age >= 0 else -1,
                   density=density_of(rec["density"], where),
                   birads=birads_of(rec["BIRADS"], where),
                   cancer=cancer_of(rec["cancer"], where), in_birads_test_subset=0,
                   in_density_test_subset=0, dicom_path=dicom_path)
        rows.append(row)

    has_cancer: dict[str, int] = {}
    for r in rows:
        has_cancer[r["patient_id"]] = max(has_cancer.get(r["patient_id"], 0), int(r["cancer"] == 1))
    assignment = splits.load_or_create_splits(splits_file, list(has_cancer), FRACTIONS, seed,
                                              stratify=has_cancer)
    for r in rows:
        r["split"] = assignment[r["patient_id"]]
        schema.validate_row(r, where=f"{name} image {r['image_id']}")
    return rows, dropped
