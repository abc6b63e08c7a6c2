"""The web view in a real headless Chromium: the graph shows the listeners, a message sent shows up in
the conversation list, and its trace opens. Screenshots go to test-artifacts/."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import ROOT
from tests.daemon_support import cli, free_loopback_port, running_daemon

ARTIFACTS = ROOT / "test-artifacts"
WAIT_SECONDS = 20


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        raise RuntimeError("chromium and chromedriver are not installed; `make test` installs them (Debian packages)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def test_the_web_view_shows_the_graph_a_new_conversation_and_its_trace(browser: webdriver.Chrome) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_loopback_port()
    wait = WebDriverWait(browser, WAIT_SECONDS)
    with running_daemon(ROOT / "organism.yaml", "--tcp", f"127.0.0.1:{port}") as daemon:
        browser.get(f"http://127.0.0.1:{port}/ui")
        wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#graph g.node[data-name='greeter']"))
        shown = {node.get_attribute("data-name") for node in browser.find_elements(By.CSS_SELECTOR, "#graph g.node")}
        assert {"greeter", "shouter", "exclaimer", "cruncher"} <= shown
        browser.save_screenshot(str(ARTIFACTS / "web-view-graph.png"))

        sent = cli("send", "greeter", "<Greeting><name>Ada</name></Greeting>", "--socket", str(daemon.socket_path))
        assert sent.returncode == 0, sent.stderr
        thread = sent.stderr.split()[1].rstrip(":")
        row = f"#conversations tr[data-conversation='{thread}']"
        wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, row))
        wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#graph path.edge[data-edge='greeter->shouter']"))
        browser.find_element(By.CSS_SELECTOR, row).click()
        wait.until(lambda page: len(page.find_elements(By.CSS_SELECTOR, "#trace li.hop")) == 6)
        hops = [
            hop.find_element(By.TAG_NAME, "summary").text
            for hop in browser.find_elements(By.CSS_SELECTOR, "#trace li.hop")
        ]
        routes = [strong.text for strong in browser.find_elements(By.CSS_SELECTOR, "#trace li.hop summary strong")]
        assert routes == [
            "console → greeter",
            "greeter → shouter",
            "shouter → exclaimer",
            "exclaimer → shouter",
            "shouter → greeter",
            "greeter → console",
        ]
        assert all("handled in" in line for line in hops[:-1])
        browser.find_elements(By.CSS_SELECTOR, "#trace li.hop summary")[-1].click()
        assert "HELLO, ADA!" in browser.find_elements(By.CSS_SELECTOR, "#trace pre.xml")[-1].text
        browser.save_screenshot(str(ARTIFACTS / "web-view-trace.png"))
