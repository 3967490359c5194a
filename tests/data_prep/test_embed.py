"""EMBED adapter: label rule (§1.7 / D19), decoding, drops, paths, errors.

All tables are made up here with the real EMBED column names.
"""

import json
import os

import numpy as np
import pandas as pd
import pytest

from data_prep import embed, schema
from data_prep.tables import TableError

PREFIX = "/mnt/NAS2/mammo/anon_dicom/"

LEGEND = pd.DataFrame({
    "Header in export": ["massshape", "", "", "massdens", "calcfind", "calcdistri", "asses"],
    "Discription": ["Mass shape", "", "", "Mass density", "Calc type", "Calc distribution",
                    "Assessment"],
    "Code": ["O", "R", "X", "+", "9", "G", "N"],
    "Meaning": ["Oval", "Round", "Irregular", "High density", "Benign", "Grouped", "Negative"],
})


def _image(empi, acc, sop, side, *, kind="2D", desc="MG Screening Bilateral w/CAD", view="CC"):
    return {"empi_anon": empi, "acc_anon": acc,
            "anon_dicom_path": f"{PREFIX}cohort_1/{empi}/{acc}/{sop}.dcm",
            "StudyDescription": desc, "FinalImageType": kind,
            "ImageLateralityFinal": side, "ViewPosition": view}


def _finding(acc, side, asses, den=2, **extra):
    row = {"empi_anon": 1, "acc_anon": acc, "side": side, "asses": asses, "tissueden": den,
           "massshape": None, "massdens": None, "calcfind": None, "calcdistri": None,
           "age_at_study": 55.0, "RACE_DESC": "White", "ETHNIC_GROUP_DESC": None,
           "path_severity": None}
    row.update(extra)
    return row


def _write(folder, metadata, clinical, legend=LEGEND, sub=""):
    where = os.path.join(folder, sub)
    os.makedirs(where, exist_ok=True)
    pd.DataFrame(metadata).to_csv(os.path.join(where, "EMBED_OpenData_metadata.csv"), index=False)
    pd.DataFrame(clinical).to_csv(os.path.join(where, "EMBED_OpenData_clinical.csv"), index=False)
    legend.to_csv(os.path.join(where, embed.LEGEND_FILE), index=False)


def _load(tmp_path, metadata, clinical, **kw):
    _write(str(tmp_path), metadata, clinical, **kw)
    rows, dropped = embed.load_rows(str(tmp_path), str(tmp_path),
                                    splits_file=str(tmp_path / "splits.json"))
    return {r["image_id"]: r for r in rows}, {d["image_id"]: d for d in dropped}


def test_label_rule_side_bilateral_all_zero_and_highest(tmp_path):
    metadata = [
        _image(1, 10, "side_l", "L"), _image(1, 10, "side_r", "R"),   # side match
        _image(2, 20, "bilat_l", "L"),                                 # B fallback
        _image(3, 30, "all_l", "L"),                                   # all fallback
        _image(4, 40, "zero_l", "L"),                                  # BI-RADS-0 preference
        _image(5, 50, "high_l", "L"),                                  # highest otherwise
        _image(6, 60, "x_l", "L"),                                     # X ignored
    ]
    clinical = [
        _finding(10, "L", "N", den=1), _finding(10, "R", "S", den=4),
        _finding(20, "B", "B", den=2), _finding(20, "R", "M", den=4),
        _finding(30, "R", "S", den=3), _finding(30, None, "A", den=1),
        _finding(40, "L", "B", den=2), _finding(40, "L", "A", den=3), _finding(40, "L", "N", den=1),
        _finding(50, "L", "A", den=1), _finding(50, "L", "P", den=4), _finding(50, "R", "K", den=2),
        _finding(60, "L", "X", den=2), _finding(60, "L", "N", den=3),
    ]
    rows, dropped = _load(tmp_path, metadata, clinical)
    assert not dropped
    got = {k: (r["birads"], r["density"]) for k, r in rows.items()}
    assert got == {"side_l": (1, 1), "side_r": (4, 4), "bilat_l": (2, 2), "all_l": (4, 3),
                   "zero_l": (0, 3), "high_l": (3, 4), "x_l": (1, 3)}


