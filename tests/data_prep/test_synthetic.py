"""Synthetic EMBED-format generator: layout, codes, determinism, DICOMs, PHI, label-driven pixels."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from data_prep import synthetic

SIZE = (192, 160)
PATIENTS = 6
SITE_PREFIX = "/mnt/NAS2/mammo/anon_dicom"
METADATA = "tables/EMBED_OpenData_metadata.csv"
CLINICAL = "tables/EMBED_OpenData_clinical.csv"
LEGEND = "tables/AWS_Open_Data_Clinical_Legend.csv"
# Column names of the real EMBED export (datasets.md §1.3-1.4), written out here on purpose.
META_COLUMNS = {"empi_anon", "acc_anon", "anon_dicom_path", "study_date_anon", "StudyDescription",
                "FinalImageType", "ImageLateralityFinal", "ViewPosition", "spot_mag", "num_roi",
                "ROI_coords", "SeriesDescription"}
CLINICAL_COLUMNS = {"empi_anon", "acc_anon", "study_date_anon", "desc", "asses", "tissueden", "side",
                    "numfind", "massshape", "massmargin", "massdens", "calcfind", "calcdistri",
                    "calcnumber", "path_severity", "age_at_study", "RACE_DESC",
                    "ETHNIC_GROUP_DESC", "GENDER_DESC", "cohort_num"}
CODED = ("massshape", "massmargin", "massdens", "calcfind", "calcdistri", "asses")


def _dicoms(root: Path) -> list[Path]:
    return sorted((root / "images").rglob("*.dcm"))


def _codes(series: pd.Series) -> set[str]:
    """Codes as text, whatever dtype pandas guessed ("9.0" -> "9")."""
    out = set()
    for v in series.dropna():
        out.add(str(int(v)) if isinstance(v, float) else str(v))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn_a")
    summary = synthetic.generate(out, patients=PATIENTS, seed=11, image_size=SIZE)
    return out, summary


@pytest.fixture(scope="module")
def tables(run):
    out, _ = run
    return (pd.read_csv(out / METADATA, dtype={"empi_anon": str, "acc_anon": str}),
            pd.read_csv(out / CLINICAL, dtype={"empi_anon": str, "acc_anon": str}),
            pd.read_csv(out / LEGEND, dtype=str))


def test_tables_have_real_embed_columns(tables):
    meta, clin, legend = tables
    assert META_COLUMNS <= set(meta.columns)
    assert CLINICAL_COLUMNS <= set(clin.columns)
    assert list(legend.columns) == ["Header in export", "Discription", "Code", "Meaning"]


def test_metadata_rows_are_the_files_on_disk(run, tables):
    out, summary = run
    meta, clin, _ = tables
    assert meta["anon_dicom_path"].str.startswith(SITE_PREFIX + "/cohort_1/").all()
    local = {str(out / "images" / p[len(SITE_PREFIX) + 1:]) for p in meta["anon_dicom_path"]}
    assert local == {str(p) for p in _dicoms(out)}
    assert len(meta) == summary["images"] == len(local)
    assert summary["patients"] == meta["empi_anon"].nunique() == PATIENTS
    assert summary["studies"] == meta["acc_anon"].nunique() == clin["acc_anon"].nunique()
    assert set(meta["FinalImageType"]) == {"2D", "C-view"}
    for _, exam in meta[meta["FinalImageType"] == "2D"].groupby("acc_anon"):  # 4 standard views
        assert sorted(zip(exam["ImageLateralityFinal"], exam["ViewPosition"])) == [
            ("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]
    assert meta["empi_anon"].str.fullmatch(r"\d{8}").all()
    assert meta["acc_anon"].str.fullmatch(r"\d{8}").all()


def test_clinical_codes_are_embed_codes_decoded_by_the_legend(tables):
    meta, clin, legend = tables
    assert set(clin["asses"]) <= set("ANBPSMKX")
    assert set(clin["tissueden"].dropna()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert set(clin["side"].dropna()) <= {"L", "R", "B"}
    assert set(clin["desc"]) <= {"MG Screening Bilateral w/CAD", "MG Diagnostic Mammo Bilateral"}
    assert set(clin["path_severity"].dropna()) <= {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}
    for column in CODED:
        known = set(legend.loc[legend["Header in export"] == column, "Code"])
        assert _codes(clin[column]) <= known, column
    assert legend.loc[(legend["Header in export"] == "massshape") & (legend["Code"] == "X"),
                      "Meaning"].item() == "irregular"
    # some exam has findings on both sides with different assessments (per-image rule matters)
    per_exam = clin.dropna(subset=["side"]).groupby("acc_anon")
    assert any(g["side"].nunique() > 1 and g["asses"].nunique() > 1 for _, g in per_exam)
    assert set(meta["acc_anon"]) == set(clin["acc_anon"])


def test_lesions_appear_only_on_their_side(tables):
    meta, clin, _ = tables
    lesion = clin[clin["massshape"].notna() | clin["calcfind"].notna()]
    two_d = meta[meta["FinalImageType"] == "2D"]
    for _, image in two_d[two_d["num_roi"] > 0].iterrows():
        rows = lesion[lesion["acc_anon"] == image["acc_anon"]]
        assert rows["side"].isin([image["ImageLateralityFinal"], "B"]).any(), image["anon_dicom_path"]
    focal = lesion[lesion["side"].isin(["L", "R"]) & (lesion["calcdistri"] != "D")]
    assert len(focal) > 0
    for _, row in focal.iterrows():  # a one-sided, focal lesion is boxed on its side
        views = two_d[(two_d["acc_anon"] == row["acc_anon"])
                      & (two_d["ImageLateralityFinal"] == row["side"])]
        assert (views["num_roi"] > 0).any(), (row["acc_anon"], row["side"])


def test_same_seed_same_bytes_other_seed_differs(run, tmp_path):
    out, _ = run
    again = tmp_path / "again"
    synthetic.generate(again, patients=PATIENTS, seed=11, image_size=SIZE)
    for name in (METADATA, CLINICAL, LEGEND):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    first, second = _dicoms(out), _dicoms(again)
    assert [p.relative_to(out) for p in first] == [p.relative_to(again) for p in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))
    other = tmp_path / "other"
    synthetic.generate(other, patients=PATIENTS, seed=12, image_size=SIZE)
    assert (out / CLINICAL).read_bytes() != (other / CLINICAL).read_bytes()
    assert (out / METADATA).read_bytes() != (other / METADATA).read_bytes()


def test_dicoms_read_back_with_both_photometrics_and_codecs(run, tables):
    out, _ = run
    meta = tables[0]
    by_uid = {Path(p).stem: row for p, (_, row) in zip(meta["anon_dicom_path"], meta.iterrows())}
    syntaxes, photometric = set(), set()
    for path in _dicoms(out):
        ds = pydicom.dcmread(path)
        row = by_uid[ds.SOPInstanceUID]
        pixels = ds.pixel_array
        assert pixels.shape == SIZE and pixels.dtype == np.uint16 and pixels.max() <= 4095
        assert (ds.BitsAllocated, ds.BitsStored, ds.Modality) == (16, 12, "MG")
        assert ds.ImageLaterality == row["ImageLateralityFinal"]
        assert ds.ViewPosition == row["ViewPosition"] == ds.SeriesDescription.split()[1]
        assert ds.ViewCodeSequence[0].CodeMeaning in ("cranio-caudal", "medio-lateral oblique")
        assert "WindowCenter" in ds and "WindowWidth" in ds
        # the corner away from the chest wall is background: dark in MONOCHROME2 sense
        corner = pixels[:8, -8:] if ds.ImageLaterality == "L" else pixels[:8, :8]
        corner_mono2 = 4095 - corner if ds.PhotometricInterpretation == "MONOCHROME1" else corner
        assert np.median(corner_mono2) < 300, path
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
        photometric.add(ds.PhotometricInterpretation)
    assert syntaxes == {pydicom.uid.JPEG2000Lossless, pydicom.uid.ExplicitVRLittleEndian}
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}


def test_fake_phi_is_planted_and_distinctive_and_absent_from_tables(run):
    out, _ = run
    ds = pydicom.dcmread(_dicoms(out)[0])
    family = str(ds.PatientName).split("^")[0]
    assert family.startswith(synthetic.PHI_MARKER) and len(family) >= 8
    assert family in ds.ImageComments
    for tag in ("InstitutionName", "ReferringPhysicianName", "OperatorsName", "StudyComments"):
        assert synthetic.PHI_MARKER in str(ds[tag].value), tag
    assert ds.PatientID.startswith("MRN") and len(ds.PatientBirthDate) == 8
    assert ds.AccessionNumber and ds.AccessionNumber not in str(out)
    tables_text = "".join((out / n).read_text() for n in (METADATA, CLINICAL, LEGEND))
    for value in (synthetic.PHI_MARKER, ds.PatientID, ds.AccessionNumber):
        assert value not in tables_text


def _render(seed, **kw):
    args = dict(height=320, width=256, density=2, birads=1, laterality="L", view="CC")
    args.update(kw)
    return synthetic.render_mammogram(np.random.default_rng(seed), return_rois=True, **args)


@pytest.mark.parametrize("view", ["CC", "MLO"])
def test_breast_brightness_and_dense_fraction_rise_with_density(view):
    for seed in range(3):
        images = [_render(seed, density=d, view=view)[0].astype(np.float64) for d in (1, 2, 3, 4)]
        breast = images[0] > 0.08 * 4095  # same silhouette for every density at one seed
        means = [img[breast].mean() for img in images]
        dense = [(img[breast] > 0.42 * 4095).mean() for img in images]
        assert all(b > a + 40 for a, b in zip(means, means[1:])), means
        assert all(b > a for a, b in zip(dense, dense[1:])), dense
        assert dense[3] - dense[0] > 0.3, dense


def test_birads5_mass_is_a_bright_blob_absent_at_birads1():
    mass = {"shape": "X", "margin": "S", "density": "+"}
    for seed in range(3):
        negative, none = _render(seed, density=3, birads=1)
        suspicious, rois = _render(seed, density=3, birads=5, mass=mass)
        assert none == [] and len(rois) == 1
        y0, x0, y1, x1 = rois[0]
        diff = suspicious.astype(np.int64) - negative.astype(np.int64)
        inside = diff[y0:y1 + 1, x0:x1 + 1]
        assert inside.max() > 0.2 * 4095 and (inside > 0.1 * 4095).mean() > 0.1
        assert diff.min() >= 0 and diff.sum() - inside.sum() < 0.1 * diff.sum()
        assert negative[y0:y1 + 1, x0:x1 + 1].mean() > 0.08 * 4095  # inside the breast
    small, rois2 = _render(0, birads=2, mass={"shape": "R", "margin": "D", "density": "="})
    big, rois5 = _render(0, birads=5, mass={"shape": "R", "margin": "D", "density": "="})
    area = [(b[2] - b[0]) * (b[3] - b[1]) for b in (rois2[0], rois5[0])]
    assert area[1] > 2 * area[0]  # mass size grows with BI-RADS


def test_lesion_scale_grows_the_mass_and_nothing_else():
    mass = {"shape": "R", "margin": "D", "density": "="}
    base, _ = _render(4, density=2, birads=1)
    one, (box1,) = _render(4, density=2, birads=4, mass=mass)
    three, (box3,) = _render(4, density=2, birads=4, mass=mass, lesion_scale=3.0)
    side = [np.sqrt((b[2] - b[0]) * (b[3] - b[1])) for b in (box1, box3)]
    assert 2.5 < side[1] / side[0] < 3.5, side
    for img, (y0, x0, y1, x1) in ((one, box1), (three, box3)):
        diff = img.astype(np.int64) - base.astype(np.int64)
        assert diff.min() >= 0 and diff.max() > 0.2 * 4095  # only the mass was added
        changed = np.argwhere(diff > 0.04 * 4095)  # the box is where the mass profile > 0.1
        assert changed[:, 0].min() >= y0 - 1 and changed[:, 0].max() <= y1 + 1
        assert changed[:, 1].min() >= x0 - 1 and changed[:, 1].max() <= x1 + 1
    with pytest.raises(ValueError, match="lesion_scale"):
        _render(0, birads=4, mass=mass, lesion_scale=0.0)


def test_calcifications_are_small_bright_dots():
    base, _ = _render(5, density=2)
    dots, rois = _render(5, density=2, calcs={"type": "P", "distribution": "C", "number": 12})
    y0, x0, y1, x1 = rois[0]
    diff = dots.astype(np.int64) - base.astype(np.int64)
    assert diff.max() > 0.2 * 4095 and (diff > 0.1 * 4095).sum() < 0.02 * diff.size
    assert (y1 - y0) < 0.4 * 320 and (x1 - x0) < 0.4 * 256  # clustered


def test_right_images_face_the_other_way_and_odd_sizes_work():
    left, _ = _render(2, laterality="L", height=301, width=257)
    right, _ = _render(2, laterality="R", height=301, width=257)
    assert left.shape == right.shape == (301, 257)
    assert np.array_equal(left[:, ::-1], right)
    assert left[:, :20].mean() > left[:, -20:].mean()  # chest wall on the left for L


def test_bad_input_gets_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="mass shape"):
        _render(0, mass={"shape": "?"})
    with pytest.raises(ValueError, match="density"):
        _render(0, density=7)
    phi = synthetic.fake_phi(np.random.default_rng(0))
    kw = dict(monochrome1=False, j2k=False, laterality="L", view="CC", phi=phi,
              study_description="x", sop_uid="1.2.3")
    with pytest.raises(ValueError, match="bad.dcm.*12 bits"):
        synthetic.write_dicom(tmp_path / "bad.dcm", np.full((40, 40), 5000, np.uint16), **kw)
    with pytest.raises(ValueError, match="uint16"):
        synthetic.write_dicom(tmp_path / "bad.dcm", np.zeros((40, 40), np.float32), **kw)
    with pytest.raises(ValueError, match="patients"):
        synthetic.generate(tmp_path / "none", patients=0)


def test_reruns_overwrite_own_output_but_not_foreign_tables(tmp_path):
    out = tmp_path / "syn"
    synthetic.generate(out, patients=2, seed=0, image_size=(64, 64))
    first = len(_dicoms(out))
    summary = synthetic.generate(out, patients=1, seed=0, image_size=(64, 64))
    assert len(_dicoms(out)) == summary["images"] < first  # no stale files left
    foreign = tmp_path / "foreign"
    (foreign / "tables").mkdir(parents=True)
    (foreign / METADATA).write_text("empi_anon\n1\n")
    with pytest.raises(FileExistsError, match="not written by this generator"):
        synthetic.generate(foreign, patients=1)
    assert (foreign / METADATA).read_text() == "empi_anon\n1\n"


def test_no_jax_import():
    code = "import sys, data_prep.synthetic; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=os.getcwd()).returncode == 0


def test_localisation_set_has_one_large_mass_per_study_and_embed_formats(tmp_path):
    """--localisation: one side of every study has a mass (a large box on both its views,
    no calcification), the other side a negative row; the same EMBED columns and codes."""
    size = (320, 256)
    synthetic.generate(tmp_path, patients=4, seed=3, image_size=size, lesion_scale=2.0,
                       localisation=True)
    meta = pd.read_csv(tmp_path / METADATA, dtype={"empi_anon": str, "acc_anon": str})
    clin = pd.read_csv(tmp_path / CLINICAL, dtype={"empi_anon": str, "acc_anon": str})
    assert META_COLUMNS <= set(meta.columns) and CLINICAL_COLUMNS <= set(clin.columns)
    assert clin["calcfind"].isna().all()
    for acc, rows in clin.groupby("acc_anon"):
        masses = rows[rows["massshape"].notna()]
        assert len(masses) == 1 and set(rows["side"]) == {"L", "R"}, rows
        assert rows[rows["massshape"].isna()]["asses"].tolist() == ["N"]
        mass_side = masses["side"].iloc[0]
        images = meta[(meta["acc_anon"] == acc) & (meta["FinalImageType"] == "2D")]
        for _, image in images.iterrows():
            has_box = image["num_roi"] > 0
            assert has_box == (image["ImageLateralityFinal"] == mass_side)
            if has_box:
                (y0, x0, y1, x1), = eval(image["ROI_coords"])
                # radius floor 0.17 of the short side (an oval's box is narrower one way)
                assert np.sqrt((y1 - y0) * (x1 - x0)) > 0.25 * min(size)
    marker = (tmp_path / "SYNTHETIC.json").read_text()
    assert '"localisation": true' in marker


def test_default_output_carries_no_localisation_marker(run):
    out, _ = run
    assert "localisation" not in (out / "SYNTHETIC.json").read_text()
