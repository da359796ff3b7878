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


def _huge_png(width: int, height: int) -> bytes:
    """A small file whose PNG header declares width x height pixels (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(10))) + chunk(b"IEND", b"")


def test_segment_returns_the_apis_json_and_an_overlay(predictor, scene):
    client = TestClient(create_app(predictor, DESCRIBED))
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/v1/models").json() == {**DESCRIBED, "detector": None}
    response = client.post("/v1/segment", files={"image": ("scene.png", _png(scene), "image/png")},
                           data={"classes": "red, blue", "overlay": "true"})
    assert response.status_code == 200
    body = response.json()
    expected = predictor(scene, "red, blue").summary(rle=True)
    assert body["segments"] == expected["segments"] and body["classes"] == ["red", "blue"]
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    expected_overlay = predictor(scene, "red, blue").plot()  # the picture `ovdense segment` writes (with its legend)
    assert overlay.size == expected_overlay.size and np.array_equal(np.asarray(overlay), np.asarray(expected_overlay))
    assert body["overlay_scale"] == 4 and overlay.size[1] >= 4 * 96  # the 96 px scene is drawn 4x
    assert "overlay_png" not in client.post("/v1/segment", files={"image": ("s.png", _png(scene))},
                                            data={"classes": "red"}).json()


def test_bad_requests_get_clear_errors_never_a_500(predictor, scene):
    client = TestClient(create_app(predictor, DESCRIBED, max_upload=50_000, max_classes=3))
    cases = [
        ({"image": ("x.png", b"\x89PNG definitely not an image")}, {"classes": "red"}, 400, "not an image"),
        ({"image": ("e.png", b"")}, {"classes": "red"}, 400, "empty"),
        ({"image": ("s.png", _png(scene))}, {"classes": " , "}, 400, "classes"),
        ({"image": ("big.bin", bytes(60_000))}, {"classes": "red"}, 413, "bytes"),
        ({"image": ("s.png", _png(scene))}, {}, 422, "classes: Field required"),  # FastAPI's validation
        ({"image": ("huge.png", _huge_png(20_000, 20_000))}, {"classes": "red"}, 400, "too many to decode"),
        ({"image": ("big.png", _huge_png(10_000, 10_000))}, {"classes": "red"}, 400, "pixels"),
        ({"image": ("s.png", _png(scene))}, {"classes": "red", "templates": "klingon"}, 400, "template set"),
        ({"image": ("s.png", _png(scene))}, {"classes": "red", "logit_scale": "-1"}, 400, "logit_scale"),
        ({"image": ("s.png", _png(scene))}, {"classes": "red", "pamr": "-2"}, 400, "--pamr"),
        ({"image": ("s.png", _png(scene))}, {"classes": "red", "pamr": "51"}, 400, "at most 50"),
        ({"image": ("s.png", _png(scene))}, {"classes": "red", "logit_scale": "inf"}, 400, "logit_scale"),
        ({"image": ("s.png", _png(scene))}, {"classes": "red; crimson, blue, green"}, 400, "at most 3"),
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
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).json()["model"] == "tiny-vit"


def test_binding_beyond_loopback_needs_an_api_key(capsys):
    from ovdense.cli import main
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_detect_and_ground_endpoints_equal_the_api(predictor, scene, tiny_rn, tmp_path):
    import torch

    from ovdense.detection.predictor import GroundingPredictor
    from ovdense.methods.glip import GLIPDetector
    torch.manual_seed(0)
    glip = GLIPDetector(tiny_rn, channels=32, layers=1, fusion_dim=64, fusion_heads=2, text_heads=2, groups=8)
    grounder = GroundingPredictor(glip, "glip-synthetic")
    client = TestClient(create_app(predictor, DESCRIBED, detector=grounder, detector_described={"method": "glip"}))
    files = {"image": ("scene.png", _png(scene))}
    detected = client.post("/v1/detect", files=files, data={"classes": "red square, blue square", "threshold": "0"})
    assert detected.status_code == 200
    assert detected.json()["detections"] == grounder(scene, "red square, blue square").to_list()
    grounded = client.post("/v1/ground", files=files, data={"caption": "a red square left of a blue square",
                                                            "threshold": "0", "overlay": "true"})
    grounder.set_image(scene)
    expected = grounder.ground("a red square left of a blue square").summary()
    assert grounded.json()["phrases"] == expected["phrases"] and "overlay_png" in grounded.json()
    assert client.post("/v1/ground", files=files, data={"caption": "a red square", "phrases": "green bar"}
                       ).status_code == 400
    empty = client.post("/v1/ground", files=files, data={"caption": "a red square", "phrases": " ; ;"})
    assert empty.status_code == 400 and "phrases is empty" in empty.json()["error"]
    corrupt = client.post("/v1/ground", files={"image": ("x.png", b"GIF89a garbage")}, data={"caption": "a red square"})
    assert corrupt.status_code == 400 and "BytesIO" not in corrupt.json()["error"]
    assert client.post("/v1/detect", files=files, data={"classes": "red", "threshold": "2"}).status_code == 400
    assert TestClient(create_app(predictor, DESCRIBED)).post("/v1/detect", files=files,
                                                             data={"classes": "red"}).status_code == 404


# ------------------------------------------------------------------------------------- a live server on loopback
class _Live:
    """uvicorn serving `app` on a free loopback port in a thread; `stop()` shuts it down gracefully."""

    def __init__(self, app):
        import socket
        import threading
        import time

        import uvicorn
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _post_segment(url, png, classes="red, blue", **fields):
    import httpx
    return httpx.post(f"{url}/v1/segment", files={"image": ("s.png", png)}, data={"classes": classes, **fields},
                      timeout=60)


def test_sixteen_concurrent_clients_all_get_answers(predictor, scene):
    from concurrent.futures import ThreadPoolExecutor
    live = _Live(create_app(predictor, DESCRIBED, queue=16))
    try:
        png = _png(scene)
        with ThreadPoolExecutor(16) as pool:
            statuses = [r.status_code for r in pool.map(lambda _: _post_segment(live.url, png), range(16))]
        assert statuses == [200] * 16
    finally:
        live.stop()


def test_a_client_that_disconnects_mid_upload_costs_nothing(predictor, scene):
    import socket
    live = _Live(create_app(predictor, DESCRIBED))
    try:
        with socket.create_connection(("127.0.0.1", live.port)) as raw:
            raw.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                        b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"image\"; "
                        b"filename=\"s.png\"\r\n\r\n" + _png(scene)[:200])
        response = _post_segment(live.url, _png(scene))
        assert response.status_code == 200 and response.json()["segments"]
    finally:
        live.stop()


class _Slow:
    """A predictor whose every batch takes `seconds` longer; it records the batches it ran."""

    def __init__(self, predictor, seconds: float):
        self.predictor, self.seconds, self.batches, self.overrides = predictor, seconds, [], []
        self.protocol, self.calls = predictor.protocol, 0

    def predict_batch(self, images, vocabularies, **overrides):
        import time
        self.calls += 1
        time.sleep(self.seconds)
        self.batches.append([", ".join(v.names) for v in vocabularies])
        self.overrides.append(overrides)
        return self.predictor.predict_batch(images, vocabularies, **overrides)


def test_shutdown_lets_requests_in_flight_finish(predictor, scene):
    import threading
    import time

    from ovdense.serve import ModelWorker
    slow = _Slow(predictor, 0.5)
    worker = ModelWorker(slow, 1)  # one at a time: one request runs while three wait
    live = _Live(create_app(slow, DESCRIBED, worker=worker))
    png, results = _png(scene), []
    clients = [threading.Thread(target=lambda: results.append(_post_segment(live.url, png).status_code))
               for _ in range(4)]
    for client in clients:
        client.start()
    for _ in range(600):  # until all four are in: the first running, three queued (no duration is asserted)
        if slow.calls >= 1 and len(worker.pending) == 3:
            break
        time.sleep(0.05)
    assert slow.calls >= 1 and len(worker.pending) == 3
    live.stop()
    for client in clients:
        client.join(timeout=60)
    assert results == [200] * 4 and len(slow.batches) == 4  # the shutdown waited for every one of them


def test_requests_waiting_together_run_as_one_batch_with_their_own_answers(predictor, scene):
    from concurrent.futures import ThreadPoolExecutor
    slow = _Slow(predictor, 0.3)
    live = _Live(create_app(slow, DESCRIBED, batch=8))
    requests = [(v, {}) for v in ["red, blue", "blue, green", "red", "green, red, blue", "blue"] * 2]
    requests += [("red, blue", {"pamr": "0", "logit_scale": "50"}), ("blue, green", {"pamr": "0", "logit_scale": "50"})]
    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            responses = list(pool.map(lambda r: _post_segment(live.url, _png(scene), r[0], **r[1]), requests))
    finally:
        live.stop()
    for (vocabulary, fields), response in zip(requests, responses):
        assert response.status_code == 200
        overrides = {"pamr_iterations": 0, "logit_scale": 50.0} if fields else {}
        assert response.json()["segments"] == predictor(scene, vocabulary, **overrides).summary()["segments"]
    sizes = [len(b) for b in slow.batches]
    assert sum(sizes) == 12 and max(sizes) > 1 and max(sizes) <= 8  # batched, never beyond `batch`
    assert sum(len(b) for b, o in zip(slow.batches, slow.overrides) if o) == 2  # a batch shares its overrides
    assert all(o in ({}, {"pamr_iterations": 0, "logit_scale": 50.0}) for o in slow.overrides)


def test_a_failing_job_in_a_batch_fails_alone():
    import threading

    from ovdense.errors import InputError
    from ovdense.serve import ModelWorker

    class Picky:
        calls = []

        def predict_batch(self, images, vocabularies):
            self.calls.append(list(vocabularies))
            if "bad" in vocabularies:
                raise InputError("a bad vocabulary")
            return [v.upper() for v in vocabularies]
    worker = ModelWorker(Picky(), batch=8)
    release = threading.Event()
    busy = worker.call(release.wait)  # holds the thread, so that the next three wait together
    image = np.zeros((4, 4, 3), np.uint8)
    futures = [worker.segment(image, v, {}, lambda result: result + "!") for v in ("a", "bad", "c")]
    release.set()
    assert busy.result(timeout=5) is True
    assert futures[0].result(timeout=5) == "A!" and futures[2].result(timeout=5) == "C!"
    assert isinstance(futures[1].exception(timeout=5), InputError)
    assert Picky.calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]
    worker.close()
    assert worker.thread is None


def test_a_batch_takes_along_images_within_its_pixel_budget():
    import threading

    from ovdense.serve import BATCH_PIXELS, ModelWorker

    class Recorder:
        batches = []

        def predict_batch(self, images, vocabularies):
            self.batches.append([image.shape[0] for image in images])
            return vocabularies
    worker = ModelWorker(Recorder(), batch=8)
    started, release = threading.Event(), threading.Event()
    worker.call(lambda: started.set() or release.wait())
    assert started.wait(timeout=5)
    big = int((BATCH_PIXELS * 0.6) ** 0.5)  # two of these pass the budget
    sides = [big, big, 10, 10, big]
    futures = [worker.segment(np.zeros((side, side, 3), np.uint8), "red", {}, lambda r: r) for side in sides]
    release.set()
    assert all(f.result(timeout=5) == "red" for f in futures)
    assert Recorder.batches == [[big], [big, 10, 10], [big]]
    worker.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the SystemExit below
def test_the_worker_outlives_closes_exits_and_cancelled_jobs():
    import threading

    from ovdense.serve import ModelWorker
    worker = ModelWorker(None, batch=4)
    worker.close()  # before any job (an app whose lifespan ended unused): nothing is left to stop a later thread
    assert worker.call(lambda: 1).result(timeout=5) == 1
    worker.close()
    worker.close()
    assert worker.call(lambda: 2).result(timeout=5) == 2

    def leave():
        raise SystemExit(3)
    assert isinstance(worker.call(leave).exception(timeout=5), SystemExit)  # settled, though the thread ended
    assert worker.call(lambda: 4).result(timeout=5) == 4  # a new thread took over
    started, release = threading.Event(), threading.Event()
    busy = worker.call(lambda: started.set() or release.wait())
    assert started.wait(timeout=5)
    waiting = worker.segment(np.zeros((4, 4, 3), np.uint8), "red", {}, lambda result: result)
    assert waiting.cancel() and len(worker.pending) == 0  # a timed-out request's job leaves the line at once
    release.set()
    assert busy.result(timeout=5) is True
    worker.close()


def test_a_full_queue_gets_503_and_a_timed_out_request_504_and_its_work_is_dropped(predictor, scene):
    import threading
    import time
    slow = _Slow(predictor, 2.0)
    live = _Live(create_app(slow, DESCRIBED, queue=1, timeout=0.8, batch=1))
    png, results = _png(scene), {}

    def post(name, classes):
        results[name] = _post_segment(live.url, png, classes)
    try:
        first = threading.Thread(target=post, args=("first", "red"))
        first.start()
        time.sleep(0.3)  # the first runs (2 s, so it times out at 0.8 s); the second waits behind it
        second = threading.Thread(target=post, args=("second", "blue"))
        second.start()
        time.sleep(0.3)
        third = _post_segment(live.url, png, "green")  # one running, one waiting: the line is full
        first.join(), second.join()
        time.sleep(2.5)  # the first's work has ended; had the second's not been dropped, it would have run
    finally:
        live.stop()
    assert third.status_code == 503 and "waiting" in third.json()["error"]
    for name in ("first", "second"):
        assert results[name].status_code == 504 and "longer than 0.8 s" in results[name].json()["error"]
    assert slow.batches == [["red"]]


def test_the_cli_serves_until_sigterm_and_reports_a_taken_port(scene, tmp_path):
    """`ovdense serve` runs the models on its main thread and uvicorn beside it: it answers, writes nothing (its
    text cache stays in memory), stops cleanly on SIGTERM, and a port already taken ends it with uvicorn's error and
    exit status 1."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "ovdense.cli", "serve", "--port", str(port), "--detector", "none",
                   "--max-megapixels", "0.02"]
        refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "address already in use" in refused.stderr
    cache = tmp_path / "cache"
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OVDENSE_CACHE_DIR": str(cache)})
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        response = _post_segment(f"http://127.0.0.1:{port}", _png(scene), "sky, grass, a word never seen")
        assert response.status_code == 200 and response.json()["model"] == "ovdense-tiny-vit"
        assert response.json()["method"] == "maskclip"  # as `segment`: training-free, any words (its text cached)
        big = _post_segment(f"http://127.0.0.1:{port}", _png(np.zeros((150, 150, 3), np.uint8)))
        assert big.status_code == 400 and "over the limit of" in big.json()["error"]  # --max-megapixels 0.02
        assert not cache.exists() or not any(cache.iterdir())
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err


