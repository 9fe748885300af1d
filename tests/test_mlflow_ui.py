"""Comparing trials in the MLflow UI, checked in a real browser: `mlflow server` on loopback over the store of a
finished search, Debian's chromium driven headless by Selenium through Debian's chromedriver (nothing downloaded).

It follows what the README tells a person to do: open the runs URL the summary prints, expand the search's parent
run, add the objective column (Columns -> val_f1). It checks that the parent run, each trial's child run and each
trial's objective value are on screen, and saves a screenshot (its path is printed in the test output)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from search.progress import runs_url

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")


def need_browser() -> None:
    try:
        import selenium  # noqa: F401
        have_selenium = True
    except ImportError:
        have_selenium = False
    missing = [n for n, ok in [("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER), ("selenium", have_selenium)]
               if not ok]
    if missing:
        msg = (f"{', '.join(missing)} not installed: apt-get install chromium chromium-driver; "
               f"pip install -e '.[test]' (.ci/run does both)")
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI installs them: a missing browser there is a broken CI, not a skip
        pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(small_search, tmp_path):
    """`mlflow server` on 127.0.0.1 over the finished search's sqlite store; yields its base URL."""
    need_browser()
    work, _ = small_search
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job workers: not needed here
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}"],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                if urllib.request.urlopen(base + "/health", timeout=2).read().strip() == b"OK":
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-3000:]
            assert time.time() < deadline, "mlflow server did not answer /health in 240 s"
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


@pytest.fixture
def browser():
    need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1000", "--lang=en-US"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def test_parent_run_child_trials_and_objective_column_visible_in_the_mlflow_ui(
        small_search, mlflow_server, browser, tmp_path_factory, capsys):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    work, _ = small_search
    summary = json.loads((work / "runs" / "e2e" / "summary.json").read_text())
    metric = summary["objective"]["metric"]
    shot = tmp_path_factory.getbasetemp() / "mlflow-ui" / "mlflow-ui-runs.png"
    shot.parent.mkdir(exist_ok=True)
    d, wait = browser, WebDriverWait(browser, 90)

    def name_cell(run_name: str):
        return (By.XPATH, f"//div[@role='gridcell' and contains(@col-id, 'Run Name')][.//a[normalize-space(.)="
                          f"'{run_name}']]")

    try:
        # the URL the summary prints: the experiment's runs table, model-training view, this search's runs
        d.get(runs_url(mlflow_server, summary["mlflow"]["experiment_id"], "e2e"))
        parent = wait.until(EC.visibility_of_element_located(name_cell("e2e")))
        for close in d.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):  # the assistant side panel
            if close.is_displayed():
                close.click()
        # expand the parent run: its child runs, one per trial
        parent.find_element(By.TAG_NAME, "button").click()
        children = {t["trial_id"]: wait.until(EC.visibility_of_element_located(name_cell(f"trial-{t['trial_id']}")))
                    for t in summary["trials"]}
        # add the objective column: Columns -> search -> tick the metric
        wait.until(EC.element_to_be_clickable(
            (By.XPATH, "//button[@data-testid='column-selection-dropdown'][normalize-space(.)='Columns']"))).click()
        box = wait.until(EC.visibility_of_element_located(
            (By.XPATH, "//div[@role='dialog']//input[@placeholder='Search columns']")))
        box.send_keys(metric)
        wait.until(EC.element_to_be_clickable(
            (By.XPATH, f"//div[@role='dialog']//div[contains(@class, 'tree-treenode')][.//span[contains(@class, "
                       f"'tree-title')][normalize-space(.)='{metric}']]//span[contains(@class, 'tree-checkbox')]"))
        ).click()
        box.send_keys(Keys.ESCAPE)
        wait.until(EC.visibility_of_element_located(
            (By.XPATH, f"//div[@role='columnheader'][normalize-space(.)='{metric}']")))
        # each trial's row shows its objective: the latest value logged (the summary ranks by the best one)
        from mlflow.tracking import MlflowClient

        store = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
        latest = {r.data.tags.get("qlora.trial_id"): r.data.metrics.get(metric)
                  for r in store.search_runs([summary["mlflow"]["experiment_id"]])}
        for t in summary["trials"]:
            row = children[t["trial_id"]].find_element(By.XPATH, "./ancestor::div[@role='row']")
            index = row.get_attribute("row-index")
            cell = wait.until(EC.visibility_of_element_located(
                (By.XPATH, f"//div[@role='row'][@row-index='{index}']//div[@role='gridcell']"
                           f"[@col-id='metrics.`{metric}`']")))
            assert abs(float(cell.text) - latest[t["trial_id"]]) < 1e-3, (t, cell.text)
            assert t["value"] >= latest[t["trial_id"]] - 1e-9  # the summary's value is the trial's best
        assert d.find_element(*name_cell("e2e")).is_displayed()
    except (TimeoutException, AssertionError):
        d.save_screenshot(str(shot))
        raise AssertionError(f"MLflow UI check failed; screenshot: {shot}; page text: "
                             f"{d.find_element(By.TAG_NAME, 'body').text[:1500]!r}") from None
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    with capsys.disabled():  # into the test output, also when it passes
        print(f"\nMLflow UI screenshot: {shot}")
    copy_to = os.environ.get("QLORA_TEST_ARTIFACTS")
    if copy_to:
        Path(copy_to).mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, Path(copy_to) / shot.name)
