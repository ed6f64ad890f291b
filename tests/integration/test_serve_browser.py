"""The server's web page in a real headless browser: Debian's chromium, driven by Playwright.

Nothing downloads a browser (never ``playwright install``): the test uses /usr/bin/chromium (``apt-get install
chromium``; .ci/run installs it when it can) and skips, saying why, where it or the playwright package is missing.
It uploads an image through the page's file input, waits for the caption, compares it with the API's for the same
bytes, checks the attention overlays were drawn and that the page fetched nothing but this server, and saves a
screenshot into the test's temporary directory.
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest
from tests.support.export_artifacts import artifacts
from tests.support.server import Server

CHROMIUM = os.environ.get("SAT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}: apt-get install -y chromium (or set SAT_CHROMIUM) to run the page "
                    f"test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI and these machines run as root, where chromium's sandbox refuses to start
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    art = artifacts(tmp_path_factory)
    srv = Server(art.export_dir, "--beam-size", "3", "--max-wait-ms", "5")
    yield srv, art
    assert srv.terminate() == 0, srv.log


def test_page_uploads_an_image_and_shows_the_caption_and_attention(browser, server, tmp_path):
    srv, art = server
    image = art.image_paths[0]
    api = httpx.post(f"{srv.url}/v1/captions", files={"image": (image.name, image.read_bytes(), "image/jpeg")},
                     timeout=60).json()["results"][0]
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    requested: list[str] = []
    page.on("request", lambda req: requested.append(req.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{srv.url}/")
    # selectors, not JS predicates: the page's CSP forbids eval, which Playwright's wait_for_function uses
    page.locator("#model", has_text="vocabulary").wait_for(timeout=30_000)
    page.set_input_files("#file", str(image))
    page.locator("#caption:not(:empty)").wait_for(timeout=60_000)
    assert page.inner_text("#caption") == api["caption"]
    assert page.locator("#words button").all_inner_texts() == api["tokens"]
    assert page.locator("#maps canvas").count() == len(api["tokens"])  # one overlay per word
    width = page.evaluate("document.getElementById('view').width")
    assert width > 0
    # the attention overlay is drawn: the view differs from the bare image drawn at the same size
    diff = page.evaluate("""() => {
        const v = document.getElementById('view'), c = document.createElement('canvas');
        c.width = v.width; c.height = v.height;
        c.getContext('2d').drawImage(current.img, 0, 0, c.width, c.height);
        const a = v.getContext('2d').getImageData(0, 0, v.width, v.height).data;
        const b = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let d = 0;
        for (let i = 0; i < a.length; i++) d += Math.abs(a[i] - b[i]);
        return d / a.length;
    }""")
    assert diff > 5, f"mean pixel difference {diff:.2f}: no overlay drawn"
    assert not errors, errors
    assert all(u.startswith(srv.url) or u.startswith(("blob:", "data:")) for u in requested), requested
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.close()
