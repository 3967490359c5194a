"""`python -m data_prep build`: tables + DICOMs -> TFDS ArrayRecord dataset.

Two stages so a killed build loses nothing finished: decode every DICOM into a
cache with a manifest line per input (prepare.py), then pack rows and cached
images into the TFDS dataset (builder.py). Re-running skips decoded images and
re-packs from scratch, so the dataset is complete and free of duplicates.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil

from data_prep import builder, prepare, schema

ADAPTERS = ("embed", "rsna", "vindr")
DICOM_SUFFIXES = (".dcm", ".dicom")


def _adapter(name: str):
    if name not in ADAPTERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(ADAPTERS)}")
    import importlib
    return importlib.import_module(f"data_prep.{name}")


def _unlisted_dicoms(images_dir: str, listed: set[str]) -> list[dict]:
    """DICOM files under images_dir that no table row names: skipped, with a reason."""
    found = []
    for root, _, files in os.walk(images_dir):
        for name in files:
            if name.lower().endswith(DICOM_SUFFIXES):
                path = os.path.abspath(os.path.join(root, name))
                if path not in listed:
                    found.append({"image_id": "unlisted:" + os.path.relpath(path, images_dir),
                                  "dicom_path": path, "reason": "not listed in the tables"})
    return sorted(found, key=lambda e: e["image_id"])


def _fingerprint(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for row in sorted(rows, key=lambda r: r["image_id"]):
        h.update(json.dumps({k: row[k] for k in schema.ROW_FIELDS}, sort_keys=True).encode())
    return h.hexdigest()


def _apply_decoded(row: dict, entry: dict) -> dict:
    """Laterality and view: the table wins; the DICOM fills what the table lacks."""
    row = dict(row)
    row["laterality"] = row["laterality"] or entry.get("dicom_laterality", "")
    row["view"] = row["view"] or entry.get("dicom_view", "")
    return row


def build(dataset: str, tables_dir: str, images_dir: str, out_dir: str, *,
          workers: int | None = None, long_side: int = 1036, voi: str = "none",
          seed: int = 0, splits_file: str | None = None, scan_images: bool = True,
          j2k_reduce: bool = True) -> dict:
    """Run both stages; return a summary with counts per status and split.

    j2k_reduce=False decodes JPEG 2000 at full resolution (the path before reduced decodes).
    """
    adapter = _adapter(dataset)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    splits_file = splits_file or os.path.join(out_dir, "splits.json")
    rows, dropped = adapter.load_rows(tables_dir, images_dir, splits_file=splits_file, seed=seed)
    for i, row in enumerate(rows):
        schema.validate_row(row, where=f"{dataset} row {i} (image {row.get('image_id')})")
    ids = [r["image_id"] for r in rows] + [d["image_id"] for d in dropped]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{dataset}: image_id is not unique across the tables")

    skips = list(dropped)
    if scan_images and os.path.isdir(images_dir):
        listed = {os.path.abspath(r["dicom_path"]) for r in rows}
        listed |= {os.path.abspath(d["dicom_path"]) for d in dropped if d.get("dicom_path")}
        skips += _unlisted_dicoms(images_dir, listed)

    opts = prepare.DecodeOptions(long_side=long_side, voi=voi, j2k_reduce=j2k_reduce)
    entries = prepare.decode_all([(r["image_id"], r["dicom_path"]) for r in rows], out_dir,
                                 opts, workers or os.cpu_count() or 1, table_skips=skips)
    written = [_apply_decoded(r, entries[r["image_id"]]) for r in rows
               if entries[r["image_id"]]["status"] == "written"]
    _pack(dataset, written, out_dir)

    summary = {
        "inputs": len(rows) + len(skips),
        "written": len(written),
        "skipped": len(rows) + len(skips) - len(written),
        "splits": {s: sum(r["split"] == s for r in written) for s in schema.SPLITS},
        "dataset_dir": dataset_dir(out_dir, dataset),
        "manifest": os.path.join(out_dir, prepare.MANIFEST),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def dataset_dir(out_dir: str, dataset: str) -> str:
    return os.path.join(out_dir, "tfds", "mammography", dataset, builder.VERSION)


def _pack(dataset: str, rows: list[dict], out_dir: str) -> None:
    """Write the TFDS dataset unless an identical one is already complete."""
    target = dataset_dir(out_dir, dataset)
    stamp = os.path.join(out_dir, f"packed_{dataset}.sha256")
    fingerprint = _fingerprint(rows)
    if os.path.isdir(target) and os.path.exists(stamp) and open(stamp).read() == fingerprint:
        return
    # A killed pack leaves a partial or stale dataset: start it over.
    shutil.rmtree(target, ignore_errors=True)
    for leftover in glob.glob(os.path.join(os.path.dirname(target), "*incomplete*")):
        shutil.rmtree(leftover, ignore_errors=True)
    if os.path.exists(stamp):
        os.remove(stamp)
    b = builder.Mammography(config=dataset, data_dir=os.path.join(out_dir, "tfds"),
                            rows=rows, cache_dir=out_dir, file_format="array_record")
    b.download_and_prepare()
    with open(stamp, "w") as f:
        f.write(fingerprint)
