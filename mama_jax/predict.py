"""Class probabilities of new mammograms, from DICOM files, with an exported model.

  python -m mama_jax.predict --model EXPORT_DIR --task density|birads|cancer \
      [--head zero-shot|probe|finetune] FILES_OR_FOLDERS... --out predictions.csv|.jsonl \
      [--ids ids.csv] [--batch-size 8]

Each DICOM is read by data_prep's reader, crop and resize with the settings the
training records were made with (the package's `decode`), then preprocessed as
evaluation. Rows: one per image (keyed by path and SOP Instance UID, or the dataset's
anonymised ids from --ids: a CSV with columns path, image_id, study_id), one per breast
(study + laterality) and one per study, each naming its aggregation rule, and one per
file that could not be read, with the reason. CSV columns prob_0..prob_{C-1} follow
the task's class order (mama_jax.input.captions.CLASS_NAMES); JSONL rows hold `probs`, and
its first line names the classes. No other DICOM header value is ever read into a row.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

CSV_FIELDS = ("level", "task", "head", "path", "sop_instance_uid", "image_id", "study",
              "laterality", "view", "n_images", "rule")
FORMATS = (".csv", ".jsonl")


def read_ids(path: str) -> dict:
    """{absolute file path: {"image_id", "study_id"}} from a CSV with those columns."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("path", "image_id", "study_id") if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: --ids CSV lacks column {missing[0]!r} (needs path, image_id, study_id)")
        base = os.path.dirname(os.path.abspath(path))
        return {os.path.abspath(os.path.join(base, r["path"])): {"image_id": r["image_id"],
                                                                  "study_id": r["study_id"]}
                for r in reader}


def _flat(row: dict, class_names) -> dict:
    out = {k: row.get(k, "") for k in CSV_FIELDS}
    probs = row.get("probs")
    for i in range(len(class_names)):
        out[f"prob_{i}"] = "" if probs is None else f"{float(probs[i]):.7g}"
    out["prediction"] = row.get("prediction", "")
    out["predicted_class"] = class_names[row["prediction"]] if "prediction" in row else ""
    out["reason"] = row.get("reason", "")
    return out


def write(preds, out: str, meta: dict) -> str:
    """Write every row of `preds` to out (.csv or .jsonl), atomically."""
    ext = os.path.splitext(out)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"--out {out}: the name must end in {' or '.join(FORMATS)}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.partial"
    with open(tmp, "w", newline="") as f:
        if ext == ".csv":
            fields = list(CSV_FIELDS) + [f"prob_{i}" for i in range(len(preds.class_names))] + [
                "prediction", "predicted_class", "reason"]
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for row in preds.rows():
                writer.writerow(_flat(row, preds.class_names))
        else:
            f.write(json.dumps({"level": "meta", "task": preds.task, "head": preds.head,
                                "classes": list(preds.class_names), "rule": preds.rule, **meta}) + "\n")
            for row in preds.rows():
                row = dict(row)
                if "probs" in row:
                    row["probs"] = [float(p) for p in row["probs"]]
                    row["predicted_class"] = preds.class_names[row["prediction"]]
                f.write(json.dumps(row) + "\n")
    os.replace(tmp, out)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mama_jax.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="FILES_OR_FOLDERS", help="DICOM files or folders")
    p.add_argument("--model", required=True, help="an export package folder (configs/export.py)")
    p.add_argument("--task", required=True, choices=("density", "birads", "cancer"))
    p.add_argument("--head", default="zero-shot", choices=("zero-shot", "probe", "finetune"))
    p.add_argument("--out", required=True, help="predictions.csv or predictions.jsonl")
    p.add_argument("--ids", default="", help="CSV of path, image_id, study_id: key rows by these ids")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes reading DICOMs while the model runs (1 = in this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if os.path.splitext(args.out)[1].lower() not in FORMATS:
        raise SystemExit(f"--out {args.out}: the name must end in {' or '.join(FORMATS)}")
    import mama_jax

    t0 = time.perf_counter()
    model = mama_jax.load(args.model)
    load_s = time.perf_counter() - t0
    ids = read_ids(args.ids) if args.ids else None
    t1 = time.perf_counter()
    preds = model.predict_dicoms(args.inputs, args.task, args.head, batch_size=args.batch_size,
                                 progress=not args.no_progress, ids=ids, workers=args.workers)
    seconds = time.perf_counter() - t1
    meta = {"model": model.path, "step": model.step, "decode": model.decode}
    write(preds, args.out, meta)
    for s in preds.skipped:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    n = len(preds.images)
    print(f"{n} images predicted ({len(preds.breasts)} breasts, {len(preds.studies)} studies), "
          f"{len(preds.skipped)} files skipped -> {args.out}")
    split = preds.seconds
    print(f"{n / seconds if seconds > 0 else 0.0:.2f} images/s ({seconds:.1f} s: read + decode + crop, waited for, "
          f"{split.get('read', 0.0):.1f} s, preprocess + model {split.get('model', 0.0):.1f} s incl. "
          f"the first batch's compile; batch {args.batch_size}; {args.workers} reader process(es); "
          f"model load {load_s:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
