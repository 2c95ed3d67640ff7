"""The web app end to end in a real browser: Debian's Chromium driven by Playwright.

Starts ``dicompipe ui`` on a free localhost port (a subprocess, the real pipeline with a
tiny untrained test bundle) with an access token and a data root, signs in with the token,
uploads PNG/JPG slices, waits for the verdict, moves the slice slider, downloads the TXT
report, opens the case history, is refused a server folder outside the data root, and
saves screenshots under ``test-artifacts/`` (gitignored).

Needs: ``/usr/bin/chromium`` (``apt-get install chromium``), the ``browser`` extra
(``pip install playwright``; no ``playwright install``: the system browser is used) and the
``ui`` extra (streamlit). Skipped with the reason when one is missing.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]
TOKEN = "browser-test-token-0123456789"

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
# looked up, not imported (importing them at collection is slow); the tests import playwright
if importlib.util.find_spec("playwright") is None:
    pytest.skip("playwright is missing (pip install 'dicompipe[browser]')", allow_module_level=True)
if importlib.util.find_spec("streamlit") is None:
    pytest.skip("streamlit is missing (pip install 'dicompipe[ui]')", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _example_slices(dest: Path) -> list[Path]:
    """A few real JPG/PNG slices from examples/ when the trainer left some, else PNGs of a
    chest phantom written here (already windowed, like exported slices)."""
    found = sorted(p for d in ("lung-slices", "slices") for p in (ROOT / "examples" / d).rglob("*")
                   if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if found:
        return found[:6]
    from PIL import Image
    from tiny_bundle import chest_phantom

    dest.mkdir(parents=True, exist_ok=True)
    hu = chest_phantom(shape=(6, 96, 96), lung_z=(0.0, 1.0))
    out = []
    for z, s in enumerate(hu):
        g = (np.clip((s + 1350) / 1500, 0, 1) * 255).astype(np.uint8)
        p = dest / f"slice{z + 1}.png"
        Image.fromarray(g).save(p)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tiny_bundle import make_bundle

    tmp = tmp_path_factory.mktemp("ui")
    bundle = tmp / "bundle"               # read by the app only when Analyse is pressed
    port = _free_port()
    data = tmp / "data"                   # the only folder users may give
    (data / "case").mkdir(parents=True)
    (tmp / "elsewhere").mkdir()           # exists, outside the root
    env = dict(os.environ, DICOMPIPE_UI_MODEL=str(bundle), DICOMPIPE_UI_ALLOW_UNTRAINED="1",
               DICOMPIPE_UI_TOKEN=TOKEN,
               DICOMPIPE_HISTORY=str(tmp / "history.sqlite"), DICOMPIPE_UI_OUT=str(tmp / "runs"),
               OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    log = open(tmp / "server.log", "w")
    env.pop("DICOMPIPE_UI_TOKEN_FILE", None)
    proc = subprocess.Popen([sys.executable, "-m", "dicompipe.cli", "ui", "--host", "127.0.0.1",
                             "--port", str(port), "--data-root", str(data)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=tmp)
    try:
        make_bundle(bundle, organ="lung", favour="malignant", bias=3.0)   # while it starts
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300          # generous: CI machines may be busy
        healthy = False
        while time.time() < deadline and proc.poll() is None and not healthy:
            try:
                healthy = urllib.request.urlopen(url + "/_stcore/health", timeout=5).read() == b"ok"
            except OSError:
                time.sleep(0.5)
        if not healthy:
            log.flush()
            pytest.fail("dicompipe ui did not start:\n" + (tmp / "server.log").read_text()[-3000:])
        yield {"url": url, "tmp": tmp}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(tmp / "server.log", ARTIFACTS / "server.log")


def _sign_in(page, url: str, screenshot: bool = False):
    """Open the app and sign in as alice with the server's token (a wrong one first)."""
    from playwright.sync_api import expect

    page.goto(url)
    expect(page.get_by_role("button", name="Sign in")).to_be_visible(timeout=120_000)
    expect(page.get_by_text("Start with a CT")).to_have_count(0)     # nothing before sign-in
    page.get_by_label("User name").fill("alice")
    page.get_by_label("Access token").fill("wrong-token-wrong-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text("Unknown user name or access token.")).to_be_visible(timeout=120_000)
    page.get_by_label("User name").fill("alice")
    page.get_by_label("Access token").fill(TOKEN)
    if screenshot:
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "ui-signin.png"))
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text("Signed in as")).to_be_visible(timeout=120_000)
    expect(page.get_by_text(TOKEN)).to_have_count(0)


