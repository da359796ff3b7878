"""The browser page in a real headless Chromium (Playwright driving Debian's chromium): pick images as a user does
(the file chooser the drop zone opens), type classes, wait for the picture; detection's score-threshold slider. The
screenshot is kept as a test artefact."""
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

playwright_api = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt install chromium)")

from ovdense import visualize  # noqa: E402
from ovdense.detection.structures import DetectionResult, GroundingResult  # noqa: E402
from ovdense.predictor import build_predictor  # noqa: E402
from ovdense.serve import create_app  # noqa: E402

# The stand-in detector's boxes (in 96 x 128 pixels) and scores: the page is under test here, not a model.
# The 0.45 box repeats the 0.92 one shifted by 2 px (a soft-NMS duplicate: in the JSON, not in the picture).
BOXES = torch.tensor([[4.0, 10, 40, 50], [50, 10, 90, 50], [96, 10, 124, 50], [6, 12, 42, 52], [4, 60, 60, 92],
                      [70, 60, 120, 92]])
SCORES = torch.tensor([0.92, 0.71, 0.53496, 0.45, 0.41, 0.12])
CLASS = [0, 1, 0, 0, 1, 1]  # the duplicate has the class of the box it repeats


class _FixedBoxes:
    """Detects the vocabulary's classes (or grounds a caption as one phrase) at BOXES with SCORES."""

    def __call__(self, rgb, vocabulary):
        names = vocabulary.names
        labels = torch.tensor([c % len(names) for c in CLASS])
        return DetectionResult(BOXES, SCORES, labels, names, rgb.shape[:2], rgb)

    def set_image(self, rgb):
        self.rgb = rgb

    def ground(self, caption, phrases=None):
        return GroundingResult(BOXES, SCORES, torch.zeros(len(SCORES), dtype=torch.long), [caption],
                               self.rgb.shape[:2], self.rgb, caption, [[(0, len(caption))]])


@pytest.fixture(scope="module")
def server(tiny_vit):
    predictor = build_predictor("tiny-vit", "random", "maskclip")
    app = create_app(predictor, {"model": "tiny-vit", "method": "maskclip"}, detector=_FixedBoxes(),
                     detector_described={"method": "fixed boxes"})
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


@pytest.fixture
def browser_page(server):
    """A fresh page on the server and the list its uncaught script errors land in."""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server)
        yield page, errors
        browser.close()


def _pick(page, path: Path) -> None:
    """Pick `path` as a user does: click the drop zone, choose the file in the chooser it opens."""
    with page.expect_file_chooser(timeout=5_000) as chooser:
        page.click("#drop")
    chooser.value.set_files(str(path))
    assert page.inner_text("#drop") == path.name


def _run(page, done: str, act=None) -> str:
    """Click Run (or do `act`: move the slider) and wait for a status starting with `done` and a new picture; returns
    the picture's data URL."""
    before = page.get_attribute("#overlay", "src") or ""
    if act is None:
        page.click("#run")
    else:
        act()
    page.wait_for_function("([done, before]) => { const status = document.getElementById('status');"
                           " return status.className === 'error' || status.textContent.startsWith(done)"
                           " && document.getElementById('overlay').src !== before; }", arg=[done, before],
                           timeout=60_000)
    assert page.inner_text("#status").startswith(done)
    return page.get_attribute("#overlay", "src")


def test_the_page_segments_two_images_picked_in_a_row(browser_page, scene, tmp_path):
    page, errors = browser_page
    first, second = tmp_path / "scene.png", tmp_path / "flipped.png"
    Image.fromarray(scene).save(first)
    Image.fromarray(np.ascontiguousarray(scene[::-1, ::-1])).save(second)
    artefacts = Path(os.environ.get("OVDENSE_TEST_ARTIFACTS", tmp_path))
    artefacts.mkdir(parents=True, exist_ok=True)
    page.fill("#words", "red, blue")
    pictures = []
    for path in (first, second):  # the second pick used to find the file input gone
        _pick(page, path)
        pictures.append(_run(page, "Done: segment"))
    assert pictures[0] != pictures[1] and errors == []
    # the class under the pointer: the pixel's label in the JSON's masks, through the picture's scale
    segments = page.evaluate("answer.segments")
    x, y = 100, 40
    under = [s["label"] for s in segments
             if coco_mask.decode({"size": s["rle"]["size"], "counts": s["rle"]["counts"].encode()})[y, x]]
    shown = page.evaluate("img => img.width / img.naturalWidth", page.query_selector("#overlay"))
    page.hover("#overlay", position={"x": (x + 0.5) * 4 * shown, "y": (y + 0.5) * 4 * shown})
    assert page.inner_text("#hover") == under[0]
    # the picture carries the legend, drawn at its size: no second legend on the page, no pixelated scaling
    assert page.locator("#legend li").count() == 0
    assert page.eval_on_selector("#overlay", "img => getComputedStyle(img).imageRendering") == "auto"
    assert page.eval_on_selector("#overlay", "img => img.naturalHeight") >= 384  # 96 px drawn 4x
    assert not page.is_hidden("#download") and page.is_hidden("#threshold")
    page.screenshot(path=str(artefacts / "serve_page.png"))
    page.fill("#words", "")
    page.click("#run")
    assert "Type some classes" in page.inner_text("#status")
    assert (artefacts / "serve_page.png").stat().st_size > 1000


def test_the_threshold_slider_changes_the_boxes_drawn(browser_page, scene, tmp_path, monkeypatch):
    drawn = []  # the boxes of each box drawing the server makes (it runs in this process)
    place = visualize.place_labels
    monkeypatch.setattr(visualize, "place_labels", lambda boxes, sizes, canvas: drawn.append(len(boxes)) or
                        place(boxes, sizes, canvas))
    page, errors = browser_page
    image = tmp_path / "scene.png"
    Image.fromarray(scene).save(image)
    artefacts = Path(os.environ.get("OVDENSE_TEST_ARTIFACTS", tmp_path))
    page.select_option("#task", "detect")
    assert page.is_visible("#threshold") and page.input_value("#threshold") == "0.3"  # the API's default
    _pick(page, image)
    page.fill("#words", "red, blue")
    low = _run(page, "Done: detect, 5 boxes scoring above 0.30")
    assert drawn[-1] == 4  # the duplicate is in the JSON, not in the picture
    listed = page.locator("#legend li").all_inner_texts()
    assert listed == ["red 0.92", "blue 0.71", "red 0.54", "red 0.45", "blue 0.41"]  # the JSON's 0.535 as drawn
    page.screenshot(path=str(artefacts / "serve_page_detect.png"))
    high = _run(page, "Done: detect, 2 boxes scoring above 0.60", lambda: page.fill("#threshold", "0.6"))
    assert drawn[-1] == 2 and page.locator("#legend li").count() == 2 and high != low
    page.select_option("#task", "ground")
    page.fill("#words", "a red square left of a blue square")
    _run(page, "Done: ground, 2 boxes scoring above 0.60")
    _run(page, "Done: ground, 6 boxes scoring above 0.10", lambda: page.fill("#threshold", "0.1"))
    assert drawn[-1] == 5  # one phrase: the duplicate drawn once
    assert page.locator("#legend li").all_inner_texts() == ["a red square left of a blue square: 6 boxes (best 0.92)"]
    values = [k / 10000 for k in range(10001)]  # every score the JSON can hold: the page shows what pictures show
    assert page.evaluate("values => values.map(scoreText)", values) == [visualize.score_text(v) for v in values]
    assert errors == []
