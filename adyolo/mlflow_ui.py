"""The MLflow UI on a training run's folder: the server command, the run's URL, a browser screenshot.

What `launch/ui.py` and `launch/screenshot_ui.py` run. The UI opens a run in its model-training view
through the URL's `workflowType=machine_learning`: MLflow 3.17's UI otherwise starts in its GenAI view
whatever the experiment's kind tag says.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

from adyolo.tracking import STORE_FILE, default_store_uri, relocate_store

TRAINING_VIEW = "workflowType=machine_learning"


class UIError(ValueError):
    """A run folder without a store, or a browser that is not installed; the message says what to do."""


def prepare(run_dir: str | Path) -> tuple[list[str], str | None]:
    """Check the folder, point its store at the artifacts beside it (a copied or moved folder) and return
    (the `mlflow ui` command without host and port, a note when the store was re-pointed)."""
    store = Path(run_dir) / STORE_FILE
    if not store.is_file():
        raise UIError(f"{store} does not exist; pass the output_dir of a training run")
    note = f"{store}: artifact locations now point into {Path(run_dir).resolve()}" if relocate_store(run_dir) else None
    mlflow = Path(sys.executable).with_name("mlflow")
    return [str(mlflow), "ui", "--backend-store-uri", default_store_uri(run_dir)], note


def newest_run(run_dir: str | Path):
    """The most recently started run in the folder's store (mlflow.entities.Run), or None."""
    client = MlflowClient(tracking_uri=default_store_uri(run_dir))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"])
    return runs[0] if runs else None


def run_url(base: str, run, tab: str = "") -> str:
    """The run's page (or one of its tabs, e.g. "model-metrics") in the model-training view."""
    page = f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return f"{page}{'/' + tab if tab else ''}?{TRAINING_VIEW}"


def screenshot(
    run_dir: str | Path, out: str | Path, search: str, size: tuple[int, int] = (1500, 900), timeout: float = 120
) -> str:
    """Serve the folder's store on a free port, open the newest run's "Model metrics" tab in headless
    Chromium, type `search` into the chart search, wait until the charts are drawn, save a PNG. Returns
    the page's URL. Needs selenium and a Chromium (Debian: chromium + chromium-driver)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        raise UIError("needs selenium (pip install selenium) and chromium + chromium-driver") from None
    command, _ = prepare(run_dir)
    run = newest_run(run_dir)
    if run is None:
        raise UIError(f"{Path(run_dir) / STORE_FILE} holds no run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={size[0]},{size[1]}"):
        options.add_argument(flag)
    # Debian's chromium and its driver where installed; else Selenium finds (or fetches) a browser.
    if shutil.which("chromium"):
        options.binary_location = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    browser = None
    try:
        _wait_for(f"{base}/health", timeout)
        browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver) if driver else None)
        url = run_url(base, run, "model-metrics")
        browser.get(url)
        wait = WebDriverWait(browser, timeout)
        box = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "input[placeholder^='Search metric']"))[0]
        for close in browser.find_elements(By.CSS_SELECTOR, "[aria-label='Close']"):  # the assistant panel
            if close.is_displayed():
                close.click()
        box.send_keys(search)
        # Drawn: the charts have their plots and no loading spinner is left.
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .main-svg"))
        wait.until(lambda b: not b.find_elements(By.CSS_SELECTOR, "[class*='spin'], [aria-busy='true']"))
        time.sleep(2)  # the last chart's transition
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(out))
        return url
    finally:
        if browser is not None:
            browser.quit()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _wait_for(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.time() > deadline:
                raise UIError(f"{url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.5)
