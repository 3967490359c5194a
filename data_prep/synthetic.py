"""Synthetic EMBED-format dataset: phantom mammogram DICOMs plus EMBED tables.

The embedded default for the demo and the tests: real column names and codes
(spec/datasets.md §1), made-up values. Pixels follow the labels (density sets the
glandular texture, the finding codes plant masses and calcifications on the
finding's side) so a model can learn them. Every DICOM carries distinctive fake
PHI (all names contain PHI_MARKER) so tests can prove none of it leaks into the
dataset. Same seed, same bytes. Rendering lives in synthetic_render.py.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.uid import generate_uid

from data_prep.synthetic_dicom import PHI_MARKER, UID_PREFIX, digits, fake_phi, write_dicom
from data_prep.synthetic_render import cview_of, render_mammogram

__all__ = ["generate", "render_mammogram", "write_dicom", "fake_phi", "ORIGINAL_IMAGE_PREFIX",
           "PHI_MARKER", "LEGEND"]

ORIGINAL_IMAGE_PREFIX = "/mnt/NAS2/mammo/anon_dicom"
METADATA_CSV = "EMBED_OpenData_metadata.csv"
CLINICAL_CSV = "EMBED_OpenData_clinical.csv"
LEGEND_CSV = "AWS_Open_Data_Clinical_Legend.csv"
MARKER_FILE = "SYNTHETIC.json"  # marks a folder this module may overwrite
SCREENING = "MG Screening Bilateral w/CAD"
DIAGNOSTIC = "MG Diagnostic Mammo Bilateral"

# clinical column -> (description, {code: meaning}); meanings from datasets.md §1.4 / §3.1.
LEGEND = {
    "asses": ("BI-RADS assessment", {
        "A": "additional imaging required", "N": "negative", "B": "benign finding",
        "P": "probably benign finding", "S": "suspicious abnormality",
        "M": "highly suggestive of malignancy", "K": "known biopsy-proven malignancy",
        "X": "no assessment"}),
    "tissueden": ("Breast density", {
        "1": "almost entirely fat", "2": "scattered fibroglandular densities",
        "3": "heterogeneously dense", "4": "extremely dense", "5": "normal male dense"}),
    "massshape": ("Mass shape", {
        "G": "generic", "R": "round", "O": "oval", "X": "irregular",
        "Q": "questioned architectural distortion",
        "A": "architectural distortion", "T": "tubular asymmetry", "N": "intramammary lymph node",
        "B": "global asymmetry", "F": "focal asymmetry", "S": "asymmetry",
        "V": "developing asymmetry", "Y": "lymph node"}),
    "massmargin": ("Mass margin", {
        "D": "circumscribed", "U": "obscured", "M": "microlobulated", "I": "indistinct",
        "S": "spiculated"}),
    "massdens": ("Mass density", {
        "+": "high density", "=": "equal density", "-": "low density", "0": "fat containing"}),
    "calcfind": ("Calcification type", {
        "A": "amorphous", "9": "benign", "H": "coarse heterogeneous", "F": "fine linear",
        "B": "fine linear branching", "I": "fine pleomorphic", "K": "pleomorphic",
        "P": "punctate", "R": "round"}),
    "calcdistri": ("Calcification distribution", {
        "G": "grouped", "S": "segmental", "R": "regional", "D": "diffuse", "L": "linear",
        "C": "clustered"}),
}
BIRADS_OF_LETTER = {"A": 0, "N": 1, "B": 2, "P": 3, "S": 4, "M": 5, "K": 6}
VIEWS = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
# Common DICOM PatientOrientation of each image (chest wall left for L, right for R).
RACES = (("African American or Black", 0.40), ("Caucasian or White", 0.40), ("Asian", 0.07),
         ("Multiple", 0.02), ("Native Hawaiian or Other Pacific Islander", 0.01),
         ("American Indian or Alaskan Native", 0.01), ("Unknown, Unavailable or Unreported", 0.09))
ETHNICITIES = (("Non-Hispanic or Latino", 0.85), ("Hispanic or Latino", 0.06),
               ("Unreported", 0.05), (None, 0.04))
MARITAL = ("Married", "Single", "Divorced", "Widowed")
DENSITY_P = (0.107, 0.415, 0.422, 0.056)  # EMBED 2D image shares of A..D (§1.6)
SCREEN_LETTERS = (("N", 0.60), ("B", 0.17), ("A", 0.15), ("P", 0.06), ("X", 0.02))
DIAG_LETTERS = (("N", 0.15), ("B", 0.22), ("P", 0.18), ("A", 0.04), ("S", 0.23), ("M", 0.10),
                ("K", 0.08))
# letter -> options (weight, massshape, massmargin, massdens, calcfind, calcdistri);
# "|" separates random alternatives, "" means none.
LESIONS = {
    "A": ((0.4, "O|X|R", "U|I", "=|+", "", ""), (0.25, "F|A|S|V", "", "", "", ""),
          (0.35, "", "", "", "A|P", "G|C")),
    "B": ((0.45, "R|O", "D", "=|0|-", "", ""), (0.1, "N", "D", "0", "", ""),
          (0.45, "", "", "", "9|R|H", "D|R|G")),
    "P": ((0.55, "O|R", "D", "=", "", ""), (0.1, "F", "", "", "", ""),
          (0.35, "", "", "", "P", "G|C")),
    "S": ((0.45, "X|O", "I|M|S", "+|=", "", ""), (0.35, "", "", "", "I|A|K|H", "G|C|S|L"),
          (0.2, "X", "I|S", "+", "I|K", "G|C")),
    "M": ((0.5, "X", "S", "+", "", ""), (0.25, "", "", "", "F|B|I", "S|L|C"),
          (0.25, "X", "S|I", "+", "I|F", "S|G")),
    "K": ((0.7, "X", "S|I", "+", "", ""), (0.3, "X", "S", "+", "K|I", "G|C")),
}
# The localisation set (generate(localisation=True)): in every study one breast carries a
# mass (on both its views, no calcification) and the other is negative, so a caption's
# lesion sentences say what its image shows ("The mass is round and high density") or
# what it does not ("no significant masses, calcification, or other abnormalities");
# where every image had a mass, "The mass ..." told no two images apart and the local loss
# never tied it to the mass. (shape, margins, BI-RADS letters) of the mass:
# Sharp margins only: a spiculated or indistinct margin's box reaches far past the mass.
LOCALISATION_MASSES = (("R", "D", "B|P"), ("O", "D", "B|P"), ("X", "M", "S|M|K"))
LOCALISATION_DENSITIES = "+|=|-"
# Mass radius floor, as a fraction of min(H, W): on the demo's 112-px canvas (8 x 8
# patches) the mass box then spans at least about 2 x 2 patches on CC and MLO crops.
LOCALISATION_MIN_RADIUS = 0.17
CALC_COUNTS = {"D": (30, 60), "R": (15, 30), "S": (12, 25), "L": (6, 12)}  # else (5, 15)
META_COLUMNS = ("empi_anon", "acc_anon", "anon_dicom_path", "study_date_anon", "StudyDescription",
                "SeriesDescription", "FinalImageType", "ImageLateralityFinal", "ViewPosition",
                "spot_mag", "num_roi", "ROI_coords", "SRC_DST", "match_level", "Manufacturer",
                "cohort_num")
CLINICAL_COLUMNS = ("empi_anon", "acc_anon", "study_date_anon", "desc", "numfind", "side",
                    "asses", "tissueden", "massshape", "massmargin", "massdens", "calcfind",
                    "calcdistri", "calcnumber", "total_L_find", "total_R_find", "path_severity",
                    "bside", "type", "age_at_study", "RACE_DESC", "ETHNIC_GROUP_DESC",
                    "GENDER_DESC", "MARITAL_STATUS_DESC", "cohort_num")


# ---------------------------------------------------------------- clinical plan
def _pick(rng: np.random.Generator, pairs):
    values, weights = zip(*pairs)
    return values[int(rng.choice(len(values), p=np.asarray(weights) / sum(weights)))]


def _alt(rng: np.random.Generator, options: str) -> str | None:
    """One of the "|"-separated codes, None for ""."""
    return str(rng.choice(options.split("|"))) if options else None


def _path_severity(rng: np.random.Generator, letter: str, has_mass: bool) -> float:
    """0 invasive / 1 DCIS for cancers, 4 benign / 5 normal, NaN when not biopsied."""
    cancer_p, biopsy_p = {"K": (1.0, 1.0), "M": (0.85, 0.8), "S": (0.35, 0.5)}.get(letter, (0.0, 0.08))
    if rng.random() >= biopsy_p:
        return float("nan")
    if rng.random() < cancer_p:
        return 0.0 if has_mass else 1.0
    return float(rng.choice([4.0, 5.0]))


def _lesion_row(rng: np.random.Generator, letter: str, side: str) -> dict:
    options = LESIONS[letter]
    _, shape, margin, dens, calc, distri = options[int(rng.choice(
        len(options), p=np.array([o[0] for o in options]) / sum(o[0] for o in options)))]
    row = {"side": side, "asses": letter, "massshape": _alt(rng, shape),
           "massmargin": _alt(rng, margin), "massdens": _alt(rng, dens),
           "calcfind": _alt(rng, calc), "calcdistri": _alt(rng, distri)}
    if row["calcfind"]:
        row["calcnumber"] = float(rng.integers(*CALC_COUNTS.get(row["calcdistri"], (5, 15))))
    row["path_severity"] = _path_severity(rng, letter, row["massshape"] is not None)
    if not np.isnan(row["path_severity"]):
        row["bside"], row["type"] = side, str(rng.choice(["B", "S"], p=[0.8, 0.2]))
    return row


def _exam_findings(rng: np.random.Generator, letter: str, screening: bool,
                   side: str | None) -> list[dict]:
    """Finding rows of one exam; unilateral lesions usually get a negative row for the
    other side, so the per-image rule (§1.7) has a side to pick."""
    if letter not in LESIONS:  # N or X: one exam-level row
        return [{"side": "B" if rng.random() < 0.3 else None, "asses": letter}]
    side = side or str(rng.choice(["L", "R"]))
    first = _lesion_row(rng, letter, side)
    if first.get("calcdistri") == "D" and letter == "B" and rng.random() < 0.5:
        first["side"] = "B"  # bilateral diffuse benign calcifications
        return [first]
    other = "R" if side == "L" else "L"
    if not screening and letter in "SMK" and rng.random() < 0.2:
        return [first, _lesion_row(rng, str(rng.choice(["B", "P"])), other)]
    return [first, {"side": other, "asses": "N"}] if rng.random() < 0.9 else [first]


def _localisation_row(rng: np.random.Generator, side: str) -> dict:
    """One finding row with a mass (and no calcification) on `side`."""
    shape, margins, letters = LOCALISATION_MASSES[int(rng.integers(len(LOCALISATION_MASSES)))]
    letter = _alt(rng, letters)
    row = {"side": side, "asses": letter, "massshape": shape, "massmargin": _alt(rng, margins),
           "massdens": _alt(rng, LOCALISATION_DENSITIES), "calcfind": None, "calcdistri": None}
    row["path_severity"] = _path_severity(rng, letter, True)
    if not np.isnan(row["path_severity"]):
        row["bside"], row["type"] = side, str(rng.choice(["B", "S"], p=[0.8, 0.2]))
    return row


def _plan_patient(rng: np.random.Generator, empi: str, accs: list[str],
                  localisation: bool = False) -> dict:
    male = rng.random() < 0.015
    density = 5 if male else int(rng.choice(4, p=DENSITY_P)) + 1
    age0 = int(np.clip(rng.normal(58, 11), 35, 89))
    first = datetime.date(2013, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 8 * 365)))
    patient = {"empi": empi, "density": density, "male": male,
               "race": _pick(rng, RACES), "ethnicity": _pick(rng, ETHNICITIES),
               "marital": str(rng.choice(MARITAL)),
               "phi": fake_phi(rng, birth_year=first.year - age0), "studies": []}
    patient["phi"]["PatientSex"] = "M" if male else "F"
    date, previous = first, None
    for j in range(int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))):
        follow = previous is not None and previous["screening"] and previous["letter"] == "A"
        if j:
            date += datetime.timedelta(days=int(rng.integers(7, 40) if follow else rng.integers(250, 800)))
        screening = not follow and rng.random() < 0.75
        letter = _pick(rng, SCREEN_LETTERS if screening else DIAG_LETTERS)
        side = previous["findings"][0]["side"] if follow else None
        if localisation:  # a mass on one side (both its views), the other side negative
            side = str(rng.choice(["L", "R"]))
            findings = [_localisation_row(rng, side),
                        {"side": "R" if side == "L" else "L", "asses": "N"}]
        else:
            findings = _exam_findings(rng, letter, screening, side if side in ("L", "R") else None)
        drift = (rng.random() < 0.1) * rng.choice([-1, 1])  # reported density varies a little
        tissueden = float(density if male else np.clip(density + drift, 1, 4))
        if rng.random() < 0.03:
            tissueden = float("nan")  # density not reported
        phi = dict(patient["phi"], AccessionNumber="E" + digits(rng, 11))
        previous = {"acc": accs[j], "date": date, "screening": screening, "letter": letter,
                    "findings": findings, "tissueden": tissueden, "phi": phi,
                    "age": age0 + (date - first).days // 365}
        patient["studies"].append(previous)
    return patient


def _select_row(rows: list[dict], side: str) -> dict | None:
    """The finding an image is labelled with (datasets.md §1.7 steps 1-2)."""
    chosen = [r for r in rows if r.get("side") == side] or [r for r in rows if r.get("side") == "B"] or rows
    graded = [(BIRADS_OF_LETTER[r["asses"]], r) for r in chosen if r["asses"] in BIRADS_OF_LETTER]
    if not graded:
        return None
    ks = [k for k, _ in graded]
    target = 0 if max(ks) <= 2 and min(ks) == 0 else max(ks)
    return next(r for k, r in graded if k == target)


def _image_lesions(rows: list[dict], side: str) -> tuple[int, dict | None, dict | None]:
    """BI-RADS, mass and calcification arguments of render_mammogram for one image.
    A lesion is drawn only on its own side (or both for side B)."""
    row = _select_row(rows, side)
    if row is None:
        return 1, None, None
    birads = BIRADS_OF_LETTER[row["asses"]]
    if row.get("side") not in (side, "B"):
        return birads, None, None
    mass = ({"shape": row["massshape"], "margin": row.get("massmargin"),
             "density": row.get("massdens")} if row.get("massshape") else None)
    calcs = ({"type": row["calcfind"], "distribution": row["calcdistri"],
              "number": int(row["calcnumber"])} if row.get("calcfind") else None)
    return birads, mass, calcs


# ---------------------------------------------------------------- writing
def _prepare(out: Path) -> None:
    """Clear a previous synthetic run in `out`; refuse to mix with foreign data."""
    ours = [out / "images" / "cohort_1"]
    ours += [out / "tables" / n for n in (METADATA_CSV, CLINICAL_CSV, LEGEND_CSV)]
    if (out / MARKER_FILE).exists():
        for p in ours:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    elif any(p.exists() for p in ours):
        raise FileExistsError(f"{out}: already holds EMBED tables or images not written by this "
                              f"generator ({MARKER_FILE} missing); choose another --out")
    (out / "tables").mkdir(parents=True, exist_ok=True)
    # claimed before any file is written, so an interrupted run can simply be rerun
    (out / MARKER_FILE).write_text(json.dumps({"generator": "data_prep.synthetic", "complete": False}))


def _legend_table() -> pd.DataFrame:
    return pd.DataFrame([{"Header in export": header, "Discription": desc, "Code": code,
                          "Meaning": meaning}
                         for header, (desc, codes) in LEGEND.items() for code, meaning in codes.items()])


def _clinical_rows(patient: dict, study: dict) -> list[dict]:
    rows = []
    lesions = [f for f in study["findings"] if f["asses"] not in ("N", "X")]
    totals = {s: sum(f["side"] in (s, "B") for f in lesions) for s in ("L", "R")}
    for k, finding in enumerate(study["findings"], start=1):
        rows.append({**finding, "empi_anon": patient["empi"], "acc_anon": study["acc"],
                     "study_date_anon": study["date"].isoformat(),
                     "desc": SCREENING if study["screening"] else DIAGNOSTIC, "numfind": k,
                     "tissueden": study["tissueden"], "total_L_find": totals["L"],
                     "total_R_find": totals["R"], "age_at_study": float(study["age"]),
                     "RACE_DESC": patient["race"], "ETHNIC_GROUP_DESC": patient["ethnicity"],
                     "GENDER_DESC": "Male" if patient["male"] else "Female",
                     "MARITAL_STATUS_DESC": patient["marital"], "cohort_num": 1})
    return rows


def _exact_subset(rng: np.random.Generator, n: int, fraction: float) -> set[int]:
    """round(fraction * n) of range(n), so small runs still hit the fraction."""
    return set(rng.permutation(n)[: int(round(fraction * n))].tolist())


def generate(out_dir, *, patients: int, seed: int = 0, image_size: tuple[int, int] = (640, 512),
             j2k_fraction: float = 0.25, monochrome1_fraction: float = 0.3,
             cview_fraction: float = 0.15, lesion_scale: float = 1.0,
             localisation: bool = False) -> dict:
    """Write a synthetic EMBED-format dataset under out_dir; return summary counts.

    Layout: tables/{EMBED_OpenData_metadata,EMBED_OpenData_clinical,
    AWS_Open_Data_Clinical_Legend}.csv and images/cohort_1/<empi>/<acc>/<uid>.dcm;
    metadata anon_dicom_path holds the site path under ORIGINAL_IMAGE_PREFIX.
    Compression, MONOCHROME1 and C-view copies are chosen per study.
    lesion_scale multiplies every mass radius. At 1 a mass spans about as much of the
    image as a real one; a model that sees the image at a coarse patch grid (the demo:
    112 px, 8 x 8 patches, where the paper has 37 x 37) needs them about 3x larger to
    cover as many patches as a real mass does at the paper's resolution.
    localisation: in every study one side's images carry one mass (its box at least about
    2 x 2 patches of the demo's 8 x 8 grid) and no calcification, the other side's none,
    and the finding rows say which: the set experiments/sla_localisation.py measures
    sentence maps on (on the images with a box). Same table formats.
    """
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    height, width = (int(v) for v in image_size)
    for name, value in (("j2k_fraction", j2k_fraction), ("monochrome1_fraction", monochrome1_fraction),
                        ("cview_fraction", cview_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    out = Path(out_dir)
    _prepare(out)
    master = np.random.default_rng(seed)
    ids = [str(10_000_000 + int(v)) for v in master.choice(90_000_000, 4 * patients, replace=False)]
    plans = [_plan_patient(np.random.default_rng([seed, i]), ids[i],
                           ids[patients + 3 * i: patients + 3 * i + 3], localisation)
             for i in range(patients)]
    min_radius = LOCALISATION_MIN_RADIUS if localisation else 0.0
    studies = [(i, j, p, s) for i, p in enumerate(plans) for j, s in enumerate(p["studies"])]
    j2k = _exact_subset(master, len(studies), j2k_fraction)
    mono1 = _exact_subset(master, len(studies), monochrome1_fraction)
    cview = _exact_subset(master, len(studies), cview_fraction)
    meta_rows, clinical_rows = [], []
    for n, (p_idx, s_idx, patient, study) in enumerate(studies):
        clinical_rows += _clinical_rows(patient, study)
        empi, acc = patient["empi"], study["acc"]
        desc = SCREENING if study["screening"] else DIAGNOSTIC
        vendor = "HOLOGIC, Inc."
        if n in mono1:
            vendor = str(master.choice(["FUJIFILM Corporation", "GE MEDICAL SYSTEMS"]))
        study_uid = generate_uid(UID_PREFIX, entropy_srcs=["mama_jax synthetic", str(seed), empi, acc])
        density = patient["density"] if np.isnan(study["tissueden"]) else int(study["tissueden"])
        for v, (side, view) in enumerate(VIEWS):
            birads, mass, calcs = _image_lesions(study["findings"], side)
            rng = np.random.default_rng([seed, p_idx, s_idx, v])
            pixels, rois = render_mammogram(rng, height=height, width=width, density=density,
                                            birads=birads, laterality=side, view=view, mass=mass,
                                            calcs=calcs, return_rois=True,
                                            lesion_scale=lesion_scale,
                                            min_mass_radius=min_radius)
            kinds = [("2D", pixels)]
            if n in cview:
                kinds.append(("C-view", cview_of(pixels, np.random.default_rng([seed, p_idx, s_idx, v, 1]))))
            source = ""
            for image_type, image in kinds:
                uid = generate_uid(UID_PREFIX, entropy_srcs=["mama_jax synthetic", str(seed), empi, acc,
                                                             side, view, image_type])
                relative = f"cohort_1/{empi}/{acc}/{uid}.dcm"
                series = f"{side} {view}" + (" C-View" if image_type == "C-view" else "")
                write_dicom(out / "images" / relative, image, monochrome1=n in mono1, j2k=n in j2k,
                            laterality=side, view=view, phi=study["phi"], study_description=desc,
                            sop_uid=uid, study_uid=study_uid, series_description=series,
                            manufacturer=vendor, study_date=study["date"].strftime("%Y%m%d"))
                meta_rows.append({
                    "empi_anon": empi, "acc_anon": acc,
                    "anon_dicom_path": f"{ORIGINAL_IMAGE_PREFIX}/{relative}",
                    "study_date_anon": study["date"].isoformat(), "StudyDescription": desc,
                    "SeriesDescription": series, "FinalImageType": image_type,
                    "ImageLateralityFinal": side, "ViewPosition": view, "spot_mag": 0,
                    "num_roi": len(rois), "ROI_coords": str(tuple(rois)),
                    "SRC_DST": source, "match_level": (1 if image_type == "2D" else 2) if rois else None,
                    "Manufacturer": vendor, "cohort_num": 1})
                source = f"{ORIGINAL_IMAGE_PREFIX}/{relative}"  # a C-view copies the 2D ROIs
    tables = out / "tables"
    pd.DataFrame(clinical_rows, columns=list(CLINICAL_COLUMNS)).to_csv(tables / CLINICAL_CSV, index=False)
    _legend_table().to_csv(tables / LEGEND_CSV, index=False)
    pd.DataFrame(meta_rows, columns=list(META_COLUMNS)).to_csv(tables / METADATA_CSV, index=False)
    summary = {"patients": patients, "studies": len(studies), "images": len(meta_rows),
               "images_2d": sum(r["FinalImageType"] == "2D" for r in meta_rows),
               "findings": len(clinical_rows), "j2k_studies": len(j2k), "monochrome1_studies": len(mono1)}
    extra = {"localisation": True} if localisation else {}  # default output unchanged
    (out / MARKER_FILE).write_text(json.dumps({"generator": "data_prep.synthetic", "complete": True,
                                               "seed": seed, "image_size": [height, width],
                                               **summary, **extra}, indent=1))
    return summary
