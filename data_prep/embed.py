"""EMBED tables -> canonical rows (datasets.md §1, reference_behaviour.md §3.1, D19).

One row per 2D image of the metadata table. Labels come from one clinical
(finding) row of the same exam, chosen by MaMA's rule: rows on the image's side,
else bilateral rows, else all; then the BI-RADS-0 row when every assessment is
0..2 and one is 0, otherwise the highest assessment. The choice is made among
the side-filtered rows (the official code indexes the unfiltered rows: D19).
"""

from __future__ import annotations

import os
import re

import pandas as pd

from data_prep import schema, splits
from data_prep.tables import (TableError, check_unique_ids, choose_image_root, clean_id,
                              clean_laterality, clean_text, is_missing, load_table,
                              parse_int, parse_number)

METADATA_FILES = ("EMBED_OpenData_metadata.csv", "EMBED_OpenData_metadata_reduced.csv")
CLINICAL_FILES = ("EMBED_OpenData_clinical.csv", "EMBED_OpenData_clinical_reduced.csv")
LEGEND_FILE = "AWS_Open_Data_Clinical_Legend.csv"

METADATA_COLUMNS = ("empi_anon", "acc_anon", "anon_dicom_path", "StudyDescription",
                    "FinalImageType", "ImageLateralityFinal", "ViewPosition")
# Lesion boxes in DICOM pixels, "((ymin, xmin, ymax, xmax), ...)"; without it, no boxes.
ROI_COLUMN = "ROI_coords"
CLINICAL_COLUMNS = ("acc_anon", "asses", "tissueden", "side", "massshape", "massdens",
                    "calcfind", "calcdistri", "age_at_study", "ETHNIC_GROUP_DESC")
# MaMA reads RACE_DESC; other EMBED exports call the same column ETHNICITY_DESC.
RACE_COLUMNS = ("RACE_DESC", "ETHNICITY_DESC")
# Without path_severity the cancer label is simply unknown (-1).
OPTIONAL_CLINICAL = ("path_severity",)
LEGEND_COLUMNS = ("Header in export", "Code", "Meaning")  # "Discription"/"Description" unused

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    **{name: METADATA_COLUMNS for name in METADATA_FILES},
    **{name: CLINICAL_COLUMNS for name in CLINICAL_FILES},
    LEGEND_FILE: LEGEND_COLUMNS,
}
ONE_OF_COLUMNS: dict[str, tuple[tuple[str, ...], ...]] = {
    name: (RACE_COLUMNS,) for name in CLINICAL_FILES}

DICOM_PREFIX = "/mnt/NAS2/mammo/anon_dicom/"
FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}
BIRADS_LETTERS = {"A": 0, "N": 1, "B": 2, "P": 3, "S": 4, "M": 5, "K": 6}  # X: no assessment
HISPANIC = "Hispanic or Latino"
NON_HISPANIC = "Non-Hispanic or Latino"
# row field -> clinical column decoded through the legend
CODED_FIELDS = {"mass_shape": "massshape", "mass_density": "massdens",
                "calc_type": "calcfind", "calc_distribution": "calcdistri"}
SUBSET_SEED = 42


def decode_legend(legend_df: pd.DataFrame) -> dict[str, dict[str, str]]:
    """{clinical column: {code: lower-case meaning}} from the legend table.

    A blank "Header in export" continues the column above it (legends exported from
    spreadsheets often name the column once per block).
    """
    missing = [c for c in LEGEND_COLUMNS if c not in legend_df.columns]
    if missing:
        raise TableError(f"{LEGEND_FILE}: missing required column(s) {', '.join(missing)}")
    legend: dict[str, dict[str, str]] = {}
    column = ""
    for header, code, meaning in zip(legend_df["Header in export"], legend_df["Code"],
                                     legend_df["Meaning"]):
        if not is_missing(header):
            column = clean_text(header).lower()
        code, meaning = _code(code), clean_text(meaning).lower()
        if column and code and meaning:
            legend.setdefault(column, {}).setdefault(code, meaning)
    return legend


def _code(value) -> str:
    """A code as text; numeric codes lose float artefacts ("9.0" -> "9")."""
    return clean_id(value)


def birads_of(letter) -> int | None:
    """BI-RADS class 0..6 for an `asses` letter, None when missing or invalid (X)."""
    return BIRADS_LETTERS.get(clean_text(letter).upper())


def rows_for_side(exam_rows: list[dict], laterality: str) -> list[dict]:
    """Findings on the image's side, else bilateral findings, else all (§1.7 step 1)."""
    side = [r for r in exam_rows if laterality and clean_text(r["side"]).upper() == laterality]
    if side:
        return side
    both = [r for r in exam_rows if clean_text(r["side"]).upper() == "B"]
    return both or list(exam_rows)


