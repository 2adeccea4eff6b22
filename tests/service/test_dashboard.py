"""The dashboard in a real browser: headless Chromium (through Selenium) over a running server.

One server runs one finished job and one failed job; the browser enters the token, submits a
job the schema rejects (and sees why) and a valid one through the "New job" form (and follows
it to its end in the list), opens the finished job, hovers and clicks front points, checks the
heatmap against the API's point detail, compares two points, downloads the JSON configuration
and saves a screenshot. The screenshot goes to the test's tmp dir, and also to
``$BITALLOC_SCREENSHOT_DIR/dashboard.png`` when that is set
(``BITALLOC_SCREENSHOT_DIR=bench/results`` refreshes the README's picture).

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and ``selenium``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from service_helpers import FORMATS, bearer, job_body, uvicorn_server

from bitalloc.service.app import create_app
from bitalloc.service.schemas import JobCreate
from bitalloc.service.settings import Settings
from bitalloc.service.worker import LocalWorkers

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
]


@pytest.fixture
def server(tmp_path):
    """A real server with two queued jobs: one that succeeds (K/V caches included, so the heatmap has cache
    columns; a surrogate round, so its point shows predicted against measured) and one that fails. No worker runs them until the test calls ``start_workers``, so the
    browser sees them queued first and must follow them to their end by polling."""
    settings = Settings(data_dir=tmp_path / "data", worker_threads=0, heartbeat_seconds=0.3, lease_seconds=30,
                        reaper_seconds=3600)
    app = create_app(settings)
    ctx = app.state.ctx
    workers = LocalWorkers(ctx, 1)
    started = threading.Event()

    def start_workers() -> None:
        workers.start()
        started.set()

    with uvicorn_server(app) as base_url:
        headers = bearer(ctx, "browser")
        with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
            ids = {"good": client.post("/v1/jobs", json=job_body(kv_cache={"context": 64}, surrogate=1)).json()["id"],
                   "bad": client.post("/v1/jobs", json=job_body(model="factory:no-such-model")).json()["id"]}
            try:
                yield base_url, headers["Authorization"].removeprefix("Bearer "), client, ids, start_workers
            finally:
                if started.is_set():
                    workers.stop()


@pytest.fixture
def browser(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver, downloads
    finally:
        driver.quit()


def wait_for(driver, css: str, timeout: float = 15.0):
    return WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.CSS_SELECTOR, css))


def downloaded(folder: Path, timeout: float = 15.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = [p for p in folder.iterdir() if not p.name.endswith(".crdownload")]
        if files:
            return files[0]
        time.sleep(0.1)
    raise AssertionError(f"nothing was downloaded to {folder}")


def heatmap_cells(driver) -> dict[str, str]:
    """Unit -> format of the first heatmap on the page."""
    figure = driver.find_element(By.CSS_SELECTOR, "#allocation-view figure.heatmap")
    return {td.get_attribute("data-unit"): td.get_attribute("data-format")
            for td in figure.find_elements(By.CSS_SELECTOR, "td.cell")}


def sign_in(driver, base_url: str, secret: str) -> None:
    driver.get(base_url + "/")
    field = wait_for(driver, "#token-input")
    field.send_keys(secret, Keys.ENTER)


def select_point(driver, point: dict) -> None:
    """Hover a front point (its figures show in the tooltip), then click it."""
    dot = wait_for(driver, f'circle.pt[data-point-id="{point["id"]}"]')
    ActionChains(driver).move_to_element(dot).perform()
    tooltip = wait_for(driver, ".tooltip:not([hidden])")
    assert f"point {point['id']}" in tooltip.text and "predicted error" in tooltip.text
    dot.click()
    wait_for(driver, f'#allocation-view[data-point-id="{point["id"]}"]')


def save_screenshot(driver, tmp_path: Path) -> Path:
    """The whole page (the window grows to its height), to tmp and to $BITALLOC_SCREENSHOT_DIR when set."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(max(height + 40, 1000), 4000))
    driver.execute_script("window.scrollTo(0, 0)")
    path = tmp_path / "dashboard.png"
    assert driver.save_screenshot(str(path))
    target = os.environ.get("BITALLOC_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / "dashboard.png")
    return path


def row(state: str, job_id: str) -> str:
    return f'tr[data-job-id="{job_id}"][data-state="{state}"]'


def test_the_dashboard_in_a_browser(server, browser, tmp_path):
    base_url, secret, client, ids, start_workers = server
    driver, downloads = browser

    sign_in(driver, base_url, secret)
    for job_id in ids.values():
        wait_for(driver, row("queued", job_id) + " [role=progressbar]")
    check_rejected_job(driver, client)
    submitted = check_submitted_job(driver, client, set(ids.values()))
    start_workers()
    wait_for(driver, row("failed", ids["bad"]), timeout=60)
    wait_for(driver, row("succeeded", submitted) + ".selected", timeout=90)
    wait_for(driver, row("succeeded", ids["good"]) + " a.job-link", timeout=90).click()

    job_id = ids["good"]
    jobs = {name: client.get(f"/v1/jobs/{i}").json() for name, i in ids.items()}
    front = client.get(f"/v1/jobs/{job_id}/front").json()
    points = front["points"]
    first, other = points[0], points[len(points) // 2]
    detail = client.get(f"/v1/jobs/{job_id}/points/{first['id']}").json()
    compared = client.get(f"/v1/jobs/{job_id}/points/{other['id']}").json()

    wait_for(driver, "circle.pt")
    assert len(driver.find_elements(By.CSS_SELECTOR, "circle.pt")) == len(points)
    # the chosen point opens first: the surrogate's rounds, predicted against measured
    rounds = client.get(f"/v1/jobs/{job_id}/allocation").json()["info"]["rounds"]
    assert "allocations measured" in wait_for(driver, ".point-panel section.surrogate").text
    cells = driver.find_elements(By.CSS_SELECTOR, ".point-panel table.rounds tbody tr")
    assert len(cells) == len(rounds) >= 1
    baselines = client.get(f"/v1/jobs/{job_id}/baselines").json()["points"]
    assert len(driver.find_elements(By.CSS_SELECTOR, "svg.front-chart path.baseline")) == len(baselines) > 0
    labels = driver.execute_script(
        "return [...document.querySelectorAll('svg.front-chart text.baseline-label')].map((t) => {"
        " const b = t.getBBox(); return {text: t.textContent, x: b.x, y: b.y, w: b.width, h: b.height}; });")
    named = [name for label in labels for name in label["text"].split(" = ")]
    assert sorted(named) == sorted(b["name"].removeprefix("uniform ") for b in baselines)  # each named once
    for i, a in enumerate(labels):  # and no two labels overprint
        for b in labels[i + 1:]:
            assert not (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and
                        a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]), (a, b)

    select_point(driver, first)
    assert heatmap_cells(driver) == detail["formats"]
    headers = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "#allocation-view thead th")]
    assert {"q_proj", "down_proj", "K cache", "V cache"} <= set(headers)

    ActionChains(driver).key_down(Keys.SHIFT).click(wait_for(driver, f'tr[data-point-id="{other["id"]}"]')) \
        .key_up(Keys.SHIFT).perform()
    wait_for(driver, f'#allocation-view[data-compare-id="{other["id"]}"]')
    differing = sum(detail["formats"][u] != compared["formats"][u] for u in detail["formats"])
    assert wait_for(driver, ".comparison h3").text.startswith(f"{differing} of {len(detail['formats'])} units differ")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#allocation-view figure.heatmap")) == 2

    wait_for(driver, 'button[data-export="json"]').click()
    config = json.loads(downloaded(downloads).read_text())
    assert config["formats"] == detail["formats"]
    check_another_export(driver, client, downloads)
    check_artifact_build(driver, client, downloads)

    screenshot = save_screenshot(driver, tmp_path)
    assert screenshot.stat().st_size > 10_000
    assert_no_page_errors(driver)

    driver.get(f"{base_url}/dashboard#/jobs/{jobs['bad']['id']}")
    assert jobs["bad"]["error"] in wait_for(driver, "main .job-failed").text

    driver.execute_script("localStorage.setItem('bitalloc.token', 'bat_not-a-token')")
    driver.get(f"{base_url}/dashboard")
    assert "rejected" in wait_for(driver, "#token-form .error").text


