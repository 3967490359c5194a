"""RSNA and VinDr adapters on made-up tables with the real column names."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from data_prep import rsna, schema, vindr
from data_prep.tables import TableError


def _rsna_table(patients=200, cancer_every=10, seed=0):
    rng = np.random.default_rng(seed)
    rows, image = [], 1000
    for p in range(patients):
        pid = 10000 + p
        sick = p % cancer_every == 0
        for side in "LR":
            for view in ("CC", "MLO"):
                image += 1
                rows.append({
                    "site_id": 1 + p % 2, "patient_id": pid, "image_id": image,
                    "laterality": side, "view": view,
                    "age": float(rng.integers(40, 80)) if p % 7 else np.nan,
                    "cancer": int(sick and side == "L"), "biopsy": 0, "invasive": 0,
                    "BIRADS": [0.0, 1.0, 2.0, np.nan][p % 4],
                    "implant": 0, "density": ["A", "B", "C", "D", np.nan][p % 5],
                    "machine_id": 49, "difficult_negative_case": False})
    return pd.DataFrame(rows)


def _rsna_load(tmp_path, df, sub=""):
    folder = tmp_path / sub
    folder.mkdir(parents=True, exist_ok=True)
    df.to_csv(folder / "train.csv", index=False)
    return rsna.load_rows(str(tmp_path), str(tmp_path), splits_file=str(tmp_path / "rsna.json"))


def _patient_splits(rows):
    seen = {}
    for r in rows:
        seen.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in seen.values()), "a patient straddles two splits"
    return {p: s.pop() for p, s in seen.items()}


def test_rsna_label_maps_and_fields(tmp_path):
    df = _rsna_table(patients=10)
    rows, dropped = _rsna_load(tmp_path, df)
    assert len(rows) == 40 and not dropped
    by_id = {r["image_id"]: r for r in rows}
    for rec in df.to_dict("records"):
        r = by_id[str(rec["image_id"])]
        schema.validate_row(r)
        assert r["patient_id"] == r["study_id"] == str(rec["patient_id"])
        assert r["density"] == {"A": 1, "B": 2, "C": 3, "D": 4}.get(rec["density"], -1)
        assert r["birads"] == (-1 if np.isnan(rec["BIRADS"]) else int(rec["BIRADS"]))
        assert r["age"] == (-1 if np.isnan(rec["age"]) else int(rec["age"]))
        assert r["cancer"] == rec["cancer"]
        assert (r["laterality"], r["view"], r["image_type"]) == \
            (rec["laterality"], rec["view"], "2D")
        assert r["procedure"] == r["reason"] == ""
        assert r["in_birads_test_subset"] == r["in_density_test_subset"] == 0
        assert r["race"] == r["ethnicity"] == ""
        assert r["dicom_path"] == str(tmp_path / str(rec["patient_id"]) / f"{rec['image_id']}.dcm")


def test_rsna_split_is_patient_grouped_and_cancer_stratified(tmp_path):
    rows, _ = _rsna_load(tmp_path, _rsna_table(patients=400, cancer_every=10))
    split_of = _patient_splits(rows)
    sick = {r["patient_id"] for r in rows if r["cancer"] == 1}
    assert len(sick) == 40
    sick_splits = [split_of[p] for p in sick]
    assert sick_splits.count("test") == 6 and sick_splits.count("validation") == 3
    counts = {s: list(split_of.values()).count(s) for s in schema.SPLITS}
    assert counts == {"train": 306, "validation": 34, "test": 60}
    # Reused on a second call.
    with pytest.warns(UserWarning, match="reusing the stored split"):
        again, _ = rsna.load_rows(str(tmp_path), str(tmp_path),
                                  splits_file=str(tmp_path / "rsna.json"), seed=5)
    assert _patient_splits(again) == split_of


def test_rsna_train_images_folder_and_errors(tmp_path):
    df = _rsna_table(patients=2)
    image = tmp_path / "train_images" / "10000" / "1001.dcm"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"")
    rows, _ = _rsna_load(tmp_path, df, sub="tables")
    assert rows[0]["dicom_path"] == str(image)
    bad = df.copy()
    bad.loc[3, "density"] = "E"
    with pytest.raises(TableError, match="train.csv image 1004: density 'E'"):
        _rsna_load(tmp_path, bad)
    bad = df.copy()
    bad.loc[0, "BIRADS"] = 7
    with pytest.raises(TableError, match="BIRADS"):
        _rsna_load(tmp_path, bad)
    with pytest.raises(TableError, match="train.csv.*cancer"):
        _rsna_load(tmp_path, df.drop(columns=["cancer"]))
    os.remove(tmp_path / "train.csv")
    os.remove(tmp_path / "tables" / "train.csv")
    with pytest.raises(FileNotFoundError, match="train.csv"):
        rsna.load_rows(str(tmp_path), str(tmp_path), splits_file=str(tmp_path / "x.json"))


def _vindr_table(train_studies=60, test_studies=20):
    rows = []
    for s in range(train_studies + test_studies):
        study = f"st{s:04x}"
        for k, (side, view) in enumerate([("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]):
            rows.append({"study_id": study, "series_id": f"se{s}", "image_id": f"im{s}_{k}",
                         "laterality": side, "view_position": view, "height": 3518,
                         "width": 2800, "breast_birads": f"BI-RADS {1 + (s + k) % 5}",
                         "breast_density": f"DENSITY {'ABCD'[s % 4]}",
                         "split": "training" if s < train_studies else "test"})
    return pd.DataFrame(rows)


def _vindr_load(tmp_path, df, splits_name="vindr.json"):
    df.to_csv(tmp_path / vindr.ANNOTATION_FILE, index=False)
    return vindr.load_rows(str(tmp_path), str(tmp_path), splits_file=str(tmp_path / splits_name))


def test_vindr_label_maps_paths_and_official_test(tmp_path):
    df = _vindr_table()
    (tmp_path / "images").mkdir()
    rows, dropped = _vindr_load(tmp_path, df)
    assert len(rows) == len(df) and not dropped
    by_id = {r["image_id"]: r for r in rows}
    for rec in df.to_dict("records"):
        r = by_id[rec["image_id"]]
        schema.validate_row(r)
        assert r["birads"] == int(rec["breast_birads"][-1])
        assert r["density"] == "ABCD".index(rec["breast_density"][-1]) + 1
        assert r["patient_id"] == r["study_id"] == rec["study_id"]
        assert (r["laterality"], r["view"]) == (rec["laterality"], rec["view_position"])
        assert (r["split"] == "test") == (rec["split"] == "test")
        expected = tmp_path / "images" / rec["study_id"] / f"{rec['image_id']}.dicom"
        assert r["dicom_path"] == str(expected)
        assert r["cancer"] == r["age"] == -1 and r["mass_shape"] == ""
        assert r["in_birads_test_subset"] == r["in_density_test_subset"] == 0
    split_of = _patient_splits(rows)
    counts = {s: list(split_of.values()).count(s) for s in schema.SPLITS}
    assert counts == {"train": 54, "validation": 6, "test": 20}
    stored = json.load(open(tmp_path / "vindr.json"))["splits"]
    validation = sorted(p for p, s in split_of.items() if s == "validation")
    assert sorted(stored["validation"]) == validation


def test_vindr_bad_values_and_wrong_split_file(tmp_path):
    df = _vindr_table(train_studies=4, test_studies=2)
    for column, value, message in [("breast_birads", "BIRADS-ish", "breast_birads"),
                                   ("breast_density", "DENSITY E", "breast_density"),
                                   ("split", "validation", "split 'validation'")]:
        bad = df.copy()
        bad.loc[1, column] = value
        with pytest.raises(TableError, match=message):
            _vindr_load(tmp_path, bad, splits_name=f"{column}.json")
    straddle = df.copy()
    straddle.loc[0, "split"] = "test"
    with pytest.raises(TableError, match="both the training and the test"):
        _vindr_load(tmp_path, straddle, splits_name="straddle.json")
    # A split file that puts an official test study in train is refused.
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"seed": 0, "fractions": {"train": 0.9, "validation": 0.1},
                                 "splits": {"train": ["st0004"]}}))
    with pytest.raises(ValueError, match="official"):
        with pytest.warns(UserWarning):
            _vindr_load(tmp_path, df, splits_name="wrong.json")
    nan_labels = df.copy()
    nan_labels.loc[2, ["breast_birads", "breast_density"]] = np.nan
    rows, _ = _vindr_load(tmp_path, nan_labels, splits_name="nan.json")
    r = next(r for r in rows if r["image_id"] == "im0_2")
    assert (r["birads"], r["density"]) == (-1, -1)
