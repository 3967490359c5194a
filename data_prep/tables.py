"""Shared helpers for the table adapters: find and read CSVs, clean values, place images.

Every table is read as text (dtype=str) so ids never pick up float artefacts
("12345.0") and codes such as "0" or "+" survive unchanged; numbers are parsed
field by field where they are needed.
"""

from __future__ import annotations

import math
import os
import re
from typing import Iterable, Sequence

import pandas as pd


class TableError(ValueError):
    """A table is present but unusable (missing column, unreadable value)."""


# pandas' default NA spellings minus "None", which can be a real legend meaning.
_NA_VALUES = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
              "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "n/a", "nan", "null"]
_FLOAT_INT = re.compile(r"^[+-]?\d+\.0*$")


def find_table(tables_dir: str, names: str | Sequence[str]) -> str:
    """Return the path of the first of `names` found in tables_dir or tables_dir/tables."""
    names = (names,) if isinstance(names, str) else tuple(names)
    places = [tables_dir, os.path.join(tables_dir, "tables")]
    for name in names:
        for place in places:
            path = os.path.join(place, name)
            if os.path.isfile(path):
                return os.path.abspath(path)
    raise FileNotFoundError(
        f"table {' or '.join(names)} not found; looked in {' and '.join(places)}")


def read_table(path: str, required: Iterable[str] = (), *,
               one_of: Iterable[Sequence[str]] = (),
               optional: Iterable[str] = ()) -> pd.DataFrame:
    """Read a CSV as text, keeping only the required, one-of and optional columns.

    Raises TableError naming the file and the missing column(s). Column names are
    stripped of surrounding blanks (and a UTF-8 BOM) before matching.
    """
    name = os.path.basename(path)
    try:
        header = pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise TableError(f"{name}: cannot read the CSV header ({e})") from e
    present = {str(c).strip() for c in header}
    required = tuple(required)
    missing = [c for c in required if c not in present]
    if missing:
        raise TableError(f"{name}: missing required column(s) {', '.join(missing)} "
                         f"(file {path})")
    wanted = set(required) | {c for c in optional if c in present}
    for group in one_of:
        found = [c for c in group if c in present]
        if not found:
            raise TableError(f"{name}: needs one of the columns {' / '.join(group)} "
                             f"(file {path})")
        wanted |= set(found)
    try:
        df = pd.read_csv(path, dtype=str, encoding="utf-8-sig", keep_default_na=False,
                         na_values=_NA_VALUES, usecols=lambda c: str(c).strip() in wanted)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise TableError(f"{name}: cannot parse the CSV ({e})") from e
    df.columns = [str(c).strip() for c in df.columns]
    return df


def load_table(tables_dir: str, names: str | Sequence[str], required: Iterable[str] = (), *,
               one_of: Iterable[Sequence[str]] = (),
               optional: Iterable[str] = ()) -> tuple[str, pd.DataFrame]:
    """find_table + read_table; returns (path, frame)."""
    path = find_table(tables_dir, names)
    return path, read_table(path, required, one_of=one_of, optional=optional)


def is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def clean_text(value) -> str:
    """Stripped string; "" for NaN/None/blank."""
    if type(value) is str:  # the common case, kept fast for tables of 10^5+ rows
        return value.strip()
    return "" if is_missing(value) else str(value).strip()


def clean_id(value) -> str:
    """An id as text without a float artefact ("12345.0" -> "12345"); "" if missing."""
    text = clean_text(value)
    if text.endswith("0") and _FLOAT_INT.match(text):
        text = text.split(".")[0]
    return text


def parse_number(value) -> float | None:
    """A float, or None when the value is missing or not a number."""
    text = clean_text(value)
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return None if math.isnan(number) else number


def parse_int(value, default: int = -1) -> int:
    """int(float(value)) (truncates, as int(age) does), or default when missing/not numeric."""
    number = parse_number(value)
    return default if number is None or math.isinf(number) else int(number)


def clean_laterality(value) -> str:
    """"L"/"R", anything else (B, NaN, junk) -> "" (unknown in the row contract)."""
    text = clean_text(value).upper()
    return text if text in ("L", "R") else ""


def choose_image_root(candidates: Sequence[str], relative_paths: Sequence[str],
                      sample: int = 50) -> str:
    """Pick the folder under which the images live, by probing a few listed paths.

    Existence is checked for at most `sample` paths per candidate (not per file):
    the root where most of them exist wins; ties go to the earlier candidate, and
    with no hit at all the first candidate that is a directory (else the first).
    """
    candidates = [os.path.abspath(c) for c in candidates]
    probe = [p for p in relative_paths if p and not os.path.isabs(p)][:sample]
    hits = [sum(os.path.exists(os.path.join(c, p)) for p in probe) for c in candidates]
    best = max(range(len(candidates)), key=lambda i: (hits[i], -i))
    if hits[best] > 0:
        return candidates[best]
    for c in candidates:
        if os.path.isdir(c):
            return c
    return candidates[0]


def absolute_path(root: str, path: str) -> str:
    """An absolute, normalised path: `path` itself if absolute, else joined to root."""
    if not path:
        return ""
    return os.path.abspath(path if os.path.isabs(path) else os.path.join(root, path))


def duplicates(values: Iterable[str]) -> list[str]:
    """Values that occur more than once, in first-seen order."""
    seen, dup = set(), []
    for v in values:
        if v in seen and v not in dup:
            dup.append(v)
        seen.add(v)
    return dup


def check_unique_ids(ids: Sequence[str], path: str, what: str = "image_id") -> None:
    """Raise TableError naming the file if an id repeats (the builder needs unique ids)."""
    dup = duplicates(i for i in ids if i)
    if dup:
        shown = ", ".join(dup[:5]) + (" ..." if len(dup) > 5 else "")
        raise TableError(f"{os.path.basename(path)}: {len(dup)} duplicated {what}(s): {shown}")


def image_table_rows(tables_dir: str, images_dir: str, *, file: str, columns: Sequence[str],
                     group_column: str, suffix: str, image_subdir: str):
    """Walk a one-row-per-image table whose DICOMs live at <group>/<image_id><suffix>.

    Returns (file name, kept, dropped): kept holds (record, image_id, group_id,
    dicom_path, where) per usable row; a row lacking either id is dropped with its
    reason (the batch job accounts for every input). Images are looked for under
    images_dir/image_subdir, else images_dir itself.
    """
    path, df = load_table(tables_dir, file, columns)
    name = os.path.basename(path)
    records = [dict(zip(columns, values)) for values in zip(*(df[c].tolist() for c in columns))]
    image_ids = [clean_id(r["image_id"]) for r in records]
    group_ids = [clean_id(r[group_column]) for r in records]
    check_unique_ids(image_ids, path)
    relative = [f"{g}/{i}{suffix}" if g and i else "" for g, i in zip(group_ids, image_ids)]
    root = choose_image_root([os.path.join(images_dir, image_subdir), images_dir], relative)
    kept, dropped = [], []
    for n, (rec, image_id, group_id, rel) in enumerate(zip(records, image_ids, group_ids, relative)):
        dicom_path = os.path.abspath(os.path.join(root, rel)) if rel else ""
        if not image_id or not group_id:
            dropped.append({"image_id": image_id or f"{name}:row{n}", "dicom_path": dicom_path,
                            "reason": f"{group_column} or image_id missing"})
            continue
        kept.append((rec, image_id, group_id, dicom_path, f"{name} image {image_id}"))
    return name, kept, dropped