def select_finding(side_rows: list[dict]) -> dict | None:
    """The finding whose labels the image takes (§1.7 step 2), None if none is assessed."""
    graded = [(birads_of(r["asses"]), r) for r in side_rows]
    graded = [(k, r) for k, r in graded if k is not None]
    if not graded:
        return None
    ks = [k for k, _ in graded]
    target = 0 if max(ks) <= 2 and min(ks) == 0 else max(ks)
    return next(r for k, r in graded if k == target)


def cancer_label(side_rows: list[dict]) -> int:
    """1 if a finding has pathology severity 0/1, 0 if one has 2..5, else -1 (unknown)."""
    severities = {parse_number(r.get("path_severity")) for r in side_rows}
    if severities & {0.0, 1.0}:
        return 1
    if severities & {2.0, 3.0, 4.0, 5.0}:
        return 0
    return -1


def reason_of(description: str) -> str:
    """"screening" / "diagnostic" from a study description, "" if neither word is there."""
    text = description.lower()
    if "screen" in text:
        return "screening"
    if "diag" in text:
        return "diagnostic"
    return ""


def ethnicity_of(value) -> str:
    return HISPANIC if clean_text(value).lower() == HISPANIC.lower() else NON_HISPANIC


def relative_dicom_path(anon_path: str, prefix: str = DICOM_PREFIX) -> str:
    """anon_dicom_path without the site prefix; other paths are returned unchanged."""
    prefix = prefix.rstrip("/") + "/"
    if anon_path.startswith(prefix):
        return anon_path[len(prefix):]
    return anon_path


def image_id_of(anon_path: str) -> str:
    """The SOP instance uid: the file name without a .dcm/.dicom extension.

    The uid itself contains dots, so only a known DICOM extension is removed.
    """
    name = os.path.basename(anon_path.rstrip("/"))
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in (".dcm", ".dicom") else name


_ROI_NUMBER = r"\s*(-?\d+(?:\.\d*)?)\s*"
_ROI_BOX = re.compile(r"[(\[]" + ",".join([_ROI_NUMBER] * 4) + r"[)\]]")


def roi_boxes_of(value, where: str = ROI_COLUMN) -> str:
    """ROI_coords "((ymin, xmin, ymax, xmax), ...)" (inclusive pixels; "()" or missing
    for none) -> the row's roi_boxes text, "y0,x0,y1,x1;..." with exclusive ends.

    Anything else, or a box with ymax < ymin or xmax < xmin, is a TableError.
    """
    text = clean_text(value)
    if not text:
        return schema.UNKNOWN_TEXT
    boxes = [tuple(float(v) for v in m.groups()) for m in _ROI_BOX.finditer(text)]
    # Whatever is left once the boxes are taken out must be brackets, commas and blanks.
    if _ROI_BOX.sub("", text).strip("()[], ") or any(
            b[2] < b[0] or b[3] < b[1] or min(b) < 0 for b in boxes):
        raise TableError(f"{where}: {ROI_COLUMN} {text!r} is not "
                         f"'((ymin, xmin, ymax, xmax), ...)' with ymin <= ymax, xmin <= xmax")
    return schema.format_boxes((int(y0), int(x0), int(y1) + 1, int(x1) + 1)
                               for y0, x0, y1, x1 in boxes)


def _records(df: pd.DataFrame, columns) -> list[dict]:
    cols = [c for c in columns if c in df.columns]
    return [dict(zip(cols, values)) for values in zip(*(df[c].tolist() for c in cols))]


def _clinical_by_exam(df: pd.DataFrame, race_column: str) -> dict[str, list[dict]]:
    columns = CLINICAL_COLUMNS + OPTIONAL_CLINICAL + (race_column,)
    exams: dict[str, list[dict]] = {}
    for rec in _records(df, columns):
        rec["race"] = rec[race_column]
        exams.setdefault(clean_id(rec["acc_anon"]), []).append(rec)
    return exams