# The form's fields (by id, without "job-") for the service tests' tiny job; "Advanced" carries the rest.
FORM = {"model": "factory:tiny-llama", "formats": ", ".join(FORMATS), "budgets-avg-bits": "5", "budgets-bytes": "1024",
        "metric": "output_mse", "solver": "dp", "method": "rtn", "baseline": ""}
ADVANCED = {"points": 6, "calibration": {"seq_len": 32, "samples": 4}, "evaluation": {"windows": 2}}


def fill_job_form(driver, fields: dict[str, str], advanced: dict) -> None:
    """Open "New job" if it is closed, fill it in and submit it."""
    if wait_for(driver, "#new-job").get_attribute("open") is None:
        driver.find_element(By.CSS_SELECTOR, "#new-job summary").click()
    for name, value in fields.items():
        element = wait_for(driver, f"#job-{name}")
        if element.tag_name == "select":
            Select(element).select_by_value(value)
        else:
            element.clear()
            element.send_keys(value)
    textarea = driver.find_element(By.ID, "job-advanced")
    textarea.clear()
    textarea.send_keys(json.dumps(advanced))
    driver.find_element(By.CSS_SELECTOR, "#job-form button[type=submit]").click()


def check_rejected_job(driver, client: httpx.Client) -> None:
    """A budget the schema rejects: the server's 422 is shown by the form (field and reason), and no job is made."""
    before = client.get("/v1/jobs").json()["total"]
    fill_job_form(driver, {**FORM, "budgets-avg-bits": "40"}, ADVANCED)
    errors = wait_for(driver, "#job-errors:not([hidden])")
    assert errors.text == "budgets.avg_bits: Input should be less than or equal to 32"
    assert driver.find_element(By.ID, "job-budgets-avg-bits").get_attribute("aria-invalid") == "true"
    assert driver.find_element(By.ID, "job-model").get_attribute("aria-invalid") is None
    for control in driver.find_elements(By.CSS_SELECTOR, "#job-form input, #job-form select, #job-form textarea"):
        assert driver.find_elements(By.CSS_SELECTOR, f'#job-form label[for="{control.get_attribute("id")}"]')
    assert client.get("/v1/jobs").json()["total"] == before


