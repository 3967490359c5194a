"""Trained heads in the package: the probe job's 100 % probe and the fine-tune job's
classifier give, from DICOMs, the probabilities those jobs gave on the records."""

import json
import os

import numpy as np
import pytest

import mama_jax
from configs import export as export_config
from configs import extract as extract_config
from configs import finetune as finetune_config
from configs import linear_probe as probe_config
from data_prep import prepare
from mama_jax import export
from mama_jax.export import job as export_job
from mama_jax.input import captions
from mama_jax.evaluate import extract, finetune, linear_probe, metrics


@pytest.fixture(scope="module")
def runs(pretrained_workdir, tmp_path_factory):
    """One eval workdir with extract, linear-probe (density) and fine-tune (birads) results."""
    workdir = str(tmp_path_factory.mktemp("heads_eval"))
    cfg = extract_config.get_config()
    cfg.update(dict(pretrain_workdir=pretrained_workdir, batch_size=8))
    extract.run(cfg, workdir)
    cfg = probe_config.get_config("test")
    cfg.update(dict(pretrain_workdir=pretrained_workdir, tasks=("density",), fractions=(1.0,),
                    bootstrap=0))
    linear_probe.run(cfg, workdir)
    cfg = finetune_config.get_config("test")
    cfg.update(dict(pretrain_workdir=pretrained_workdir, steps=2, bootstrap=0))
    finetune.run(cfg, workdir)
    return workdir


@pytest.fixture(scope="module")
def package(runs, pretrained_workdir, tmp_path_factory):
    cfg = export_config.get_config()
    cfg.update(dict(pretrain_workdir=pretrained_workdir, probe_workdir=runs, finetune_workdir=runs))
    result = export.run(cfg, str(tmp_path_factory.mktemp("heads_export")))
    assert result["heads"] == ["finetune:birads", "probe:density"]
    return result["out_dir"]


@pytest.fixture(scope="module")
def dicom_of(tiny_dataset):
    build_dir = os.path.abspath(os.path.join(tiny_dataset, *[os.pardir] * 4))
    return {k: e["dicom_path"] for k, e in prepare.read_manifest(build_dir).items()
            if e["status"] == "written"}


def test_probe_head_is_the_probe_jobs_and_reads_dicoms_as_extract(runs, package, dicom_of):
    model = mama_jax.load(package)
    assert model.available_heads("density") == ["zero-shot", "probe"]
    assert model.available_heads("birads") == ["zero-shot", "finetune"]
    head = model.heads[("probe", "density")]
    with np.load(os.path.join(runs, "embeddings_test.npz")) as z:
        test = {k: z[k] for k in z.files}
    # The refit is the job's 100 % probe: its test metrics are the job's.
    with open(os.path.join(runs, "linear_probe.json")) as f:
        job = json.load(f)["tasks"]["density"]["fractions"]["1.0"]["eval"]["test"]
    known = test["density"] >= 0
    probs = linear_probe.predict_proba(head.params, test[head.feature][known])
    ours = metrics.summary(test["density"][known], probs,
                           class_names=list(captions.CLASS_NAMES["density"]))
    assert job["balanced_accuracy"] is not None
    for name in ("balanced_accuracy", "auc", "accuracy"):
        if job[name] is None:  # undefined on 4 test images (json_safe writes NaN as null)
            assert np.isnan(ours[name]), name
        else:
            assert ours[name] == pytest.approx(job[name], abs=1e-9), name
    # From the DICOMs: the probe on the extract job's features of the same images.
    paths = [dicom_of[i] for i in test["image_id"]]
    preds = model.predict_dicoms(paths, "density", head="probe", batch_size=4)
    got = {r["path"]: r["probs"] for r in preds.images}
    want = linear_probe.predict_proba(head.params, test[head.feature])
    np.testing.assert_allclose(np.stack([got[os.path.abspath(p)] for p in paths]), want, atol=1e-5)
    assert preds.head == "probe" and preds.images[0]["head"] == "probe"


def test_finetune_head_gives_the_finetune_jobs_test_probabilities(runs, package, dicom_of):
    model = mama_jax.load(package)
    with np.load(os.path.join(runs, "finetune_birads_test.npz")) as z:
        image_ids, want = list(z["image_id"]), z["probs"]
    paths = [dicom_of[i] for i in image_ids]
    preds = model.predict_dicoms(paths, "birads", head="finetune", batch_size=4)
    got = {r["path"]: r["probs"] for r in preds.images}
    np.testing.assert_allclose(np.stack([got[os.path.abspath(p)] for p in paths]), want, atol=1e-5)


def test_broken_heads_are_refused(package, tmp_path):
    import shutil

    edited = str(tmp_path / "edited")
    shutil.copytree(package, edited)
    os.remove(os.path.join(edited, "heads", "probe_density.npz"))
    with pytest.raises(export.PackageError, match="probe_density.npz: missing probe arrays"):
        mama_jax.load(edited)
    with pytest.raises(FileNotFoundError, match="no linear probe result"):
        export_job.probe_heads(str(tmp_path))
