"""mama_jax.predict on the synthetic DICOMs: the zero-shot job's probabilities, the stated
aggregation rule, unreadable files listed with reasons, no identifying value in any output."""

import csv
import json
import os
import re

import numpy as np
import pydicom
import pytest

import mama_jax
from configs import export as export_config
from configs import zeroshot as zeroshot_config
from data_prep import prepare
from mama_jax import export, predict
from mama_jax.evaluate import zeroshot

# Identifying header values the synthetic files carry (data_prep.synthetic_dicom.fake_phi).
PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
            "ReferringPhysicianName", "OperatorsName", "ImageComments", "StudyComments")
PLANTED = {"PatientName": "Plantedfamily^Plantedgiven", "PatientID": "PLANTED-ID-77310",
           "PatientBirthDate": "19411203", "AccessionNumber": "ACCPLANT0042",
           "InstitutionName": "Planted Hospital Of Tests", "OtherPatientIDs": "PLANTED-OTHER-55",
           "PatientAddress": "12 Planted Road"}


@pytest.fixture(scope="module")
def package(pretrained_workdir, tmp_path_factory):
    cfg = export_config.get_config()
    cfg.pretrain_workdir = pretrained_workdir
    return export.run(cfg, str(tmp_path_factory.mktemp("predict_export")))["out_dir"]


@pytest.fixture(scope="module")
def dicom_of(tiny_dataset):
    """{image_id: DICOM path} of the tiny dataset's build."""
    build_dir = os.path.abspath(os.path.join(tiny_dataset, *[os.pardir] * 4))
    return {k: e["dicom_path"] for k, e in prepare.read_manifest(build_dir).items()
            if e["status"] == "written"}


@pytest.fixture(scope="module")
def zeroshot_job(pretrained_workdir, tmp_path_factory):
    """The zero-shot job on the test split with no metadata prefix: its workdir."""
    cfg = zeroshot_config.get_config()
    cfg.update(dict(pretrain_workdir=pretrained_workdir, tasks=("density", "birads"), prefix="none",
                    bootstrap=0, batch_size=8))
    workdir = str(tmp_path_factory.mktemp("zeroshot_job"))
    zeroshot.run(cfg, workdir)
    return workdir


@pytest.fixture(scope="module")
def model(package):
    return mama_jax.load(package)


def test_decode_settings_are_the_builds(package):
    with open(os.path.join(package, "config.json")) as f:
        meta = json.load(f)
    # conftest builds with long_side=128; the manifest records the build's options.
    assert meta["format_version"] == 2
    assert meta["decode"] == {"long_side": 128, "voi": "none", "j2k_reduce": True}


