"""The page at GET / in a real headless Chromium (Debian's chromium, driven by Playwright): a person uploads a real
photograph and sees the top-5 labels with scores -- the same ones /classify answers."""
import io
import shutil

import httpx
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from test_serve import export_dir  # noqa: F401  (a session fixture: the real export)
from test_serve_http import start_server, stop

CHROMIUM = shutil.which("chromium")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_page_shows_the_top5_of_an_uploaded_photograph(export_dir, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    photo = tmp_path / "china.jpg"
    Image.fromarray(load_sample_image("china.jpg")).save(photo, quality=90)
    proc, url = start_server(export_dir)
    try:
        expected = httpx.post(f"{url}/classify?top_k=5", files={"file": ("china.jpg", photo.read_bytes(),
                                                                         "image/jpeg")}).json()["predictions"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            try:
                page = browser.new_page()
                page.goto(f"{url}/")
                page.set_input_files("#file", str(photo))
                page.wait_for_selector("#results tr.prediction", timeout=30_000)
                labels = page.locator("#results td.label").all_text_contents()
                scores = page.locator("#results td.score").all_text_contents()
                status = page.locator("#status").text_content()
                shot = page.screenshot()
            finally:
                browser.close()
    finally:
        stop(proc)
    assert labels == [p["label"] for p in expected]
    assert scores == [f"{100 * p['score']:.2f} %" for p in expected]
    assert "ms" in status and "error" not in status
    assert Image.open(io.BytesIO(shot)).size[0] > 0
