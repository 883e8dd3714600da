"""The Streamlit app: upload logic, analysis, and an end-to-end run in headless Chromium."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from labelling.app import logic
from labelling.data.simulate import simulate_field
from labelling.runs.train import fit

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ):
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("runs")
    fit("nuclei_pearson", TINY + ["trainer.max_epochs=2", "data.field_size=96", "data.n_wells=16", "data.fields_per_well=3",
                                 "callbacks=[]", "test=false"],
        run_dir=root / "nuclei_pearson")
    return root


def test_read_upload_rejects_bad_files(tmp_path):
    with pytest.raises(logic.UploadError, match="only TIFF or PNG"):
        logic.read_upload("x.jpg", b"123")
    with pytest.raises(logic.UploadError, match="cannot read"):
        logic.read_upload("x.tif", b"garbage")
    big = b"\0" * (logic.MAX_UPLOAD_BYTES + 1)
    with pytest.raises(logic.UploadError, match="MB limit"):
        logic.read_upload("x.tif", big)
    tifffile.imwrite(tmp_path / "small.tif", np.random.rand(8, 8).astype(np.float32))
    with pytest.raises(logic.UploadError, match="sides must be"):
        logic.read_upload("small.tif", (tmp_path / "small.tif").read_bytes())
    tifffile.imwrite(tmp_path / "ok.tif", np.random.rand(64, 80).astype(np.float32))
    assert logic.read_upload("ok.tif", (tmp_path / "ok.tif").read_bytes()).shape == (64, 80)


def test_analyse_flags_drift_on_a_foreign_image(trained):
    from labelling.inference.load import load_task

    run = logic.find_runs(trained)[0]
    task, cfg = load_task(run)
    bf = simulate_field([0, 99, 1], size=96).brightfield
    same = logic.analyse(task, cfg, run, bf)
    assert same["prediction"].shape == (1, 96, 96) and same["metrics"]["count"] >= 0
    assert (run / "drift_reference.npz").exists()
    checker = np.indices((96, 96)).sum(0) % 2 * 4000.0 + 1000  # nothing like cells
    other = logic.analyse(task, cfg, run, checker.astype(np.float32))
    assert other["drift"]["checked"] and other["drift"]["drift"]
    assert other["state"] == logic.OUT_OF_DISTRIBUTION  # the page then withholds its counts
    assert same["state"] in (logic.IN_DISTRIBUTION, logic.OUT_OF_DISTRIBUTION)
    # the warning's promise, checked: clean new fields of the same kind raise it about alpha of the time
    fresh = [simulate_field([5, 100 + i, 0], size=96, phenotype=i % 2).brightfield for i in range(40)]
    verdicts = [logic.analyse(task, cfg, run, f)["drift"] for f in fresh]
    alpha = max(logic.ALPHA, 1 / (1 + verdicts[0]["n_reference_fields"]))
    assert sum(v["drift"] for v in verdicts) / 40 <= 2.5 * alpha
    # the app shows exactly what `predict` writes: the one prediction path
    from labelling.inference import predict

    assert np.array_equal(same["prediction"], predict.predict(task, bf))
    # and the download is that prediction, as an OME-TIFF with the channel names
    data = logic.to_ome_tiff_bytes(same["prediction"], ["nuclei"])
    import io

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        assert np.array_equal(tif.asarray().reshape(same["prediction"].shape), same["prediction"])
        assert "nuclei" in tif.ome_metadata


@pytest.mark.realdata
def test_a_modality_swap_is_out_of_distribution_and_its_counts_withheld(trained):
    """An imaging flow cytometry montage given to a model of simulated cells (issue 26: flagged only at p = 0.04,
    with 1911 'objects' shown as valid)."""
    from labelling.inference.load import load_task

    montage = ROOT.parent / "shared" / "data" / "mlcp_ifc_bf_dna"
    files = sorted(montage.rglob("Ch3_*.tif"))
    if not files:
        pytest.skip(f"real data {montage} is absent")
    run = logic.find_runs(trained)[0]
    task, cfg = load_task(run)
    image = tifffile.imread(files[0]).astype(np.float32)[:400, :400]
    result = logic.analyse(task, cfg, run, image)
    drift = result["drift"]
    # the smallest p-value this many clean reference fields can give is the app's effective alpha
    alpha = max(logic.ALPHA, 1 / (1 + drift["n_reference_fields"]))
    assert drift["checked"] and drift["drift"] and drift["p_value"] <= alpha
    assert result["state"] == logic.OUT_OF_DISTRIBUTION


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("chromium-browser"))),
                    reason="needs Debian chromium + chromium-driver (.ci/run installs them)")
def test_app_end_to_end_in_headless_chromium(trained, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    env = {**os.environ, "LABELLING_RUNS": str(trained), "WANDB_MODE": "offline"}
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "labelling/app/main.py"),
                               "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1",
                               "--browser.gatherUsageStats", "false"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1400,1000"):
        opts.add_argument(flag)
    driver = None
    try:
        import urllib.request

        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
        driver.get(f"http://127.0.0.1:{port}")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "Waiting for an image" in d.find_element(By.TAG_NAME, "body").text)
        img = tmp_path / "bf.tif"
        tifffile.imwrite(img, simulate_field([0, 5, 0], size=128).brightfield)
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(img))
        # the metrics, or - when the drift check flags the image - the out-of-distribution notice instead
        wait.until(lambda d: any(s in d.find_element(By.TAG_NAME, "body").text
                                 for s in ("objects found", "Out of distribution")))
        time.sleep(1)  # let the images finish painting before the screenshot
        body = driver.find_element(By.TAG_NAME, "body").text
        assert ("objects found" in body or "Out of distribution" in body) and ("drift" in body.lower())
        assert "Download the prediction" in body
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "app.png"))
        assert (ARTIFACTS / "app.png").stat().st_size > 10_000
        bad = tmp_path / "broken.tif"
        bad.write_bytes(b"not an image")
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(bad))
        wait.until(lambda d: "Rejected" in d.find_element(By.TAG_NAME, "body").text)
        driver.save_screenshot(str(ARTIFACTS / "app_rejected.png"))
    finally:
        if driver:
            driver.quit()
        server.terminate()
        server.wait(10)
