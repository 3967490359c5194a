"""End-to-end build: synthetic EMBED-format tables + DICOMs -> TFDS ArrayRecord."""

import ast
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest

from data_prep import build, prepare, schema, synthetic

SIZE = (160, 128)
PHI_TAGS = ("PatientName", "PatientBirthDate", "AccessionNumber", "InstitutionName",
            "PatientID", "ReferringPhysicianName", "OperatorsName", "ImageComments",
            "StudyComments")


def _dicoms(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".dcm"))


def _read_dataset(out_dir):
    import tensorflow_datasets as tfds

    sources = tfds.builder_from_directory(build.dataset_dir(out_dir, "embed")).as_data_source()
    return {split: [src[i] for i in range(len(src))] for split, src in sources.items()}


def _manifest_lines(out_dir):
    with open(os.path.join(out_dir, prepare.MANIFEST)) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(str(out), patients=6, seed=3, image_size=SIZE)
    return str(out)


@pytest.fixture(scope="module")
def built(raw, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("built"))
    proc = subprocess.run([sys.executable, "-m", "data_prep", "build", "--dataset", "embed",
                           "--tables", raw, "--images", raw, "--out", out, "--workers", "2",
                           "--long-side", "96"], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return out, proc.stdout + proc.stderr


def test_records_follow_the_contract(raw, built):
    out, _ = built
    data = _read_dataset(out)
    assert set(data) <= set(schema.SPLITS) and "train" in data
    records = [r for rs in data.values() for r in rs]
    ids = [r["image_id"] for r in records]
    assert len(ids) == len(set(ids)) > 0
    for split, rs in data.items():
        for r in rs:
            assert set(r) == set(schema.ROW_FIELDS) | {"image"}
            img = r["image"]
            assert img.dtype == np.uint16 and img.ndim == 2 and max(img.shape) <= 96
            assert r["split"].decode() == split
            assert r["laterality"].decode() in ("L", "R")
            assert r["view"].decode() in ("CC", "MLO")
            assert 1 <= int(r["density"]) <= 4 and 0 <= int(r["birads"]) <= 6
    # Patients never straddle splits.
    owner = {}
    for split, rs in data.items():
        for r in rs:
            assert owner.setdefault(r["patient_id"], split) == split


def test_manifest_accounts_for_every_dicom(raw, built):
    out, _ = built
    entries = _manifest_lines(out)
    ids = [e["image_id"] for e in entries]
    assert len(ids) == len(set(ids))
    inputs = _dicoms(raw)
    assert len(entries) == len(inputs)
    written = [e for e in entries if e["status"] == "written"]
    skipped = [e for e in entries if e["status"] == "skipped"]
    assert len(written) + len(skipped) == len(inputs)
    assert all(e["reason"] for e in skipped)
    assert any("C-view" in e["reason"] for e in skipped)  # the synthetic set has C-view rows
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["written"] == len(written) == sum(len(v) for v in _read_dataset(out).values())


def test_readable_through_grain(built):
    import grain
    import tensorflow_datasets as tfds

    out, _ = built
    src = tfds.builder_from_directory(build.dataset_dir(out, "embed")).as_data_source()["train"]
    ds = grain.MapDataset.source(src).shuffle(seed=0).map(lambda r: r["image"].shape)
    shapes = list(ds.to_iter_dataset())
    assert len(shapes) == len(src) and all(len(s) == 2 for s in shapes)


def test_no_patient_identifying_value_leaves_the_dicoms(raw, built):
    out, logs = built
    planted = set()
    for path in _dicoms(raw):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for tag in PHI_TAGS:
            value = str(ds.get(tag, "") or "")
            if len(value) >= 6:
                planted.add(value)
                # Name parts carry the generator's marker; plain words ("Breast") do not.
                planted.update(p for p in value.replace("^", " ").replace("(", " ").replace(")", " ").split()
                               if synthetic.PHI_MARKER in p or any(c.isdigit() for c in p))
    assert len(planted) >= 10, "synthetic DICOMs should carry fake PHI to search for"
    needles = [p.encode() for p in planted]
    blobs = [logs]
    for d, _, fs in os.walk(out):
        for f in fs:
            blobs.append(open(os.path.join(d, f), "rb").read())
    for record in (r for rs in _read_dataset(out).values() for r in rs):
        blobs.append(b" ".join(v for v in record.values() if isinstance(v, bytes)))
    for blob in blobs:
        for needle in needles:
            assert needle not in blob, f"planted PHI {needle!r} found in the outputs"


def test_bad_files_are_skipped_with_reasons(raw, tmp_path):
    import shutil

    src = str(tmp_path / "raw")
    shutil.copytree(raw, src)
    files = _dicoms(src)
    truncated, no_pixels, unsupported = files[0], files[1], files[2]
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    ds = pydicom.dcmread(no_pixels)
    del ds.PixelData
    ds.save_as(no_pixels)
    ds = pydicom.dcmread(unsupported)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2
    ds.save_as(unsupported, enforce_file_format=True)

    out = str(tmp_path / "out")
    summary = build.build("embed", src, src, out, workers=1, long_side=64)
    entries = {e["dicom_path"]: e for e in _manifest_lines(out)}
    assert summary["inputs"] == len(files)
    for path in (truncated, no_pixels, unsupported):
        entry = entries[os.path.abspath(path)]
        assert entry["status"] == "skipped" and entry["reason"]
    written = sum(e["status"] == "written" for e in entries.values())
    assert written == summary["written"] > 0
    assert sum(len(v) for v in _read_dataset(out).values()) == written


def test_killed_build_resumes_without_duplicates(raw, tmp_path):
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "data_prep", "build", "--dataset", "embed", "--tables", raw,
           "--images", raw, "--out", out, "--workers", "1", "--long-side", "512"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = os.path.join(out, prepare.MANIFEST)
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(manifest):
            n_written = sum('"written"' in line for line in open(manifest))
            if n_written >= 3:
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {e["image_id"] for e in _manifest_lines(out) if e["status"] == "written"}
    assert 3 <= len(first) < len(_dicoms(raw)), "the build should be killed midway"

    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    entries = _manifest_lines(out)
    ids = [e["image_id"] for e in entries]
    assert len(ids) == len(set(ids)) == len(_dicoms(raw))  # nothing decoded twice
    records = [r for rs in _read_dataset(out).values() for r in rs]
    rec_ids = [r["image_id"].decode() for r in records]
    assert len(rec_ids) == len(set(rec_ids)) == sum(e["status"] == "written" for e in entries)


def test_stored_image_equals_the_decoded_dicom(built):
    from data_prep import dicom

    out, _ = built
    paths = {e["image_id"]: e["dicom_path"] for e in _manifest_lines(out)}
    records = [r for rs in _read_dataset(out).values() for r in rs][:5]
    for r in records:
        expected = dicom.read_dicom(paths[r["image_id"].decode()], long_side=96).pixels
        np.testing.assert_array_equal(r["image"], expected)


def test_compressed_image_round_trip(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 65535, (37, 23), dtype=np.uint16)
    path = prepare.cache_path(str(tmp_path), "1.2.3.4")
    os.makedirs(os.path.dirname(path))
    prepare.write_cached(path, prepare.CompressedImage.compress(pixels))
    image = prepare.read_cached(str(tmp_path), "1.2.3.4")
    assert image.shape == pixels.shape
    np.testing.assert_array_equal(image.to_array(), pixels)


def test_lesion_boxes_are_carried_onto_the_stored_image(raw, built):
    import pandas as pd

    from data_prep import embed

    out, _ = built
    meta = pd.read_csv(os.path.join(raw, "tables", synthetic.METADATA_CSV))
    rois = {embed.image_id_of(p): c for p, c in zip(meta["anon_dicom_path"], meta["ROI_coords"])}
    crops = {e["image_id"]: e["crop"] for e in _manifest_lines(out) if e["status"] == "written"}
    records = [r for rs in _read_dataset(out).values() for r in rs]
    with_boxes = 0
    for r in records:
        image_id = r["image_id"].decode()
        boxes = schema.parse_boxes(r["roi_boxes"].decode())
        source = [tuple(int(v) for v in b) for b in ast.literal_eval(rois[image_id])]
        assert len(boxes) == len(source), image_id  # synthetic lesions lie inside the breast
        with_boxes += bool(boxes)
        (cy0, cy1, cx0, cx1), (h, w) = crops[image_id], r["image"].shape
        for (y0, x0, y1, x1), (sy0, sx0, sy1, sx1) in zip(boxes, source):
            # inclusive source pixels -> stored pixels through the recorded crop and scale
            assert y0 == max(0, int(np.floor((sy0 - cy0) * h / (cy1 - cy0))))
            assert x1 == min(w, int(np.ceil((sx1 + 1 - cx0) * w / (cx1 - cx0))))
            assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
    assert with_boxes >= 3, "the synthetic set should have images with lesions"


def test_cache_from_before_crop_boxes_is_decoded_again(raw, built, tmp_path):
    import shutil

    out, _ = built
    copy = str(tmp_path / "out")
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("tfds"))
    entries = _manifest_lines(copy)
    written = [e for e in entries if e["status"] == "written"]
    with open(os.path.join(copy, prepare.MANIFEST), "w") as f:
        for e in entries:  # an old manifest: no crop boxes; one image keeps its crop
            if e["status"] == "written" and e is not written[0]:
                e = {k: v for k, v in e.items() if k != "crop"}
            f.write(json.dumps(e) + "\n")
    jobs = [(e["image_id"], e["dicom_path"]) for e in written]
    redone = prepare.decode_all(jobs, copy, prepare.DecodeOptions(long_side=96), workers=1)
    lines = _manifest_lines(copy)
    assert len(lines) == len(entries) + len(written) - 1  # all but the one decoded again
    assert all(redone[i]["crop"] == crops for i, crops in
               ((e["image_id"], e["crop"]) for e in written))
