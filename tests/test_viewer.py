"""The local viewer in a real browser (Debian's headless Chromium driven by Playwright):
a synthetic DICOM's probabilities on the page are mama_jax.predict's, a typed sentence
draws its similarity map, and a screenshot is saved.

The README's screenshot is this test on the demo's model and one of its DICOMs:
  MAMA_VIEWER_MODEL=work/demo/export MAMA_VIEWER_DICOM=<a file under work/synthetic/images> \
  MAMA_VIEWER_SCREENSHOT=docs/viewer.png .venv/bin/python -m pytest -q tests/test_viewer.py -k browser
"""

import base64
import csv
import json
import os
import shutil
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

import mama_jax
from configs import export as export_config
from data_prep import prepare
from mama_jax import export, predict
from mama_jax.input import captions
from mama_jax.evaluate import maps
from mama_jax.viewer import analysis
from mama_jax.viewer.server import ViewerServer

CHROMIUM = os.environ.get("MAMA_CHROMIUM") or shutil.which("chromium") or ""
SENTENCE = "Breast composition: The breasts are extremely dense"


@pytest.fixture(scope="module")
def package(request, tmp_path_factory):
    if os.environ.get("MAMA_VIEWER_MODEL"):
        return os.path.abspath(os.environ["MAMA_VIEWER_MODEL"])
    cfg = export_config.get_config()
    cfg.pretrain_workdir = request.getfixturevalue("pretrained_workdir")
    return export.run(cfg, str(tmp_path_factory.mktemp("viewer_export")))["out_dir"]


@pytest.fixture(scope="module")
def server(package):
    srv = ViewerServer(mama_jax.load(package), port=0, max_upload_mb=1)
    srv.start_background()
    yield srv
    srv.shutdown()
    srv.server_close()
    assert not os.path.exists(srv.upload_dir)  # the upload folder goes with the server


@pytest.fixture(scope="module")
def dicom(request):
    if os.environ.get("MAMA_VIEWER_DICOM"):
        return os.path.abspath(os.environ["MAMA_VIEWER_DICOM"])
    tiny_dataset = request.getfixturevalue("tiny_dataset")
    build_dir = os.path.abspath(os.path.join(tiny_dataset, *[os.pardir] * 4))
    written = sorted(e["dicom_path"] for e in prepare.read_manifest(build_dir).values()
                     if e["status"] == "written")
    return written[0]


def _post(url, body: bytes, headers=None):
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_server_limits_uploads_and_answers_localhost_only(server, dicom):
    status, res = _post(server.url + "api/analyze", b"x" * (server.max_upload_bytes + 1))
    assert status == 413 and "upload limit" in res["error"]
    status, res = _post(server.url + "api/analyze", b"not a dicom", {"X-Filename": "notes.txt"})
    assert status == 200 and "not a DICOM" in res["error"]
    req = urllib.request.Request(server.url + "api/info", headers={"Host": "evil.example:80"})
    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(req)
    with open(dicom, "rb") as f:
        status, res = _post(server.url + "api/analyze", f.read(), {"X-Filename": "a.dcm"})
    assert status == 200 and set(res["predictions"]) == set(captions.TASKS)
    assert os.listdir(server.upload_dir) == []  # nothing of the upload stays on disk
    status, res = _post(server.url + "api/map", json.dumps({"id": "nope", "sentence": "x"}).encode())
    assert status == 400 and "unknown image" in res["error"]


def test_browser_shows_predict_probabilities_and_draws_a_map(server, package, dicom, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip("no Chromium: run `apt-get install -y chromium` as root (make test does it)")
    from playwright.sync_api import sync_playwright

    out_csv = str(tmp_path / "p.csv")
    want = {}
    for task in captions.TASKS:  # mama_jax.predict's numbers for the same file
        predict.main(["--model", package, "--task", task, dicom, "--out", out_csv, "--no-progress"])
        with open(out_csv, newline="") as f:
            row = next(r for r in csv.DictReader(f) if r["level"] == "image")
        want[task] = [float(row[f"prob_{i}"]) for i in range(len(captions.CLASS_NAMES[task]))]

    shot = os.environ.get("MAMA_VIEWER_SCREENSHOT") or str(tmp_path / "viewer.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 640})
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(server.url)
            page.set_input_files("#files", [dicom])
            page.wait_for_selector(".card[data-id]", timeout=60_000)
            for task, probs in want.items():
                cells = page.locator(f'td.prob[data-task="{task}"][data-head="zero-shot"]')
                shown = [float(cells.nth(i).get_attribute("data-prob")) for i in range(cells.count())]
                # The CSV holds 7 significant digits; the page the float32 value.
                np.testing.assert_allclose(shown, probs, atol=1e-6, err_msg=task)
                assert cells.nth(int(np.argmax(probs))).text_content().startswith(f"{max(probs):.4f}")
            page.fill(".mapform input", SENTENCE)
            page.click("button.draw")
            page.wait_for_selector("img.map", timeout=60_000)
            src = page.get_attribute("img.map", "src")
            page.screenshot(path=shot, full_page=True)
        finally:
            browser.close()
    assert all(u.startswith(server.url) or u.startswith("data:") for u in requests), requests

    # The map drawn is the sentence's cosine map of this image (evaluate/maps.py), overlaid.
    model = server.analyzer.model
    from mama_jax.export import dicom_input

    canvas = model.preprocess(dicom_input.read_image(dicom, model.decode).pixels)
    sim = maps.sentence_patch_maps(model.model, model.tokenizer, canvas, SENTENCE + ".",
                                   model.max_length)[0]
    expect = maps.overlay_rgb(analysis.canvas_gray(canvas).astype(np.float32) / 255.0, sim)
    drawn = cv2.imdecode(np.frombuffer(base64.b64decode(src.split(",", 1)[1]), np.uint8),
                         cv2.IMREAD_COLOR)[..., ::-1]
    assert drawn.shape == (model.image_size, model.image_size, 3)
    assert np.abs(drawn.astype(int) - expect.astype(int)).max() <= 1
    assert os.path.getsize(shot) > 10_000 and open(shot, "rb").read(4) == b"\x89PNG"
    print(f"viewer screenshot: {shot}")
