"""`ovdense serve`: segmentation over HTTP (FastAPI on uvicorn: the maintained ASGI pair with OpenAPI docs at /docs).

The model loads once; requests share it and its text-embedding cache. Inference runs off the event loop, one
request at a time on the model (a CPU model is not faster in parallel), with at most `queue` requests waiting: more
get 503 at once instead of piling up in memory; a request that waits and runs longer than `timeout` gets 504.
Uploads over `max_upload` bytes get 413 before the rest is read. Bad images and vocabularies get 4xx with a JSON
{"error": ...} body. Nothing a request sends is written to disk, and no request names a file.
"""
from __future__ import annotations

import asyncio
import base64
import io
import threading
from pathlib import Path

from fastapi import Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError

from .detection.grounding import split_phrases
from .errors import InputError
from .text import Vocabulary
from .visualize import class_colours

PAGE = Path(__file__).resolve().parent / "static" / "index.html"

MAX_UPLOAD = 20 * 1024 * 1024


def create_app(predictor, described: dict, api_key: str | None = None, max_upload: int = MAX_UPLOAD,
               queue: int = 16, timeout: float = 120.0, detector=None, detector_described: dict | None = None):
    """The ASGI app around a SegmentationPredictor. described: what /v1/models reports (model, weights, method,
    preset, device). api_key: a bearer token every /v1 request must carry (None: none needed). detector: a
    DetectionPredictor or GroundingPredictor for /v1/detect (and, a GroundingPredictor, /v1/ground)."""
    app = FastAPI(title="ovdense", description="Open-vocabulary segmentation", version="1")
    model_lock = threading.Lock()
    waiting = asyncio.Semaphore(queue + 1)

    class HTTPError(Exception):
        def __init__(self, status: int, message: str):
            self.status, self.message = status, message

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, error: HTTPError):
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.middleware("http")
    async def _limit_upload(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_upload:
            return JSONResponse({"error": f"the upload is {int(length)} bytes; at most {max_upload} are accepted"},
                                status_code=413)
        return await call_next(request)

    def authorised(authorization: str | None = Header(default=None)) -> None:
        if api_key is not None and authorization != f"Bearer {api_key}":
            raise HTTPError(401, "a valid 'Authorization: Bearer <key>' header is required")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        """The browser page: drop an image, type classes or a caption, see the picture with a legend."""
        return PAGE.read_text(encoding="utf-8")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def models() -> dict:
        return {**described, "detector": detector_described}

    def vocabulary_of(classes: str):
        try:
            return Vocabulary.parse(classes)
        except ValueError as error:
            raise InputError(f"classes: {error}") from error

    def image_of(data: bytes):
        """The upload opened lazily (its pixels are decoded by the predictor, which refuses over-large images from
        their header)."""
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise InputError(f"the image is too large to read ({error})") from error
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            raise InputError("the upload is not an image that can be read") from error

    def answer(result, about: dict, picture: bool) -> dict:
        colours = ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in class_colours(list(result.class_names))]
        out = {**about, **result.summary(), "colours": colours}  # the pictures' class colours, for a legend
        if picture:
            buffer = io.BytesIO()
            result.plot().save(buffer, format="PNG")
            out["overlay_png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
        return out

    def segment_bytes(data: bytes, classes: str, overlay: bool) -> dict:
        vocabulary, image = vocabulary_of(classes), image_of(data)
        with model_lock:
            result = predictor(image, vocabulary)
        return answer(result, described, overlay)

    def detect_bytes(data: bytes, classes: str, threshold: float, overlay: bool) -> dict:
        vocabulary, image = vocabulary_of(classes), image_of(data)
        with model_lock:
            result = detector(image, vocabulary).above(threshold)
        return answer(result, detector_described, overlay)

    def ground_bytes(data: bytes, caption: str, phrases: str | None, threshold: float, overlay: bool) -> dict:
        wanted = None if phrases is None else split_phrases(phrases)
        image = image_of(data)
        with model_lock:
            detector.set_image(image)
            result = detector.ground(caption, wanted).above(threshold)
        return answer(result, detector_described, overlay)

    async def run(work, *args) -> dict:
        if waiting.locked():
            raise HTTPError(503, "too many requests are waiting; try again shortly")
        async with waiting:
            try:
                return await asyncio.wait_for(asyncio.to_thread(work, *args), timeout)
            except InputError as error:
                raise HTTPError(400, str(error)) from error
            except asyncio.TimeoutError as error:
                raise HTTPError(504, f"the request took longer than {timeout:g} s") from error

    async def read(image: UploadFile) -> bytes:
        data = await image.read(max_upload + 1)
        if len(data) > max_upload:
            raise HTTPError(413, f"the upload is over {max_upload} bytes")
        return data

    def check_threshold(threshold: float) -> None:
        if not 0 <= threshold < 1:
            raise HTTPError(400, f"threshold must be in [0, 1), got {threshold}")

    @app.post("/v1/segment", dependencies=[Depends(authorised)])
    async def segment(image: UploadFile = File(...), classes: str = Form(...), overlay: bool = Form(False)) -> dict:
        """Segment an uploaded image with free-text classes ('sky, grass; lawn'): the JSON of `ovdense segment`
        (segments with COCO RLE masks) and, with overlay=true, the overlay as a base64 PNG."""
        return await run(segment_bytes, await read(image), classes, overlay)

    @app.post("/v1/detect", dependencies=[Depends(authorised)])
    async def detect(image: UploadFile = File(...), classes: str = Form(...), threshold: float = Form(0.3),
                     overlay: bool = Form(False)) -> dict:
        """Boxes of free-text classes: the JSON of `ovdense detect` and, with overlay=true, the box drawing."""
        if detector is None:
            raise HTTPError(404, "this server has no detector: start it with --detector")
        check_threshold(threshold)
        return await run(detect_bytes, await read(image), classes, threshold, overlay)

    @app.post("/v1/ground", dependencies=[Depends(authorised)])
    async def ground(image: UploadFile = File(...), caption: str = Form(...), phrases: str | None = Form(None),
                     threshold: float = Form(0.3), overlay: bool = Form(False)) -> dict:
        """Boxes of a caption's phrases (its noun phrases, or `phrases` separated by ';'): the JSON of
        `ovdense ground` and, with overlay=true, the box drawing."""
        if detector is None or not hasattr(detector, "ground"):
            raise HTTPError(404, "this server has no grounding detector: start it with --detector glip")
        check_threshold(threshold)
        return await run(ground_bytes, await read(image), caption, phrases, threshold, overlay)

    return app