def test_select_finding_prefers_zero_only_when_all_at_most_two():
    rows = [{"asses": a, "tag": i} for i, a in enumerate(["N", "A", "B"])]
    assert embed.select_finding(rows)["tag"] == 1
    rows.append({"asses": "P", "tag": 3})
    assert embed.select_finding(rows)["tag"] == 3
    assert embed.select_finding([{"asses": "N"}, {"asses": "B", "tag": 9}])["tag"] == 9
    assert embed.select_finding([{"asses": "X"}, {"asses": None}]) is None


def test_letter_map():
    assert {k: embed.birads_of(k) for k in "ANBPSMK"} == dict(zip("ANBPSMK", range(7)))
    assert embed.birads_of("x") is None and embed.birads_of(np.nan) is None
    assert embed.birads_of(" s ") == 4


def test_legend_decode_and_coded_fields(tmp_path):
    legend = embed.decode_legend(LEGEND.assign(**{"Header in export": LEGEND["Header in export"]
                                                  .replace("", np.nan)}))
    assert legend["massshape"] == {"O": "oval", "R": "round", "X": "irregular"}
    assert legend["calcfind"] == {"9": "benign"} and legend["massdens"] == {"+": "high density"}
    renamed = LEGEND.rename(columns={"Discription": "Description"})
    metadata = [_image(1, 10, "coded", "R"), _image(1, 11, "uncoded", "R")]
    clinical = [_finding(10, "R", "B", massshape="O", massdens="+", calcfind=9.0, calcdistri="G"),
                _finding(11, "R", "B", massshape="Z", massdens=None)]
    rows, _ = _load(tmp_path, metadata, clinical, legend=renamed)
    c = rows["coded"]
    assert (c["mass_shape"], c["mass_density"], c["calc_type"], c["calc_distribution"]) == \
        ("oval", "high density", "benign", "grouped")
    u = rows["uncoded"]
    assert (u["mass_shape"], u["mass_density"], u["calc_type"], u["calc_distribution"]) == \
        ("", "", "", "")


def test_drops_carry_reasons(tmp_path):
    metadata = [_image(1, 10, "keep", "L"), _image(1, 10, "cview", "L", kind="C-view"),
                _image(2, 20, "noden", "L"), _image(3, 30, "male", "L"),
                _image(4, 40, "noreason", "L", desc="MG Bilateral"),
                _image(5, 50, "noexam", "L"), _image(6, 60, "xonly", "L")]
    clinical = [_finding(10, "L", "N"), _finding(20, "L", "N", den=None),
                _finding(30, "L", "N", den=5), _finding(40, "L", "N"), _finding(60, "L", "X")]
    rows, dropped = _load(tmp_path, metadata, clinical)
    assert set(rows) == {"keep"}
    reasons = {k: d["reason"] for k, d in dropped.items()}
    assert reasons["cview"] == "FinalImageType C-view"
    assert reasons["noden"] == "density missing"
    assert reasons["male"].startswith("density 5")
    assert "StudyDescription" in reasons["noreason"]
    assert reasons["noexam"] == "no clinical rows for exam"
    assert reasons["xonly"] == "no BI-RADS assessment"
    assert all(os.path.isabs(d["dicom_path"]) for d in dropped.values())


