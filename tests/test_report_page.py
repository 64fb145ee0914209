"""index.html in a real browser (headless Chromium through selenium and chromedriver): every figure
loads and no script runs, even when responses and prompts carry script payloads. A control page
with the same payloads, unescaped and without the CSP, proves the marker would be set if one ran.

Skipped, with the reason, where Debian's chromium and chromium-driver (.ci/run installs them) or
selenium (the dev extra) are absent."""
from __future__ import annotations

import json
import shutil

import pytest

from alignbench.report.build import build_report
from tests.test_report_views import make_sweep

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
chrome_service = pytest.importorskip("selenium.webdriver.chrome.service")

# Each payload would mark <html data-pwned> if the browser ran it.
PAYLOADS = ["<script>document.documentElement.dataset.pwned='script'</script>",
            "<img src=x onerror=\"document.documentElement.dataset.pwned='img'\">",
            "<svg onload=\"document.documentElement.dataset.pwned='svg'\"></svg>"]
PWNED = "return document.documentElement.dataset.pwned || null"
IMAGES = "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])"


def _binary(*names: str) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


@pytest.fixture(scope="module")
def browser():
    chromium, driver = _binary("chromium", "chromium-browser"), _binary("chromedriver")
    if not (chromium and driver):
        pytest.skip("headless Chromium not found: install Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; .ci/run does it as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    with webdriver.Chrome(options=options, service=chrome_service.Service(executable_path=driver)) as b:
        yield b


def _inject(sweep, payload: str) -> None:
    """Every run's responses and prompts carry the payloads."""
    for path in sweep.glob("runs/*/samples.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows = [{**r, "response": f"{payload} {r['response']}", "prompt": f"{payload} {r['prompt']}"} for r in rows]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_control_page_runs_the_payloads(browser, tmp_path):
    """Without escaping and CSP the same payloads do set the marker: the check below can fail."""
    page = tmp_path / "control.html"
    page.write_text(f"<!DOCTYPE html><html><body>{PAYLOADS[0]}</body></html>")
    browser.get(page.as_uri())
    assert browser.execute_script(PWNED) == "script"


def test_report_page_loads_every_image_and_runs_no_script(browser, tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    _inject(sweep, " ".join(PAYLOADS))
    out = tmp_path / "out"
    build_report(sweep, out, n_boot=100)
    browser.get((out / "index.html").as_uri())
    images = browser.execute_script(IMAGES)
    assert len(images) == len(list(out.glob("*.png"))) >= 4  # the page shows every figure written
    assert all(complete and width > 0 for complete, width, _ in images), images
    assert browser.execute_script(PWNED) is None
    assert "<script>document" in browser.find_element("tag name", "body").text  # shown as text, inert
    anchors = browser.execute_script("return Array.from(document.querySelectorAll('nav a')).map(a => a.hash)")
    assert anchors and all(browser.execute_script(f"return document.getElementById('{a[1:]}') !== null")
                           for a in anchors)


# [page width, viewport width, tables outside a box, boxes that scroll sideways]
WIDTHS = ("return [document.documentElement.scrollWidth, window.innerWidth, "
          "Array.from(document.querySelectorAll('table'))"
          ".filter(t => !t.parentElement.classList.contains('wide')).length, "
          "Array.from(document.querySelectorAll('div.wide')).filter(d => d.scrollWidth > d.clientWidth + 1).length]")


def test_wide_tables_scroll_in_their_own_box_and_never_widen_the_page(browser, tmp_path):
    """At 640 px the configuration table (13 columns) and a response with a 400-character word are far wider
    than the window: their boxes scroll, the page does not. With the boxes' class removed the same page
    overflows, so the check can fail."""
    sweep = make_sweep(tmp_path / "sweep")
    _inject(sweep, "wide_" + "x" * 400)  # one unbreakable word in every response and prompt
    out = tmp_path / "out"
    build_report(sweep, out, n_boot=50)
    size = browser.get_window_size()
    try:
        browser.set_window_size(640, 900)
        browser.get((out / "index.html").as_uri())
        page_width, viewport, unboxed, scrolling = browser.execute_script(WIDTHS)
        assert unboxed == 0 and scrolling >= 2, (unboxed, scrolling)
        assert page_width <= viewport, (page_width, viewport)
        browser.execute_script("document.querySelectorAll('div.wide').forEach(d => d.className = '')")
        assert browser.execute_script(WIDTHS)[0] > viewport  # control: without the boxes the page widens
    finally:
        browser.set_window_size(size["width"], size["height"])
