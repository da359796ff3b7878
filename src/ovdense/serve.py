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

from fastapi import Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError

from .errors import InputError
from .text import Vocabulary

MAX_UPLOAD = 20 * 1024 * 1024


def create_app(predictor, described: dict, api_key: str | None = None, max_upload: int = MAX_UPLOAD,
               queue: int = 16, timeout: float = 120.0):
    """The ASGI app around a SegmentationPredictor. described: what /v1/models reports (model, weights, method,
    preset, device). api_key: a bearer token every /v1 request must carry (None: none needed)."""
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

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def models() -> dict:
        return described

    def segment_bytes(data: bytes, classes: str, overlay: bool) -> dict:
        try:
            vocabulary = Vocabulary.parse(classes)
        except ValueError as error:
            raise InputError(f"classes: {error}") from error
        try:
            image = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError) as error:
            raise InputError("the upload is not an image that can be read") from error
        with model_lock:
            result = predictor(image, vocabulary)
        out = {**described, **result.summary(rle=True)}
        if overlay:
            buffer = io.BytesIO()
            result.plot().save(buffer, format="PNG")
            out["overlay_png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
        return out

    @app.post("/v1/segment", dependencies=[Depends(authorised)])
    async def segment(image: UploadFile = File(...), classes: str = Form(...), overlay: bool = Form(False)) -> dict:
        """Segment an uploaded image with free-text classes ('sky, grass; lawn'): the JSON of `ovdense segment`
        (segments with COCO RLE masks) and, with overlay=true, the overlay as a base64 PNG."""
        data = await image.read(max_upload + 1)
        if len(data) > max_upload:
            raise HTTPError(413, f"the upload is over {max_upload} bytes")
        if waiting.locked():
            raise HTTPError(503, "too many requests are waiting; try again shortly")
        async with waiting:
            try:
                return await asyncio.wait_for(asyncio.to_thread(segment_bytes, data, classes, overlay), timeout)
            except InputError as error:
                raise HTTPError(400, str(error)) from error
            except asyncio.TimeoutError as error:
                raise HTTPError(504, f"the request took longer than {timeout:g} s") from error

    return app