def test_caption_fields_race_alias_ethnicity_and_ids(tmp_path):
    metadata = [_image(1001.0, 7.0, "a", "L", desc="MG Diagnostic Left", view="MLO"),
                _image(1002, 8, "b", "R"), _image(1003, 9, "c", "R"), _image(1004, 6, "d", "R"),
                _image(1005, 5, "e", "R")]
    clinical = [_finding(7, "L", "S", age_at_study=61.7, ETHNIC_GROUP_DESC="Hispanic or Latino",
                         path_severity=0.0),
                _finding(8, "R", "N", age_at_study=None, ETHNIC_GROUP_DESC="Unknown",
                         path_severity=4),
                _finding(9, "R", "N", ETHNIC_GROUP_DESC="Non-Hispanic or Latino"),
                _finding(6, "R", "N", path_severity=6),
                _finding(5, "R", "N", path_severity=4), _finding(5, "R", "B", path_severity=1),
                _finding(5, "L", "N", path_severity=0)]
    for c in clinical:
        c["ETHNICITY_DESC"] = "African American  or Black"
        del c["RACE_DESC"]
    rows, _ = _load(tmp_path, metadata, clinical)
    a, b, c, d, e = (rows[k] for k in "abcde")
    assert (a["patient_id"], a["study_id"], a["image_id"]) == ("1001", "7", "a")
    assert (a["procedure"], a["reason"], a["view"], a["laterality"]) == \
        ("MG Diagnostic Left", "diagnostic", "MLO", "L")
    assert (a["age"], b["age"]) == (61, -1)
    assert a["race"] == "African American  or Black"
    assert [r["ethnicity"] for r in (a, b, c)] == \
        ["Hispanic or Latino", "Non-Hispanic or Latino", "Non-Hispanic or Latino"]
    # Severity 0/1 (cancer) wins over 2..5; 6 (non-breast cancer) is not a label.
    assert [r["cancer"] for r in (a, b, c, d, e)] == [1, 0, -1, -1, 1]
    assert b["reason"] == "screening" and b["image_type"] == "2D"
    for r in rows.values():
        schema.validate_row(r)


def test_path_prefix_rewrite_and_image_root(tmp_path):
    metadata = [_image(1, 10, "1.2.840.5", "L"),
                dict(_image(1, 10, "rel", "R"), anon_dicom_path="cohort_1/1/10/rel.dcm")]
    clinical = [_finding(10, "L", "N"), _finding(10, "R", "N")]
    rows, _ = _load(tmp_path, metadata, clinical)
    # No image present: images_dir itself is the root; uid dots are not an extension.
    assert rows["1.2.840.5"]["dicom_path"] == str(tmp_path / "cohort_1/1/10/1.2.840.5.dcm")
    assert rows["rel"]["dicom_path"] == str(tmp_path / "cohort_1/1/10/rel.dcm")
    image = tmp_path / "images/cohort_1/1/10/1.2.840.5.dcm"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"")
    rows, _ = _load(tmp_path, metadata, clinical)
    assert rows["1.2.840.5"]["dicom_path"] == str(image)
    assert rows["rel"]["dicom_path"] == str(tmp_path / "images/cohort_1/1/10/rel.dcm")
    assert embed.relative_dicom_path("/mnt/NAS2/mammo/anon_dicom/x/y.dcm",
                                     "/mnt/NAS2/mammo/anon_dicom") == "x/y.dcm"


def test_tables_subfolder_splits_and_subsets(tmp_path):
    metadata, clinical = [], []
    for p in range(40):
        for side in "LR":
            metadata.append(_image(p, 100 + p, f"p{p}{side}", side))
        clinical.append(_finding(100 + p, "B", "ANB"[p % 3], den=1 + p % 4))
    _write(str(tmp_path), metadata, clinical, sub="tables")
    rows, dropped = embed.load_rows(str(tmp_path), str(tmp_path),
                                    splits_file=str(tmp_path / "s.json"))
    assert len(rows) == 80 and not dropped
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())
    counts = {s: sum(v == {s} for v in by_patient.values()) for s in schema.SPLITS}
    assert counts == {"train": 28, "validation": 4, "test": 8}
    stored = json.load(open(tmp_path / "s.json"))["splits"]
    assert sorted(stored["test"]) == sorted(p for p, s in by_patient.items() if s == {"test"})
    # Every test class has < 200 images, so the subsets hold every labelled test image.
    for r in rows:
        in_test = int(r["split"] == "test")
        assert r["in_birads_test_subset"] == r["in_density_test_subset"] == in_test