def test_decode_settings_of_an_older_build_or_mixed_options(tmp_path):
    from data_prep import prepare
    from mama_jax import factory
    from mama_jax.export import job

    dataset = tmp_path / "out" / "tfds" / "mammography" / "embed" / "1.0.0"
    dataset.mkdir(parents=True)
    entries = [{"image_id": "a", "status": "written", "height": 300, "width": 200},
               {"image_id": "b", "status": "written", "height": 180, "width": 400}]
    def write(rows):
        with open(tmp_path / "out" / prepare.MANIFEST, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    write(entries)  # before options were recorded: the longest stored side
    assert job.build_decode_options(str(dataset)) == {"long_side": 400}
    write([{**e, "options": {"long_side": 900 + i, "voi": "none", "j2k_reduce": True}}
           for i, e in enumerate(entries)])
    with pytest.raises(factory.ConfigError, match="different options"):
        job.build_decode_options(str(dataset))


@pytest.mark.parametrize("task", ["density", "birads"])
def test_probabilities_equal_the_zero_shot_job(model, zeroshot_job, dicom_of, task):
    with np.load(os.path.join(zeroshot_job, f"zeroshot_{task}_test.npz")) as z:
        image_ids, want = list(z["image_id"]), z["probs"]
    assert len(image_ids) >= 2
    paths = [dicom_of[i] for i in image_ids]
    preds = model.predict_dicoms(paths, task, batch_size=4)  # 4 does not divide the count: padding
    assert not preds.skipped
    got = {r["path"]: r["probs"] for r in preds.images}
    np.testing.assert_allclose(np.stack([got[os.path.abspath(p)] for p in paths]), want, atol=1e-5)


def test_reader_processes_give_the_same_rows_in_the_same_order(model, dicom_of, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a DICOM")
    paths = sorted(dicom_of.values())[:5] + [str(bad)]
    one = model.predict_dicoms(paths, "density", batch_size=4)
    two = model.predict_dicoms(paths, "density", batch_size=4, workers=2)
    assert [r["path"] for r in two.images] == [r["path"] for r in one.images]
    np.testing.assert_array_equal(np.stack([r["probs"] for r in two.images]),
                                  np.stack([r["probs"] for r in one.images]))
    assert two.skipped == one.skipped and len(one.skipped) == 1


def _planted_folder(dicom_of, folder):
    """Six DICOMs (two studies), one with planted identifying values, a truncated file and a
    text file."""
    os.makedirs(folder)
    sources = sorted(dicom_of.values())[:6]
    phi = set(PLANTED.values())
    for i, src in enumerate(sources):
        dst = os.path.join(folder, f"img{i}.dcm")
        ds = pydicom.dcmread(src)
        phi |= {str(ds[t].value) for t in PHI_TAGS if t in ds and str(ds[t].value)}
        if i == 0:
            for tag, value in PLANTED.items():
                setattr(ds, tag, value)
        ds.save_as(dst)
    raw = open(os.path.join(folder, "img1.dcm"), "rb").read()
    with open(os.path.join(folder, "cut.dcm"), "wb") as f:
        f.write(raw[: len(raw) // 2])
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not a mammogram\n")
    # Name parts too: a name must not leak as "family given" either.
    phi |= {part for v in list(phi) for part in v.replace("^", " ").split() if len(part) >= 4}
    return phi


def test_cli_rows_follow_the_rule_list_bad_files_and_leak_nothing(model, package, dicom_of, tmp_path,
                                                                   capsys):
    phi = _planted_folder(dicom_of, str(tmp_path / "in"))
    out_csv, out_jsonl = str(tmp_path / "p.csv"), str(tmp_path / "p.jsonl")
    for out in (out_csv, out_jsonl):
        assert predict.main(["--model", package, "--task", "density", str(tmp_path / "in"),
                             "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "images/s" in printed.out

    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    by_level = {lvl: [r for r in rows if r["level"] == lvl] for lvl in ("image", "breast", "study", "skipped")}
    assert len(by_level["image"]) == 6
    skipped = {os.path.basename(r["path"]): r["reason"] for r in by_level["skipped"]}
    assert set(skipped) == {"cut.dcm", "notes.txt"}
    # A cut file: pydicom's parse fails (truncated) or the pixel data is short (fewer bytes).
    assert re.search("truncated|fewer than", skipped["cut.dcm"]) and "not a DICOM" in skipped["notes.txt"]
    for name in skipped:
        assert f"skipped {tmp_path / 'in' / name}: " in printed.err

    probs = lambda r: np.array([float(r[f"prob_{i}"]) for i in range(4)])  # noqa: E731
    images = by_level["image"]
    for r in images:
        assert r["sop_instance_uid"] and r["study"] and r["laterality"] in ("L", "R")
        np.testing.assert_allclose(probs(r).sum(), 1.0, atol=1e-5)
    for level, key in (("breast", ("study", "laterality")), ("study", ("study",))):
        groups = {}
        for r in images:
            groups.setdefault(tuple(r[k] for k in key), []).append(probs(r))
        assert len(by_level[level]) == len(groups) >= 1
        for r in by_level[level]:
            members = groups[tuple(r[k] for k in key)]
            assert int(r["n_images"]) == len(members) and r["rule"].startswith("mean of the images'")
            np.testing.assert_allclose(probs(r), np.mean(members, 0), atol=2e-6)
            assert int(r["prediction"]) == int(np.argmax(np.mean(members, 0)))
    assert len(by_level["breast"]) > len(by_level["study"])  # both sides present

    # The JSONL holds the same rows; the CSV's values are rounded to 7 digits.
    with open(out_jsonl) as f:
        lines = [json.loads(line) for line in f]
    assert lines[0]["level"] == "meta" and len(lines[0]["classes"]) == 4
    assert lines[0]["rule"].startswith("mean of the images'")
    assert [r["level"] for r in lines[1:]] == [r["level"] for r in rows]
    for a, b in zip(lines[1:], rows):
        if "probs" in a:
            np.testing.assert_allclose(a["probs"], probs(b), atol=1e-6)

    text = "\n".join([open(out_csv).read(), open(out_jsonl).read(), printed.out, printed.err])
    leaked = sorted(v for v in phi if v in text)
    assert not leaked, f"identifying values in the output: {leaked}"
    assert "Zyx" not in text  # the synthetic files' PHI marker


def test_bad_arguments_are_clear_errors(model, package, tmp_path):
    with pytest.raises(export.PackageError, match="no probe head for density"):
        model.predict_dicoms([str(tmp_path)], "density", head="probe")
    with pytest.raises(ValueError, match="unknown task 'mass'"):
        model.predict_dicoms([str(tmp_path)], "mass")
    preds = model.predict_dicoms([str(tmp_path / "absent.dcm")], "cancer")
    assert preds.images == [] and preds.skipped[0]["reason"] == "no such file or folder"
    with pytest.raises(SystemExit, match="must end in .csv or .jsonl"):
        predict.main(["--model", package, "--task", "density", str(tmp_path), "--out", "p.txt"])


def test_ids_csv_keys_rows_by_the_datasets_ids(model, dicom_of, tmp_path):
    items = sorted(dicom_of.items())[:2]
    ids_csv = tmp_path / "ids.csv"
    ids_csv.write_text("path,image_id,study_id\n" + "".join(f"{p},{i},S1\n" for i, p in items))
    preds = model.predict_dicoms([p for _, p in items], "density", ids=predict.read_ids(str(ids_csv)))
    assert sorted(r["image_id"] for r in preds.images) == sorted(i for i, _ in items)
    assert [r["study"] for r in preds.studies] == ["S1"] and preds.studies[0]["n_images"] == 2