def test_upload_verdict_slider_download_history(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    slices = _example_slices(tmp_path / "slices")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
            page.set_default_timeout(120_000)
            _sign_in(page, server["url"], screenshot=True)
            expect(page.get_by_text("Start with a CT")).to_be_visible(timeout=120_000)

            # upload the slices, choose the organ, analyse
            page.locator("section[data-testid='stSidebar'] input[type='file']").set_input_files(
                [str(p) for p in slices])
            expect(page.get_by_text("Chosen automatically")).to_be_visible(timeout=120_000)
            organ = page.get_by_role("combobox", name="Organ")
            organ.scroll_into_view_if_needed()      # at 800 px it sits at the sidebar's bottom
            organ.click()
            page.keyboard.type("Lung")
            page.keyboard.press("Enter")
            expect(page.get_by_text("carry no headers: choose lung")).to_have_count(
                0, timeout=120_000)   # slow on a busy CPU
            page.get_by_role("button", name="Analyse", exact=True).click()

            card = page.locator("[data-testid='verdict-card']")
            expect(card).to_be_visible(timeout=420_000)
            expect(card).to_contain_text("Calibrated probability")
            expect(card).to_contain_text("RESEARCH USE ONLY")
            caption = page.locator("[data-testid='slice-caption']")
            expect(caption).to_contain_text("Slice ", timeout=120_000)
            expect(page.locator("[data-testid='stImage'] img").first).to_be_visible(timeout=120_000)
            expect(page.locator("[data-testid='stVegaLiteChart']").first).to_be_visible()
            page.wait_for_timeout(1500)                 # let the charts draw
            page.screenshot(path=str(ARTIFACTS / "ui-verdict.png"))

            # move the slider one step with the keyboard and see the slice change
            before = caption.inner_text()
            thumb = page.locator("div[data-testid='stSlider']").filter(
                has_text="Slice").get_by_role("slider")
            thumb.focus()
            page.keyboard.press("ArrowLeft" if before.startswith(f"Slice z {len(slices) - 1} ")
                                else "ArrowRight")
            expect(caption).not_to_have_text(before, timeout=120_000)
            expect(page.locator("[data-testid='stImage'] img").first).to_be_visible(timeout=120_000)
            page.wait_for_timeout(800)
            page.set_viewport_size({"width": 1280, "height": 1500})   # the whole page
            page.wait_for_timeout(1500)
            page.screenshot(path=str(ARTIFACTS / "ui-verdict-full.png"))
            page.set_viewport_size({"width": 1280, "height": 800})

            # download the TXT report
            with page.expect_download() as dl:
                page.get_by_role("button", name="Report (TXT)").click()
            txt = ARTIFACTS / "report.txt"
            dl.value.save_as(txt)
            text = txt.read_text()
            assert "RESEARCH USE ONLY" in text.upper()

            # the case history holds this case
            page.get_by_role("tab", name="Case history").click()
            grid = page.locator("div[data-testid='stDataFrame']").last
            expect(grid).to_be_visible(timeout=120_000)
            expect(page.get_by_text("case(s). Select a row")).to_be_visible(timeout=120_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(ARTIFACTS / "ui-history.png"))
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "ui-failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def test_folder_outside_the_data_root_is_refused(server):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(120_000)
            _sign_in(page, server["url"])
            page.get_by_text("Folder on server").click()
            box = page.get_by_role("textbox", name="Folder or file on the server")
            expect(box).to_be_visible(timeout=120_000)
            outside = server["tmp"] / "data" / ".." / "elsewhere"      # exists, outside the root
            box.fill(str(outside))
            box.press("Enter")
            refusal = page.get_by_text("is not a folder or file inside the allowed data folders")
            expect(refusal).to_be_visible(timeout=120_000)
            expect(page.get_by_role("button", name="Analyse", exact=True)).to_be_disabled()
            page.wait_for_timeout(800)
            page.screenshot(path=str(ARTIFACTS / "ui-folder-refused.png"))
            box.fill(str(server["tmp"] / "data" / "case"))                # inside: accepted
            box.press("Enter")
            expect(refusal).to_have_count(0, timeout=120_000)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "ui-failure-folder.png"), full_page=True)
            raise
        finally:
            browser.close()
