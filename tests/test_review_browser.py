"""The review page in a real browser (the system's headless Chromium through Selenium): keys move
files, new images appear without a reload, the queue shows why an image failed. The same run
takes the screenshots README shows (written to docs/ when SDXLD_SCREENSHOTS=docs)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("SDXLD_REQUIRE_BROWSER"):  # CI installs them: there, missing is a failure
        raise RuntimeError("chromium and chromedriver are required here (SDXLD_REQUIRE_BROWSER is set)")
    pytest.skip("no chromium + chromedriver on this machine (Debian: apt install chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A demo root with what a night leaves: stage-1 images of the demo model, one final, a failed image."""
    from support.helpers import demo_config

    from sdxld.engine import Engine
    from sdxld.init import init_root

    root = init_root(tmp_path_factory.mktemp("review") / "root", demo=True).root
    engine = Engine.load(demo_config(root, generation__base_width=128, generation__base_height=128,
                                     generation__t2i__steps=4))
    made = [engine.stage1_once(seed=seed) for seed in range(8)]
    for index, result in enumerate(made):  # distinct times, oldest first
        os.utime(result.path, (1_700_000_000 + index, 1_700_000_000 + index))
    upscaled = made[0]
    engine.upscale(upscaled.record, Image.open(upscaled.path))
    inbox = root / "inbox"
    (inbox / "done").mkdir(parents=True, exist_ok=True)
    os.rename(upscaled.path, inbox / "done" / upscaled.path.name)
    (inbox / "failed").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (96, 96), "gray").save(inbox / "failed" / "holiday.jpg")
    (inbox / "failed" / "holiday.jpg.error.txt").write_text(
        "holiday.jpg: no sdxld record, A1111 parameters or caption\n\nWhat to do: put holiday.txt with its prompt beside it\n")
    return root


@pytest.fixture(scope="module")
def page_url(root):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "sdxld.cli", "review", "--root", str(root), "--listen", f"127.0.0.1:{port}"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = process.stdout.readline().split(": ", 1)[1].strip()
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(page_url):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.get(page_url)
    yield driver
    driver.quit()


def wait(driver, condition, timeout=10, what="the page"):
    # The page redraws what changed on every poll: a handle found a moment ago may be gone.
    return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: condition(), message=f"timed out waiting for {what}")


def text_of(driver, selector: str) -> str:
    """The text of the element matching `selector` now, in one script call (no handle to go stale)."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", selector)


def tiles(driver) -> list[str]:
    # One script call: the grid is redrawn every time a pile changes, so element handles go stale.
    return driver.execute_script("return [...document.querySelectorAll('#grid .tile')].map(t => t.dataset.name)")


def press(driver, key: str) -> None:
    driver.find_element(By.TAG_NAME, "body").send_keys(key)


def screenshot(driver, name: str, tmp_path: Path) -> None:
    wait(driver, lambda: driver.execute_script(
        "return [...document.images].filter(i => i.offsetParent && i.src).every(i => i.complete && i.naturalWidth > 0)"),
        what="every visible image loaded")
    target = REPO / "docs" if os.environ.get("SDXLD_SCREENSHOTS") == "docs" else tmp_path
    driver.save_screenshot(str(target / f"review-{name}.png"))
    assert (target / f"review-{name}.png").stat().st_size > 10_000  # a rendered page, not a blank one


def show(driver, view: str) -> None:
    """Switch to a tab, from the grid: a single image left open (a test that failed midway) is closed
    first, so one failure does not become every later test's."""
    if driver.find_element(By.ID, "single").is_displayed():
        press(driver, "\ue00c")  # Escape
        wait(driver, lambda: not driver.find_element(By.ID, "single").is_displayed(), what="the single view to close")
    driver.find_element(By.CSS_SELECTOR, f'.tab[data-view="{view}"]').click()


def test_keys_approve_reject_and_undo_move_the_files(browser, root, tmp_path):
    show(browser, "triage")
    wait(browser, lambda: len(tiles(browser)) == 7, what="seven stage-1 tiles")
    screenshot(browser, "triage", tmp_path)
    stage1, approved, rejected = root / "outputs" / "stage1", root / "inbox" / "approved", root / "outputs" / "rejected"
    first = tiles(browser)[0]

    press(browser, "a")
    wait(browser, lambda: (approved / first).exists() and first not in tiles(browser), what=f"{first} in inbox/approved/")
    second = tiles(browser)[0]
    press(browser, "x")
    wait(browser, lambda: (rejected / second).exists(), what=f"{second} in outputs/rejected/")
    press(browser, "u")
    wait(browser, lambda: (stage1 / second).exists() and second in tiles(browser), what=f"{second} back in outputs/stage1/")
    press(browser, "u")
    wait(browser, lambda: (stage1 / first).exists(), what=f"{first} back in outputs/stage1/")
    assert not any(approved.iterdir())