def test_a_method_named_on_the_shipped_clip_gets_its_shipped_checkpoint():
    from ovdense.cli import build_parser
    from ovdense.cli.build import use_shipped_method
    args = build_parser().parse_args(["serve", "--method", "denseclip"])
    assert use_shipped_method(args).name == args.method == "denseclip" and args.checkpoint.endswith(".safetensors")
    args = build_parser().parse_args(["serve", "--method", "maskclip"])
    assert use_shipped_method(args).name == args.method == "maskclip" and args.checkpoint is None
    args = build_parser().parse_args(["serve", "--model", "ViT-B-16", "--weights", "openai", "--method", "tcl"])
    assert use_shipped_method(args) is None and args.checkpoint is None


def test_large_uploads_stay_in_memory(predictor, monkeypatch):
    """Starlette would spool an upload over 1 MB to a temporary file: the app keeps it in memory."""
    import tempfile
    rolled = []
    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", lambda self: rolled.append(self))
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    png = _png(noise)
    assert len(png) > 1024 * 1024
    response = TestClient(create_app(predictor, DESCRIBED)).post("/v1/segment", files={"image": ("n.png", png)},
                                                                 data={"classes": "red, blue"})
    assert response.status_code == 200 and response.json()["width"] == 700
    assert rolled == []
