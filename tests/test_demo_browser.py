"""`seesr demo` end to end in a real browser: headless Debian Chromium driven by Playwright against the gradio
server on 127.0.0.1 with tiny TGSR and SeeSR (+DAPE) folders.

Skipped (with the reason) without gradio (`pip install -e ".[demo]"`), Playwright (`pip install playwright`) or a
system Chromium (`apt-get install chromium`); `.ci/run` installs all three.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import struct

import pytest
from demo_tiny import photo, save_tiny_seesr, save_tiny_tgsr
from PIL import Image

pytest.importorskip("gradio", reason='gradio is not installed (pip install -e ".[demo]")')
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = os.environ.get("SEESR_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no system Chromium (apt-get install chromium)", allow_module_level=True)

# Flags for a sandbox without network: no background connections, no sandboxing as root, software rendering.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
MAX_PIXELS = 48 * 48
TIMEOUT_MS = 90_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from seesr.demo.page import DemoApp, launch
    from seesr.demo.runner import DemoModel

    root = tmp_path_factory.mktemp("demo-browser")
    tgsr = DemoModel(save_tiny_tgsr(root / "tgsr"), label="tiny TGSR")
    seesr = DemoModel(save_tiny_seesr(root / "seesr", presets={"Quick": {"steps": 2, "process_size": 32}}))
    seesr.label = "tiny SeeSR"
    demo = DemoApp([tgsr, seesr], max_pixels=MAX_PIXELS, output_dir=root / "results")
    app = demo.build()
    port = free_port()
    launch(app, "127.0.0.1", port, False, demo.output_dir, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", root, demo.models
    app.close()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1200}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server[0])
        page.wait_for_selector("#run")
        yield page
        browser.close()


def upload(page, path) -> None:
    page.locator("#input-image input[type=file]").set_input_files(str(path))
    page.wait_for_selector("#input-image img")


def run_and_wait(page, expect: str) -> str:
    """Click Run and wait until the status line contains `expect`; returns the status."""
    page.click("#run")
    page.wait_for_selector(f"#status:has-text({expect!r})")
    return page.inner_text("#status")


def slider_shows(page, width: int, height: int) -> bool:
    """Wait until the comparison slider holds two images (before and after), both `width` x `height` pixels."""
    page.wait_for_function(
        """([w, h]) => { const imgs = [...document.querySelectorAll('#result img')];
            return imgs.length === 2
                && imgs.every(i => i.complete && i.naturalWidth === w && i.naturalHeight === h); }""",
        arg=[width, height],
    )
    return True


@pytest.fixture(scope="module")
def files(server):
    root = server[1]
    good, big, bad = root / "photo.png", root / "big.png", root / "notes.png"
    photo(24, 20).save(good)
    photo(60, 50).save(big)  # 3000 pixels > MAX_PIXELS
    bad.write_bytes(b"this is not an image")
    return good, big, bad


def test_upload_run_download_bad_input_and_still_serving(page, files):
    good, big, bad = files
    # 1. the TGSR model: x4 by default; the result is 4x the input, in the slider and in the downloaded PNG
    assert page.is_visible("#setting-upscale") and not page.is_visible("#setting-steps")
    upload(page, good)
    page.fill("#prompt textarea", "a red bird on a branch")
    status = run_and_wait(page, "Done")
    assert "96x80 from 24x20" in status
    assert slider_shows(page, 96, 80)
    with page.expect_download() as download:
        page.click("#download")
    data = open(download.value.path(), "rb").read()
    assert png_size(data) == (96, 80)
    assert Image.open(io.BytesIO(data)).mode == "RGB"
    assert page.locator("#gallery img").count() == 1

    # 2. bad input: a message in the page, then the server goes on serving
    page.locator("#input-image input[type=file]").set_input_files(str(bad))
    assert "notes.png: not a recognised image file" in run_and_wait(page, "Error")
    upload(page, big)
    assert f"60x50 = 3000 pixels exceeds the limit of {MAX_PIXELS}" in run_and_wait(page, "exceeds")
    upload(page, good)
    choose(page, "#setting-upscale", "2")
    assert "48x40 from 24x20" in run_and_wait(page, "48x40")
    assert slider_shows(page, 48, 40)
    assert page.locator("#gallery img").count() == 2
    page.locator("#gallery img").last.click()  # the first result, back in the slider
    assert slider_shows(page, 96, 80) and "96x80" in page.inner_text("#status")


def test_seesr_model_shows_its_settings_and_editable_tags(page, files, server):
    choose(page, "#model", "tiny SeeSR")
    page.wait_for_selector("#setting-steps", state="visible")
    assert page.is_visible("#tags") and page.is_visible("#setting-seed") and page.is_visible("#setting-color_fix")
    choose(page, "#preset", "Quick")
    page.wait_for_function("document.querySelector('#setting-steps input[type=number]').value === '2'")
    upload(page, files[0])  # the upload runs DAPE: its tags appear for editing
    page.wait_for_selector("#status:has-text('Tags ready')")
    assert page.input_value("#tags textarea") == server[2]["tiny SeeSR"].tags(Image.open(files[0]).convert("RGB"))
    page.fill("#tags textarea", "a red bird")
    status = run_and_wait(page, "Done")
    assert "Prompt: a red bird, a red bird on a branch," in status
    assert slider_shows(page, 96, 80)


def choose(page, elem_id: str, option: str) -> None:
    """Pick `option` in a gradio drop-down."""
    page.click(f"{elem_id} input")
    page.locator("ul[role=listbox] li", has_text=option).first.click()
