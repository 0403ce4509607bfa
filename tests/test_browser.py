"""The report's page opened in a real browser: headless Chromium, driven by Selenium
through its chromedriver, loads every image, logs no error and uses the width of its
window.

Needs Debian's ``chromium-driver`` (it brings ``chromium``; .ci/run installs it with
apt-get) and the ``selenium`` package (the ``dev`` extra); skipped, with the reason,
where either is missing. ``VGRAD_CHROMIUM`` names another Chromium binary (for example
``chromium-headless-shell``) to drive instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
from conftest import TINY, cli_main

#: Where Debian puts the browser (/usr/bin/chromium is a shell wrapper around it).
BROWSERS = ("/usr/lib/chromium/chromium", "chromium", "chromium-headless-shell")

#: A desktop window: the page should fill most of it, and never scroll sideways.
WIDE = (1920, 1080)
#: A narrow window (half a laptop screen): still no sideways scrolling of the page.
NARROW = (900, 1000)


def _browser() -> tuple[str | None, str | None, str]:
    """(chromedriver, browser binary, why not) for this machine."""
    if importlib.util.find_spec("selenium") is None:
        return None, None, "selenium is not installed (pip install -e '.[dev]')"
    driver = shutil.which("chromedriver")
    if driver is None:
        return None, None, "chromedriver is not installed (apt-get install chromium-driver)"
    candidates = [os.environ["VGRAD_CHROMIUM"]] if os.environ.get("VGRAD_CHROMIUM") \
        else BROWSERS
    binary = next((found for name in candidates if (found := shutil.which(name))), None)
    if binary is None:
        return None, None, (f"no Chromium binary ({', '.join(candidates)}; apt-get install "
                            "chromium-driver brings chromium)")
    return driver, binary, ""


DRIVER, BINARY, WHY_NOT = _browser()
pytestmark = pytest.mark.skipif(DRIVER is None, reason=f"no headless browser: {WHY_NOT}")


def report(tmp_path: Path) -> Path:
    """The report of a tiny two-run sweep (all probes: every figure the page can hold)."""
    from vgrad.analysis import write_report

    assert cli_main("-m", "act=tanh,relu", *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}") == 0
    return write_report(tmp_path / "sweep", jobs=1)


def open_browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BINARY
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    return driver


def load(browser, page: Path, size: tuple[int, int]) -> list[dict]:
    """Open the page in a window of ``size`` with every image loaded (lazy ones scrolled
    into view); the browser's log entries while it loaded."""
    browser.get_log("browser")  # (what an earlier page logged)
    browser.set_window_size(*size)
    browser.get(page.as_uri())
    browser.execute_script("for (const img of document.images) img.scrollIntoView();"
                           "window.scrollTo(0, 0);")
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all([...document.images].map(img => img.complete ? null : new Promise(r => {"
        "  img.addEventListener('load', r); img.addEventListener('error', r); })))"
        ".then(() => done());")
    return browser.get_log("browser")


def image_problems(browser, page: Path) -> list[str]:
    images = browser.execute_script(
        "return [...document.images].map(img => ({src: img.getAttribute('src'), "
        "complete: img.complete, width: img.naturalWidth, shown: img.clientWidth}))")
    pngs = sorted((page.parent / "figures").glob("*.png"))
    problems = []
    if not pngs or len(images) < len(pngs):
        problems.append(f"{len(images)} images on the page, {len(pngs)} PNG files drawn")
    problems += [f"image did not load: {img['src']}" for img in images
                 if not (img["complete"] and img["width"] > 0)]
    problems += [f"image not shown: {img['src']}" for img in images
                 if img["complete"] and img["width"] > 0 and img["shown"] == 0]
    return problems


def width_problems(browser, size: tuple[int, int]) -> list[str]:
    width, scroll, left, right = browser.execute_script(
        "const root = document.documentElement;"
        "let left = Infinity, right = -Infinity;"
        "for (const el of document.body.querySelectorAll('*')) {"
        "  const r = el.getBoundingClientRect();"
        "  if (r.width > 0 && r.height > 0) {"
        "    left = Math.min(left, r.left); right = Math.max(right, r.right); } }"
        "return [root.clientWidth, root.scrollWidth, left, right];")
    problems = []
    if scroll > width + 1:
        problems.append(f"{size[0]} px window: the page scrolls sideways ({scroll} px wide)")
    if (right - left) < 0.75 * width:
        problems.append(f"{size[0]} px window: the content spans {right - left:.0f} px "
                        f"({left:.0f} to {right:.0f}), under 3/4 of the {width} px it has")
    return problems


def test_the_report_in_a_browser_loads_every_image_logs_no_error_and_uses_its_width(
        tmp_path):
    page = report(tmp_path)
    browser = open_browser()
    try:
        problems = []
        for size in (WIDE, NARROW):
            logged = load(browser, page, size)
            problems += [f"{size[0]} px window: console: {entry['message']}"
                         for entry in logged if entry["level"] == "SEVERE"]
            problems += image_problems(browser, page) + width_problems(browser, size)
    finally:
        browser.quit()
    assert not problems, "\n".join(dict.fromkeys(problems))
