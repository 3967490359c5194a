"""The record contract between data_prep and mama_jax (see DESIGN.md).

A table adapter (embed.py, rsna.py, vindr.py) turns a dataset's tables into
canonical rows: one dict per image with exactly the fields of ROW_FIELDS plus
`dicom_path` (where to read the pixels; never stored in a record). The builder
adds the decoded `image` and writes one record per row.

Unknown values have one spelling per type: "" for text, -1 for integers.

`roi_boxes` holds lesion boxes as "y0,x0,y1,x1;y0,x0,y1,x1" (integer pixels, y1 and
x1 exclusive; "" = no box known). In a row the boxes are in the source DICOM's
pixels; the builder maps them through the crop and resize of the image, so in a
stored record they are in the stored image's pixels. Datasets built before the
field existed lack it: readers treat a missing field as no boxes.
Only anonymised dataset ids and clinical table fields live here: nothing is
ever copied from a DICOM header except laterality and view.
"""

from __future__ import annotations

# name -> python type of the stored value
TEXT_FIELDS = (
    "patient_id",   # dataset's anonymised patient id (EMBED empi_anon)
    "study_id",     # exam id (EMBED acc_anon, RSNA: patient id, VinDr study_id)
    "image_id",     # dataset's anonymised image id; unique within a dataset
    "laterality",   # "L" / "R" / ""
    "view",         # "CC" / "MLO" / other raw view code / ""
    "procedure",    # study description, e.g. "MG Screening Bilateral w/CAD"
    "reason",       # "screening" / "diagnostic" / ""
    "race",
    "ethnicity",
    "image_type",   # "2D", "C-view", ...
    "mass_shape",   # decoded legend meaning, "" if no mass
    "mass_density",
    "calc_type",
    "calc_distribution",
    "split",        # "train" / "validation" / "test"
    "roi_boxes",    # lesion boxes "y0,x0,y1,x1;..." (see above), "" if none
)
INT_FIELDS = (
    "age",          # years, -1 unknown
    "density",      # BI-RADS breast density 1..4, -1 unknown
    "birads",       # BI-RADS assessment 0..6, -1 unknown
    "cancer",       # 1 / 0 / -1 unknown
    "in_birads_test_subset",   # 1 if in the stratified EMBED test subset for BI-RADS
    "in_density_test_subset",  # 1 if in the stratified EMBED test subset for density
)
ROW_FIELDS = TEXT_FIELDS + INT_FIELDS
SPLITS = ("train", "validation", "test")
VIEWS = ("CC", "MLO")
UNKNOWN_TEXT = ""
UNKNOWN_INT = -1


def format_boxes(boxes) -> str:
    """[(y0, x0, y1, x1), ...] -> "y0,x0,y1,x1;..." ("" for none)."""
    return ";".join(",".join(str(int(v)) for v in box) for box in boxes)


def parse_boxes(text: str, where: str = "roi_boxes") -> list[tuple[int, int, int, int]]:
    """"y0,x0,y1,x1;..." -> [(y0, x0, y1, x1), ...]; ValueError naming `where` if malformed."""
    boxes = []
    for part in text.split(";") if text.strip() else ():
        values = part.split(",")
        try:
            box = tuple(int(v) for v in values)
        except ValueError:
            box = ()
        if len(box) != 4 or min(box) < 0 or box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"{where}: box {part.strip()!r} is not 'y0,x0,y1,x1' with "
                             f"0 <= y0 < y1 and 0 <= x0 < x1")
        boxes.append(box)
    return boxes


def empty_row() -> dict:
    """A row with every field unknown."""
    row = {k: UNKNOWN_TEXT for k in TEXT_FIELDS}
    row.update({k: UNKNOWN_INT for k in INT_FIELDS})
    return row


def validate_row(row: dict, where: str = "row") -> None:
    """Raise ValueError naming the field if a row breaks the contract."""
    missing = [k for k in ROW_FIELDS + ("dicom_path",) if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    extra = sorted(set(row) - set(ROW_FIELDS) - {"dicom_path"})
    if extra:
        raise ValueError(f"{where}: unexpected field(s) {', '.join(extra)}")
    for k in TEXT_FIELDS:
        if not isinstance(row[k], str):
            raise ValueError(f"{where}: field {k!r} must be str, got {type(row[k]).__name__}")
    for k in INT_FIELDS:
        if not isinstance(row[k], int) or isinstance(row[k], bool):
            raise ValueError(f"{where}: field {k!r} must be int, got {type(row[k]).__name__}")
    if row["split"] not in SPLITS:
        raise ValueError(f"{where}: split {row['split']!r} not in {SPLITS}")
    if row["laterality"] not in ("L", "R", ""):
        raise ValueError(f"{where}: laterality {row['laterality']!r} not L/R/''")
    if not (row["density"] == -1 or 1 <= row["density"] <= 4):
        raise ValueError(f"{where}: density {row['density']} not in 1..4 or -1")
    if not (row["birads"] == -1 or 0 <= row["birads"] <= 6):
        raise ValueError(f"{where}: birads {row['birads']} not in 0..6 or -1")
    if row["cancer"] not in (-1, 0, 1):
        raise ValueError(f"{where}: cancer {row['cancer']} not in -1/0/1")
    parse_boxes(row["roi_boxes"], where=f"{where}: roi_boxes")
