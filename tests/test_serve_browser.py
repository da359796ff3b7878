"""The browser page in a real headless Chromium (Playwright driving Debian's chromium): upload an image, type
classes, wait for the overlay, check the legend; the screenshot is kept as a test artefact."""
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

playwright_api = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt install chromium)")

from ovdense.predictor import build_predictor  # noqa: E402
from ovdense.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_vit):
    predictor = build_predictor("tiny-vit", "random", "maskclip")
    app = create_app(predictor, {"model": "tiny-vit", "method": "maskclip"})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    for _ in range(100):
        if instance.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


def test_the_page_segments_an_uploaded_image(server, scene, tmp_path):
    image = tmp_path / "scene.png"
    Image.fromarray(scene).save(image)
    artefacts = Path(os.environ.get("OVDENSE_TEST_ARTIFACTS", tmp_path))
    artefacts.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server)
        page.set_input_files("#file", str(image))
        page.fill("#words", "red, blue")
        page.click("#run")
        page.wait_for_function("document.getElementById('overlay').naturalWidth > 0", timeout=60_000)
        legend = page.inner_text("#legend")
        assert "red" in legend or "blue" in legend
        assert page.inner_text("#status").startswith("Done")
        assert not page.is_hidden("#download")
        page.screenshot(path=str(artefacts / "serve_page.png"))
        page.fill("#words", "")
        page.click("#run")
        assert "Type some classes" in page.inner_text("#status")
        browser.close()
    assert (artefacts / "serve_page.png").stat().st_size > 1000