def _label_image(meta: dict, exams: dict[str, list[dict]], legend) -> dict | str:
    """Caption/label fields for one 2D image, or the reason it is dropped."""
    description = clean_text(meta["StudyDescription"])
    reason = reason_of(description)
    if not reason:
        return "no screening/diagnostic reason in StudyDescription"
    exam_rows = exams.get(clean_id(meta["acc_anon"]))
    if not exam_rows:
        return "no clinical rows for exam"
    laterality = clean_laterality(meta["ImageLateralityFinal"])
    side_rows = rows_for_side(exam_rows, laterality)
    finding = select_finding(side_rows)
    if finding is None:
        return "no BI-RADS assessment"
    density_value = parse_number(finding["tissueden"])
    if density_value is None:
        return "density missing"
    if density_value == 5:
        return "density 5 (normal male)"
    if density_value not in (1, 2, 3, 4):
        return f"density invalid ({clean_text(finding['tissueden'])})"
    fields = {
        "laterality": laterality,
        "procedure": description,
        "reason": reason,
        "birads": birads_of(finding["asses"]),
        "density": int(density_value),
        "cancer": cancer_label(side_rows),
        "age": parse_int(finding["age_at_study"]),
        "race": clean_text(finding["race"]),
        "ethnicity": ethnicity_of(finding["ETHNIC_GROUP_DESC"]),
    }
    if fields["age"] < 0:
        fields["age"] = -1
    for field, column in CODED_FIELDS.items():
        fields[field] = legend.get(column, {}).get(_code(finding[column]), "")
    return fields


def load_rows(tables_dir: str, images_dir: str, *, splits_file: str, seed: int = 0,
              dicom_prefix: str = DICOM_PREFIX) -> tuple[list[dict], list[dict]]:
    """(rows, dropped) for every image of the EMBED metadata table.

    rows: schema rows + dicom_path; dropped: {"image_id", "dicom_path", "reason"}.
    """
    meta_path, meta_df = load_table(tables_dir, METADATA_FILES, METADATA_COLUMNS,
                                    optional=(ROI_COLUMN,))
    _, clin_df = load_table(tables_dir, CLINICAL_FILES, CLINICAL_COLUMNS,
                           one_of=(RACE_COLUMNS,), optional=OPTIONAL_CLINICAL)
    _, legend_df = load_table(tables_dir, LEGEND_FILE, LEGEND_COLUMNS)
    legend = decode_legend(legend_df)
    race_column = next(c for c in RACE_COLUMNS if c in clin_df.columns)
    exams = _clinical_by_exam(clin_df, race_column)

    metas = _records(meta_df, METADATA_COLUMNS + (ROI_COLUMN,))
    anon_paths = [clean_text(m["anon_dicom_path"]) for m in metas]
    image_ids = [image_id_of(p) if p else "" for p in anon_paths]
    check_unique_ids(image_ids, meta_path)
    relative = [relative_dicom_path(p, dicom_prefix) for p in anon_paths]
    root = choose_image_root([images_dir, os.path.join(images_dir, "images")], relative)

    rows, dropped = [], []
    for i, (meta, image_id, rel) in enumerate(zip(metas, image_ids, relative)):
        dicom_path = os.path.abspath(os.path.join(root, rel)) if rel else ""
        image_type = clean_text(meta["FinalImageType"])
        if not image_id:
            problem = "anon_dicom_path missing"
        elif image_type.upper() != "2D":
            problem = f"FinalImageType {image_type or 'missing'}"
        elif not clean_id(meta["empi_anon"]) or not clean_id(meta["acc_anon"]):
            problem = "empi_anon or acc_anon missing"
        else:
            problem = _label_image(meta, exams, legend)
        if isinstance(problem, str):
            dropped.append({"image_id": image_id or f"{os.path.basename(meta_path)}:row{i}",
                            "dicom_path": dicom_path, "reason": problem})
            continue
        row = schema.empty_row()
        row.update(problem)
        row.update(patient_id=clean_id(meta["empi_anon"]), study_id=clean_id(meta["acc_anon"]),
                   image_id=image_id, view=clean_text(meta["ViewPosition"]), image_type="2D",
                   roi_boxes=roi_boxes_of(meta.get(ROI_COLUMN),
                                          f"{os.path.basename(meta_path)} image {image_id}"),
                   dicom_path=dicom_path)
        rows.append(row)

    assignment = splits.load_or_create_splits(
        splits_file, [r["patient_id"] for r in rows], FRACTIONS, seed)
    for r in rows:
        r["split"] = assignment[r["patient_id"]]
    birads_subset = splits.stratified_test_subset(rows, "birads", seed=SUBSET_SEED)
    density_subset = splits.stratified_test_subset(rows, "density", seed=SUBSET_SEED)
    for r in rows:
        r["in_birads_test_subset"] = int(r["image_id"] in birads_subset)
        r["in_density_test_subset"] = int(r["image_id"] in density_subset)
        schema.validate_row(r, where=f"{os.path.basename(meta_path)} image {r['image_id']}")
    return rows, dropped