def test_missing_column_and_missing_file(tmp_path):
    clinical = [_finding(10, "L", "N")]
    del clinical[0]["tissueden"]
    with pytest.raises(TableError, match=r"EMBED_OpenData_clinical\.csv.*tissueden"):
        _load(tmp_path, [_image(1, 10, "a", "L")], clinical)
    clinical = [_finding(10, "L", "N")]
    del clinical[0]["RACE_DESC"]
    with pytest.raises(TableError, match=r"RACE_DESC / ETHNICITY_DESC"):
        _load(tmp_path, [_image(1, 10, "a", "L")], clinical)
    _write(str(tmp_path), [_image(1, 10, "a", "L")], [_finding(10, "L", "N")])
    os.remove(tmp_path / embed.LEGEND_FILE)
    with pytest.raises(FileNotFoundError, match=r"AWS_Open_Data_Clinical_Legend\.csv.*tables"):
        embed.load_rows(str(tmp_path), str(tmp_path), splits_file=str(tmp_path / "s.json"))


def test_duplicate_image_ids_are_an_error(tmp_path):
    metadata = [_image(1, 10, "same", "L"), _image(1, 11, "same", "L")]
    with pytest.raises(TableError, match="duplicated image_id.*same"):
        _load(tmp_path, metadata, [_finding(10, "L", "N"), _finding(11, "L", "N")])


def test_synthetic_tables_round_trip(tmp_path):
    from data_prep import synthetic

    synthetic.generate(str(tmp_path), patients=4, seed=0, image_size=(128, 96))
    rows, dropped = embed.load_rows(str(tmp_path), str(tmp_path),
                                    splits_file=str(tmp_path / "splits.json"))
    meta = pd.read_csv(tmp_path / "tables" / "EMBED_OpenData_metadata.csv")
    assert len(rows) + len(dropped) == len(meta) and rows
    ids = [r["image_id"] for r in rows] + [d["image_id"] for d in dropped]
    assert len(set(ids)) == len(ids)
    for r in rows:
        schema.validate_row(r)
        assert os.path.isfile(r["dicom_path"]), r["dicom_path"]
    for d in dropped:
        assert d["reason"] and os.path.isfile(d["dicom_path"]), d
    # Lesion boxes come along in DICOM pixels (inclusive table ends, exclusive row ends).
    n_roi = {embed.image_id_of(p): n for p, n in zip(meta["anon_dicom_path"], meta["num_roi"])}
    for r in rows:
        assert len(schema.parse_boxes(r["roi_boxes"])) == n_roi[r["image_id"]]


def test_roi_coords_become_row_boxes_with_exclusive_ends(tmp_path):
    assert embed.roi_boxes_of("((10, 20, 30, 40),)") == "10,20,31,41"
    assert embed.roi_boxes_of("((10, 20, 30, 40), (1.0, 2.0, 3.0, 4.0))") == "10,20,31,41;1,2,4,5"
    assert embed.roi_boxes_of("(5, 6, 7, 8)") == "5,6,8,9"
    for none in ("()", "", None, float("nan")):
        assert embed.roi_boxes_of(none) == ""
    for bad in ("((1, 2, 3),)", "((30, 20, 10, 40),)", "boxes"):
        with pytest.raises(TableError, match="metadata.csv image 7.*ROI_coords"):
            embed.roi_boxes_of(bad, "metadata.csv image 7")

    with_roi = dict(_image(1, 10, "1.1", "L"), ROI_coords="((100, 50, 140, 90),)")
    rows, _ = _load(tmp_path, [with_roi, dict(_image(1, 10, "1.2", "R"), ROI_coords="()")],
                    [_finding(10, "L", "S")])
    assert rows["1.1"]["roi_boxes"] == "100,50,141,91" and rows["1.2"]["roi_boxes"] == ""
    # Without the column (it is optional), no row has boxes.
    rows, _ = _load(tmp_path, [_image(1, 10, "1.1", "L")], [_finding(10, "L", "S")])
    assert rows["1.1"]["roi_boxes"] == ""
    with pytest.raises(TableError, match="1.3.*ROI_coords"):
        _load(tmp_path, [dict(_image(1, 10, "1.3", "L"), ROI_coords="((1, 2),)")],
              [_finding(10, "L", "S")])