def check_submitted_job(driver, client: httpx.Client, existing: set[str]) -> str:
    """A valid job: stored as the same request over REST would be, then listed and selected; returns its id."""
    fill_job_form(driver, FORM, ADVANCED)
    job_id = wait_for(driver, "#jobs tr.selected").get_attribute("data-job-id")
    assert job_id not in existing
    assert not driver.find_element(By.ID, "job-errors").is_displayed()
    assert job_id[:8] in driver.find_element(By.CSS_SELECTOR, "#job-form .status").text
    expected = JobCreate.model_validate(job_body(budgets={"avg_bits": 5.0, "bytes": 1024 * 2**20}))
    assert client.get(f"/v1/jobs/{job_id}").json()["spec"] == expected.model_dump(mode="json")
    return job_id


def check_another_export(driver, client: httpx.Client, downloads: Path) -> None:
    """When the server lists runtime exports, one more downloads (or says why it cannot express the point)."""
    listed = client.get("/v1/exports")
    if listed.status_code != 200:
        return
    name = next((e["name"] for e in listed.json() if e["name"] != "json"), None)
    if name is None:
        return
    before = set(downloads.iterdir())
    driver.find_element(By.CSS_SELECTOR, f'button[data-export="{name}"]').click()
    status = driver.find_element(By.CSS_SELECTOR, ".downloads .status")
    WebDriverWait(driver, 15).until(lambda d: status.text.startswith(("saved", f"{name}:")))
    if status.text.startswith("saved"):
        new_file(downloads, before)


def new_file(folder: Path, before: set[Path], timeout: float = 30.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = [p for p in folder.iterdir() if p not in before and not p.name.endswith(".crdownload")]
        if files:
            return files[0]
        time.sleep(0.1)
    raise AssertionError(f"no new file was downloaded to {folder}")


def check_artifact_build(driver, client: httpx.Client, downloads: Path) -> None:
    """When the server builds artifacts, the button builds one; its download matches the sha256 shown."""
    if "/v1/jobs/{job_id}/points/{point_id}/artifact" not in client.get("/v1/openapi.json").json()["paths"]:
        return
    driver.find_element(By.ID, "build-artifact").click()
    sha256 = wait_for(driver, ".artifact code.sha", timeout=60).text
    before = set(downloads.iterdir())
    driver.find_element(By.CSS_SELECTOR, "button[data-artifact]").click()
    assert hashlib.sha256(new_file(downloads, before).read_bytes()).hexdigest() == sha256


def assert_no_page_errors(driver) -> None:
    """No script errors and nothing the Content-Security-Policy blocked (a CDN or inline code would be)."""
    problems = [entry["message"] for entry in driver.get_log("browser")
                if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]]
    assert not problems, problems
