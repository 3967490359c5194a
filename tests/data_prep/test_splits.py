"""Seeded, persisted patient splits and the stratified test subset."""

import json
import os

import pytest

from data_prep import splits

FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}


def _ids(n, start=0):
    return [f"P{i:05d}" for i in range(start, start + n)]


def test_patient_split_is_deterministic_and_order_free():
    ids = _ids(1000)
    a = splits.patient_split(ids, FRACTIONS, seed=3)
    b = splits.patient_split(list(reversed(ids)) + ids[:10], FRACTIONS, seed=3)
    assert a == b
    assert a != splits.patient_split(ids, FRACTIONS, seed=4)
    counts = {s: sum(v == s for v in a.values()) for s in splits.SPLITS}
    assert counts == {"train": 700, "validation": 100, "test": 200}


def test_patient_split_fractions_roughly_right_for_odd_sizes():
    for n in (7, 33, 101):
        m = splits.patient_split(_ids(n), FRACTIONS, seed=0)
        assert len(m) == n
        for name, f in FRACTIONS.items():
            assert abs(sum(v == name for v in m.values()) - f * n) <= 1


def test_stratified_split_cuts_each_stratum():
    ids = _ids(200)
    stratum = {p: int(i < 20) for i, p in enumerate(ids)}
    m = splits.patient_split(ids, {"train": 0.85, "test": 0.15}, seed=0, stratify=stratum)
    positives = [m[p] for p in ids if stratum[p]]
    assert positives.count("test") == 3 and positives.count("train") == 17
    with pytest.raises(ValueError, match="no stratum"):
        splits.patient_split(ids + ["new"], {"train": 1.0}, seed=0, stratify=stratum)


def test_bad_fractions_are_rejected():
    with pytest.raises(ValueError, match="sum to 1"):
        splits.patient_split(_ids(5), {"train": 0.7, "test": 0.2}, seed=0)
    with pytest.raises(ValueError, match="unknown split"):
        splits.patient_split(_ids(5), {"train": 0.5, "valid": 0.5}, seed=0)


def test_split_file_is_written_then_reused_and_extended(tmp_path):
    path = str(tmp_path / "sub" / "splits.json")
    first = splits.load_or_create_splits(path, _ids(100), FRACTIONS, seed=0)
    stored = json.load(open(path))
    assert stored["seed"] == 0 and stored["fractions"] == FRACTIONS
    assert {p: s for s, ps in stored["splits"].items() for p in ps} == first
    assert [f for f in os.listdir(tmp_path / "sub")] == ["splits.json"]  # no temp file left

    # A different seed argument does not change a stored split.
    with pytest.warns(UserWarning, match="reusing the stored split"):
        again = splits.load_or_create_splits(path, _ids(100), FRACTIONS, seed=99)
    assert again == first

    # New patients are appended, old ones keep their split, the file grows.
    with pytest.warns(UserWarning, match="50 patient"):
        grown = splits.load_or_create_splits(path, _ids(150), FRACTIONS, seed=0)
    assert {p: grown[p] for p in first} == first
    assert set(grown) == set(_ids(150))
    new_splits = [grown[p] for p in _ids(50, 100)]
    assert set(new_splits) <= set(splits.SPLITS) and new_splits.count("train") > 20
    stored = json.load(open(path))["splits"]
    assert sum(len(v) for v in stored.values()) == 150
    # Order of arrival does not matter for appended patients.
    other = str(tmp_path / "other.json")
    splits.load_or_create_splits(other, _ids(100), FRACTIONS, seed=0)
    with pytest.warns(UserWarning):
        splits.load_or_create_splits(other, _ids(20, 130), FRACTIONS, seed=0)
    with pytest.warns(UserWarning):
        late = splits.load_or_create_splits(other, _ids(150), FRACTIONS, seed=0)
    assert late == grown


def test_no_patient_in_two_splits(tmp_path):
    m = splits.load_or_create_splits(str(tmp_path / "s.json"), _ids(300), FRACTIONS, seed=1)
    stored = json.load(open(tmp_path / "s.json"))["splits"]
    members = [p for ids in stored.values() for p in ids]
    assert len(members) == len(set(members)) == 300 == len(m)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"seed": 0, "splits": {"train": ["a", "b"], "test": ["b"]}}))
    with pytest.raises(ValueError, match="'b' is in both"):
        splits.load_or_create_splits(str(bad), ["a"], FRACTIONS, seed=0)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        splits.load_or_create_splits(str(bad), ["a"], FRACTIONS, seed=0)


def test_stratified_test_subset_sizes():
    rows = [{"image_id": f"a{i}", "split": "test", "y": 1} for i in range(3000)]
    rows += [{"image_id": f"b{i}", "split": "test", "y": 2} for i in range(50)]
    rows += [{"image_id": f"c{i}", "split": "test", "y": 3} for i in range(2107)]
    rows += [{"image_id": f"u{i}", "split": "test", "y": -1} for i in range(30)]
    rows += [{"image_id": f"t{i}", "split": "train", "y": 1} for i in range(30)]
    chosen = splits.stratified_test_subset(rows, "y")
    per_class = {p: sum(i.startswith(p) for i in chosen) for p in "abcut"}
    assert per_class == {"a": 300, "b": 50, "c": 210, "u": 0, "t": 0}
    assert splits.stratified_test_subset(rows, "y") == chosen
    assert splits.stratified_test_subset(rows, "y", seed=1) != chosen
    small = splits.stratified_test_subset(rows, "y", fraction=0.1, minimum=10)
    assert sum(i.startswith("b") for i in small) == 10
