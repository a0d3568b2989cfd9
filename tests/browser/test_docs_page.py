"""/docs in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium):
the page loads with no network but the server's, lists the routes, and a "Try it out" call of
POST /infer with a JSON body returns MiniLM's embeddings. A screenshot is saved as an artifact
(BINSERVE_TEST_ARTIFACTS, default /tmp/binserve-artifacts/docs-page.png)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.serverproc import ServerProcess, poll

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="chromium / chromium-driver not installed (Debian; .ci/run installs them)"
)
ARTIFACTS = Path(os.environ.get("BINSERVE_TEST_ARTIFACTS", "/tmp/binserve-artifacts"))


@pytest.fixture(scope="module")
def server():
    with ServerProcess(workers=1) as srv:
        yield srv


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2200",
                "--disable-background-networking", "--no-first-run"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_docs_page_lists_the_routes_and_tries_infer(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{server.base_url}/docs")
    find = browser.find_elements
    paths = poll(lambda: [e.get_attribute("data-path") for e in find(By.CSS_SELECTOR, ".opblock-summary-path")],
                 timeout_s=30)  # fmt: skip
    for route in ("/infer", "/v2/models/{model}/infer", "/v1/embeddings", "/v1/chat/completions", "/update_model"):
        assert route in paths, paths
    (summary,) = [
        e for e in find(By.CSS_SELECTOR, ".opblock-post .opblock-summary")
        if e.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path") == "/infer"
    ]  # fmt: skip
    summary.click()
    block = summary.find_element(By.XPATH, "./ancestor::div[contains(@class, 'opblock')][1]")
    poll(lambda: block.find_elements(By.CSS_SELECTOR, "button.try-out__btn"), timeout_s=10)[0].click()
    body = poll(lambda: block.find_elements(By.CSS_SELECTOR, "textarea.body-param__text"), timeout_s=10)[0]
    body.clear()
    body.send_keys(json.dumps({"texts": ["binserve answers from its docs page"]}))
    block.find_element(By.CSS_SELECTOR, "button.execute").click()

    def answered():
        cells = block.find_elements(By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status")
        return cells and cells[0].text.strip()

    status = poll(answered, timeout_s=60)
    reply = block.find_element(By.CSS_SELECTOR, ".live-responses-table .response-col_description pre").text
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "docs-page.png"))
    assert status == "200", reply[:300]
    embeddings = json.loads(reply)["embeddings"]
    assert len(embeddings) == 1 and len(embeddings[0]) == 384
    logs = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert logs and all(u.startswith(server.base_url) for u in logs), logs  # nothing fetched from elsewhere