def test_the_open_image_shows_its_record(browser, root, tmp_path):
    show(browser, "triage")
    wait(browser, lambda: len(tiles(browser)) >= 1, what="tiles")
    press(browser, "\ue007")  # Enter
    wait(browser, lambda: text_of(browser, "#record .field-prompt") != "", what="the record")
    assert text_of(browser, "#record .field-seed").isdigit()
    assert "character" in text_of(browser, "#record .field-loras")
    # A new stage-1 image redraws the grid behind; the open image's panel stays as it is (so the
    # prompt text the user is selecting to copy survives a running daemon).
    browser.execute_script("document.querySelector('#record .field-prompt').dataset.kept = 'yes'")
    stage1 = root / "outputs" / "stage1"
    newest = sorted(stage1.iterdir())[-1]
    fresh = stage1 / newest.name.replace(newest.name[:15], "20991231_235958")
    shutil.copyfile(newest, fresh)
    wait(browser, lambda: fresh.name in tiles(browser), timeout=8, what="the grid redrawn with the new image")
    assert browser.execute_script("return document.querySelector('#record .field-prompt').dataset.kept") == "yes"
    fresh.unlink()
    screenshot(browser, "single", tmp_path)
    press(browser, "\ue00c")  # Escape
    wait(browser, lambda: not browser.find_element(By.ID, "single").is_displayed(), what="the grid again")


def test_the_record_fills_in_even_when_the_grid_is_redrawn_while_it_loads(browser, root):
    """A running daemon writes images every few seconds: a new one redraws the grid while an
    opened image's record is on its way, and the record must still fill in."""
    show(browser, "triage")
    wait(browser, lambda: len(tiles(browser)) >= 1, what="tiles")
    # The record arrives 5 s late: two polls (every 2 s) see the new image first.
    browser.execute_script("""
        const real = window.fetch;
        window.fetch = (url, options) => String(url).includes("api/record")
            ? new Promise((done) => setTimeout(done, 5000)).then(() => real(url, options)) : real(url, options);""")
    try:
        press(browser, "\ue007")  # Enter
        stage1 = root / "outputs" / "stage1"
        newest = sorted(stage1.iterdir())[-1]
        fresh = stage1 / newest.name.replace(newest.name[:15], "20991231_235957")
        shutil.copyfile(newest, fresh)
        wait(browser, lambda: fresh.name in tiles(browser), timeout=8, what="the grid redrawn with the new image")
        wait(browser, lambda: text_of(browser, "#record .field-prompt") != "", timeout=12, what="the record")
    finally:
        browser.refresh()  # the real fetch again for the tests after this one
        fresh.unlink(missing_ok=True)


def test_a_stage1_image_written_while_the_page_is_open_appears_without_reload(browser, root):
    show(browser, "triage")
    stage1 = root / "outputs" / "stage1"
    newest = sorted(stage1.iterdir())[-1]
    fresh = stage1 / newest.name.replace(newest.name[:15], "20991231_235959")
    shutil.copyfile(newest, fresh)
    wait(browser, lambda: fresh.name in tiles(browser), timeout=8, what="the new image's tile")
    fresh.unlink()


def test_the_queue_shows_why_an_image_failed_and_retry_moves_it_back(browser, root, tmp_path):
    show(browser, "queue")
    failed = wait(browser, lambda: text_of(browser, "#list-failed .error-text"), what="the failed list")
    assert "no sdxld record" in failed and "holiday.txt" in failed
    screenshot(browser, "queue", tmp_path)
    browser.find_element(By.CSS_SELECTOR, "#list-failed button").click()
    wait(browser, lambda: (root / "inbox" / "approved" / "holiday.jpg").exists(), what="holiday.jpg in inbox/approved/")
    press(browser, "u")
    wait(browser, lambda: (root / "inbox" / "failed" / "holiday.jpg.error.txt").exists(), what="the retry undone")


def test_finals_compare_the_stage1_image_with_the_final(browser, tmp_path):
    show(browser, "finals")
    wait(browser, lambda: text_of(browser, "#final-grid .tile"), what="a final")
    assert "not found" not in text_of(browser, "#final-grid .tile")
    wait(browser, lambda: browser.find_element(By.CSS_SELECTOR, "#final-grid .tile").click() or True, what="a click on the final")
    wait(browser, lambda: browser.execute_script(
        "return document.getElementById('compare-before').complete && document.getElementById('compare-before').naturalWidth > 0"),
        what="the stage-1 image in the compare view")
    screenshot(browser, "finals", tmp_path)
    browser.find_element(By.ID, "compare-close").click()


def test_the_taste_view_draws_each_arms_approval_rate_and_follows_moves(browser, root, tmp_path):
    show(browser, "triage")
    wait(browser, lambda: len(tiles(browser)) >= 1, what="tiles")
    press(browser, "x")
    wait(browser, lambda: any((root / "outputs" / "rejected").iterdir()), what="an image in outputs/rejected/")
    show(browser, "taste")
    wait(browser, lambda: text_of(browser, "#taste-summary").startswith("1 approved, 1 rejected"), what="the taste summary")
    bars = browser.find_elements(By.CSS_SELECTOR, '.taste-group[data-group="character"] svg rect.bar')
    assert bars and "learning: LoRAs and prompt options" in text_of(browser, "#taste-summary")
    screenshot(browser, "taste", tmp_path)
    press(browser, "u")  # the rejection undone: the view follows without a reload
    wait(browser, lambda: text_of(browser, "#taste-summary").startswith("1 approved, 0 rejected"), what="the undo in the taste summary")
