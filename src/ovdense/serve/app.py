"""The ASGI app: `create_app` and its routes, each a short function over the `Service` its app holds."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.responses import HTMLResponse
from starlette.formparsers import MultiPartParser

from .inputs import (
    MAX_CLASSES,
    MAX_UPLOAD,
    check_threshold,
    overrides_of,
    phrases_of,
    read_upload,
    rgb_of,
    upload_limit,
    vocabulary_of,
)
from .replies import ERROR_REPLIES, HTTPError, answer
from .worker import ModelWorker

PAGE = Path(__file__).resolve().parent.parent / "static" / "index.html"


@dataclass(eq=False)
class Service:
    """What the routes share: the models, the worker that runs them and the limits of a request."""

    predictor: object
    described: dict
    detector: object
    detector_described: dict | None
    worker: ModelWorker
    api_key: str | None
    max_upload: int
    max_classes: int
    timeout: float
    waiting: asyncio.Semaphore  # `queue` waiting requests and the one running

    async def run(self, data: bytes, model, about: dict, overlay: bool, submit) -> dict:
        """Decode `data` here and have the worker run submit(rgb, finish) -> Future: the model and the answer
        (finish: result -> JSON dict, on the worker's thread, as it uses torch). 503 when the line is full (more
        requests do not pile up in memory), 504 past `timeout`."""
        if self.waiting.locked():
            raise HTTPError(503, "too many requests are waiting; try again shortly")

        async def serve_one() -> dict:
            rgb = await asyncio.to_thread(rgb_of, data, model)
            # cancelled on timeout: dropped if its turn has not come
            return await asyncio.wrap_future(submit(rgb, lambda result: answer(result, about, overlay)))
        async with self.waiting:
            try:
                return await asyncio.wait_for(serve_one(), self.timeout)
            except asyncio.TimeoutError as error:
                raise HTTPError(504, f"the request took longer than {self.timeout:g} s") from error

    async def run_detector(self, data: bytes, overlay: bool, threshold: float, detections) -> dict:
        """`run` for the detector: detections(rgb) alone on the worker, the boxes above `threshold` answered."""
        return await self.run(data, self.detector, self.detector_described, overlay, lambda rgb, finish:
                              self.worker.call(lambda: finish(detections(rgb).above(threshold))))


def service_of(request: Request) -> Service:
    """The Service of the app a request reached."""
    return request.app.state.service


Served = Annotated[Service, Depends(service_of)]  # a route's parameter: its app's Service


def authorised(service: Served, authorization: Annotated[str | None, Header()] = None) -> None:
    """401 unless the request carries the server's API key (when it has one)."""
    if service.api_key is not None and authorization != f"Bearer {service.api_key}":
        raise HTTPError(401, "a valid 'Authorization: Bearer <key>' header is required")


async def page() -> str:
    """The browser page: drop an image, type classes or a caption, see the picture with a legend."""
    return PAGE.read_text(encoding="utf-8")


async def healthz() -> dict:
    return {"status": "ok"}


async def models(service: Served) -> dict:
    return {**service.described, "detector": service.detector_described}


async def segment(image: Annotated[UploadFile, File()], classes: Annotated[str, Form()], service: Served,
                  overlay: Annotated[bool, Form()] = False, templates: Annotated[str | None, Form()] = None,
                  logit_scale: Annotated[float | None, Form()] = None, pamr: Annotated[int | None, Form()] = None,
                  background_threshold: Annotated[float | None, Form()] = None,
                  area_threshold: Annotated[float | None, Form()] = None) -> dict:
    """Segment an uploaded image with free-text classes ('sky, grass; lawn'): the JSON of `ovdense segment`
    (segments with COCO RLE masks) and, with overlay=true, the overlay as a base64 PNG. The other fields change
    the server's protocol for this request, as `segment`'s options of the same names."""
    overrides = overrides_of(service.predictor, templates=templates, logit_scale=logit_scale, pamr_iterations=pamr,
                             background_threshold=background_threshold, area_threshold=area_threshold)
    vocabulary, data = vocabulary_of(classes, service.max_classes), await read_upload(image, service.max_upload)
    return await service.run(data, service.predictor, service.described, overlay,
                             lambda rgb, finish: service.worker.segment(rgb, vocabulary, overrides, finish))


