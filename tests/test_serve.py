"""`ovdense serve`'s app: the segmentation endpoint equals the API, and bad requests get clear 4xx JSON errors."""
import base64
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from ovdense.predictor import build_predictor  # noqa: E402
from ovdense.serve import create_app  # noqa: E402

DESCRIBED = {"model": "tiny-vit", "weights": "random", "method": "maskclip", "preset": "default", "device": "cpu"}


@pytest.fixture(scope="module")
def predictor(tiny_vit):
    return build_predictor("tiny-vit", "random", "maskclip")


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_segment_returns_the_apis_json_and_an_overlay(predictor, scene):
    client = TestClient(create_app(predictor, DESCRIBED))
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/v1/models").json() == DESCRIBED
    response = client.post("/v1/segment", files={"image": ("scene.png", _png(scene), "image/png")},
                           data={"classes": "red, blue", "overlay": "true"})
    assert response.status_code == 200
    body = response.json()
    expected = predictor(scene, "red, blue").summary(rle=True)
    assert body["segments"] == expected["segments"] and body["classes"] == ["red", "blue"]
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    expected_overlay = predictor(scene, "red, blue").plot()  # the picture `ovdense segment` writes (with its legend)
    assert overlay.size == expected_overlay.size and np.array_equal(np.asarray(overlay), np.asarray(expected_overlay))
    assert "overlay_png" not in client.post("/v1/segment", files={"image": ("s.png", _png(scene))},
                                            data={"classes": "red"}).json()


def test_bad_requests_get_clear_errors_never_a_500(predictor, scene):
    client = TestClient(create_app(predictor, DESCRIBED, max_upload=50_000))
    cases = [
        ({"image": ("x.png", b"\x89PNG definitely not an image")}, {"classes": "red"}, 400, "not an image"),
        ({"image": ("s.png", _png(scene))}, {"classes": " , "}, 400, "classes"),
        ({"image": ("big.bin", bytes(60_000))}, {"classes": "red"}, 413, "bytes"),
        ({"image": ("s.png", _png(scene))}, {}, 422, None),  # classes missing: FastAPI's validation error
    ]
    for files, data, status, message in cases:
        response = client.post("/v1/segment", files=files, data=data)
        assert response.status_code == status, (files, data, response.text)
        if message:
            assert message in response.json()["error"]


def test_an_api_key_is_required_when_set(predictor, scene):
    client = TestClient(create_app(predictor, DESCRIBED, api_key="s3cret"))
    assert client.get("/healthz").status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).json() == DESCRIBED


def test_binding_beyond_loopback_needs_an_api_key(capsys):
    from ovdense.cli import main
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err