async def detect(image: Annotated[UploadFile, File()], classes: Annotated[str, Form()], service: Served,
                 threshold: Annotated[float, Form()] = 0.3, overlay: Annotated[bool, Form()] = False) -> dict:
    """Boxes of free-text classes: the JSON of `ovdense detect` and, with overlay=true, the box drawing."""
    detector = service.detector
    if detector is None:
        raise HTTPError(404, "this server has no detector: start it with --detector")
    check_threshold(threshold)
    vocabulary, data = vocabulary_of(classes, service.max_classes), await read_upload(image, service.max_upload)
    return await service.run_detector(data, overlay, threshold, lambda rgb: detector(rgb, vocabulary))


async def ground(image: Annotated[UploadFile, File()], caption: Annotated[str, Form()], service: Served,
                 phrases: Annotated[str | None, Form()] = None, threshold: Annotated[float, Form()] = 0.3,
                 overlay: Annotated[bool, Form()] = False) -> dict:
    """Boxes of a caption's phrases (its noun phrases, or `phrases` separated by ';'): the JSON of
    `ovdense ground` and, with overlay=true, the box drawing."""
    detector = service.detector
    if detector is None or not hasattr(detector, "ground"):
        raise HTTPError(404, "this server has no grounding detector: start it with --detector glip")
    check_threshold(threshold)
    wanted = phrases_of(phrases)
    data = await read_upload(image, service.max_upload)
    return await service.run_detector(data, overlay, threshold, lambda rgb: _grounded(detector, rgb, caption, wanted))


def _grounded(detector, rgb, caption: str, phrases: list[str] | None):
    """The GroundingPredictor's boxes of `caption`'s phrases in `rgb`."""
    detector.set_image(rgb)
    return detector.ground(caption, phrases)


def create_app(predictor, described: dict, api_key: str | None = None, max_upload: int = MAX_UPLOAD,
               queue: int = 16, timeout: float = 120.0, batch: int = 8, max_classes: int = MAX_CLASSES, detector=None,
               detector_described: dict | None = None, worker: ModelWorker | None = None):
    """The ASGI app around a SegmentationPredictor. described: what /v1/models reports (model, weights, method,
    preset, device). api_key: a bearer token every /v1 request must carry (None: none needed). batch: at most this
    many waiting segmentation requests run together. max_classes: names (synonyms included) a request may give.
    detector: a DetectionPredictor or GroundingPredictor for /v1/detect (and, a GroundingPredictor, /v1/ground).
    worker: the ModelWorker to use (default: one with its own thread)."""
    worker = worker or ModelWorker(predictor, batch)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(worker.close)

    app = FastAPI(title="ovdense", description="Open-vocabulary segmentation", version="1", lifespan=lifespan,
                  exception_handlers=ERROR_REPLIES)
    # Starlette spools uploads over 1 MB to a temporary file; keep them in memory (process-wide: a class attribute):
    # nothing a request sends is written to disk
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, max_upload + 1)
    app.state.service = Service(predictor, described, detector, detector_described, worker, api_key, max_upload,
                                max_classes, timeout, asyncio.Semaphore(queue + 1))
    app.middleware("http")(upload_limit(max_upload))
    keyed = [Depends(authorised)]  # the /v1 routes: the API, behind the API key
    app.get("/", response_class=HTMLResponse, include_in_schema=False)(page)
    app.get("/healthz")(healthz)
    app.get("/v1/models", dependencies=keyed)(models)
    app.post("/v1/segment", dependencies=keyed)(segment)
    app.post("/v1/detect", dependencies=keyed)(detect)
    app.post("/v1/ground", dependencies=keyed)(ground)
    return app
