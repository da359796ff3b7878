"""`ovdense serve`: segmentation over HTTP (FastAPI on uvicorn: the maintained ASGI pair with OpenAPI docs at /docs).

The model loads once; requests share it and its text-embedding cache (in memory: requests write nothing to disk).
One thread (`ModelWorker`) runs the models; requests decode their image in their own thread and queue for it, and
the segmentation requests that wait together run as one batch through the image encoder. At most `queue` requests
wait: more get 503 at once instead of piling up in memory; a request that waits and runs longer than `timeout` gets
504, and if its turn had not come its work is dropped. Uploads over `max_upload` bytes get 413 before the rest is
read. Bad images and vocabularies get 4xx with a JSON {"error": ...} body. Nothing a request sends is written to
disk, and no request names a file.
"""
from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections import deque
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.formparsers import MultiPartParser

from .data.images import load_image
from .detection.grounding import split_phrases
from .errors import InputError, UsageError
from .text import Vocabulary, resolve_templates
from .visualize import class_colours, display_scale

PAGE = Path(__file__).resolve().parent / "static" / "index.html"

MAX_UPLOAD = 20 * 1024 * 1024
MAX_PAMR = 50  # PAMR iterations a request may ask for (the papers use 10)
MAX_CLASSES = 1500  # names a request may give (LVIS has 1203)
BATCH_PIXELS = 4_000_000  # a batch takes along images while their pixels stay under this (a larger one runs alone)


@dataclass(eq=False)
class _Job:
    """Model work: work() alone, or, with `rgb`, work(SegmentationResult of rgb, vocabulary and overrides)."""

    future: Future
    work: Callable
    rgb: np.ndarray | None = None
    vocabulary: Vocabulary | None = None
    overrides: dict | None = None

    @property
    def pixels(self) -> int:
        return self.rgb.shape[0] * self.rgb.shape[1]

    def joins(self, first: "_Job") -> bool:
        """Whether this job can run in the segmentation batch that `first` starts."""
        return self.rgb is not None and self.overrides == first.overrides


class ModelWorker:
    """The one thread that runs the models, taking jobs in arrival order. A segmentation job takes along the other
    segmentation jobs waiting with the same options (ahead of any other work) into one `predict_batch` of at most
    `batch` images and BATCH_PIXELS pixels; other work runs alone. A job cancelled before its turn leaves the line
    at once.

    own_thread: start a thread for `run` at the first job; False: the caller runs `run` itself, best in the thread
    that loaded the model (libgomp keeps a thread pool per calling thread; a second pool on few cores makes every
    small torch operation wait for a sleeping thread: 3x slower on 2 cores)."""

    def __init__(self, predictor, batch: int, own_thread: bool = True):
        if batch < 1:
            raise UsageError(f"batch must be at least 1, got {batch}")
        self.predictor, self.batch, self.own_thread = predictor, batch, own_thread
        self.pending: deque[_Job | None] = deque()  # None: stop
        self.ready = threading.Condition()
        self.thread: threading.Thread | None = None

    def segment(self, rgb, vocabulary, overrides: dict, finish) -> Future:
        """A future finish(SegmentationResult of (H, W, 3) uint8 `rgb`), finish run on the worker's thread;
        overrides: Protocol fields for `predict`."""
        return self._submit(_Job(Future(), finish, rgb, vocabulary, overrides))

    def call(self, work) -> Future:
        """A future of work(), run alone on the worker's thread."""
        return self._submit(_Job(Future(), work))

    def run(self) -> None:
        """Run jobs in the calling thread until `close`."""
        while (group := self._next()) is not None:
            group = [job for job in group if job.future.set_running_or_notify_cancel()]
            try:
                if group and group[0].rgb is None:
                    _settle(group[0].future, group[0].work)
                elif group:
                    self._segment(group)
            except BaseException as error:  # SystemExit, KeyboardInterrupt: no request is left waiting for ever
                with self.ready:
                    if self.thread is threading.current_thread():  # this thread ends: the next job starts another
                        self.thread = None
                        if self.pending:
                            self._start()
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(error)
                raise

    def close(self) -> None:
        """Finish the jobs already queued, then stop `run`."""
        with self.ready:
            if self.own_thread and not self._running():
                return
            self.pending.append(None)
            self.ready.notify()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def _running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="ovdense-model", daemon=True)
        self.thread.start()

    def _next(self) -> list[_Job] | None:
        """The next job and, for segmentation, the jobs it takes along; None when closed."""
        with self.ready:
            while not self.pending:
                self.ready.wait()
            first = self.pending.popleft()
            if first is None:
                return None
            group = [first]
            if first.rgb is None:
                return group
            pixels = first.pixels
            for job in list(self.pending):
                if len(group) == self.batch:
                    break
                if job is not None and job.joins(first):
                    if pixels + job.pixels > BATCH_PIXELS:
                        break
                    pixels += job.pixels
                    group.append(job)
                    self.pending.remove(job)
            return group

    def _submit(self, job: _Job) -> Future:
        job.future.add_done_callback(lambda future: self._forget(job) if future.cancelled() else None)
        with self.ready:
            if self.own_thread and not self._running():
                self._start()
            self.pending.append(job)
            self.ready.notify()
        return job.future

    def _forget(self, job: _Job) -> None:
        """A cancelled job leaves the line (and its image the memory) at once."""
        with self.ready:
            if job in self.pending:
                self.pending.remove(job)

    def _segment(self, group: list[_Job]) -> None:
        overrides = group[0].overrides
        try:
            results = self.predictor.predict_batch([job.rgb for job in group], [job.vocabulary for job in group],
                                                   **overrides)
        except Exception as error:
            if len(group) == 1:
                group[0].future.set_exception(error)
                return
            for job in group:  # one bad job must not fail the others: each alone
                _settle(job.future, lambda: job.work(
                    self.predictor.predict_batch([job.rgb], [job.vocabulary], **overrides)[0]))
            return
        for job, result in zip(group, results):
            _settle(job.future, lambda: job.work(result))


def _settle(future: Future, work) -> None:
    try:
        future.set_result(work())
    except Exception as error:
        future.set_exception(error)


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

    app = FastAPI(title="ovdense", description="Open-vocabulary segmentation", version="1", lifespan=lifespan)
    # Starlette spools uploads over 1 MB to a temporary file; keep them in memory (process-wide: a class attribute)
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, max_upload + 1)
    waiting = asyncio.Semaphore(queue + 1)

    class HTTPError(Exception):
        def __init__(self, status: int, message: str):
            self.status, self.message = status, message

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, error: HTTPError):
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, error: InputError):
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, problem['loc'][1:]))}: {problem['msg']}"
                             for problem in error.errors())
        return JSONResponse({"error": problems}, status_code=422)

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
            vocabulary = Vocabulary.parse(classes)
        except ValueError as error:
            raise InputError(f"classes: {error}") from error
        if len(vocabulary.queries) > max_classes:  # their text embeddings would hold the model for long
            raise InputError(f"classes: {len(vocabulary.queries)} names (synonyms included); this server takes at "
                             f"most {max_classes} (ovdense serve --max-classes)")
        return vocabulary

    def overrides_of(**given) -> dict:
        """The protocol fields a request sets, checked here: a bad one gets 400 before it waits."""
        overrides = {key: value for key, value in given.items() if value is not None}
        if overrides.get("pamr_iterations", 0) > MAX_PAMR:  # running work cannot be stopped: bound it
            raise InputError(f"pamr: at most {MAX_PAMR} iterations, got {overrides['pamr_iterations']}")
        try:
            if "templates" in overrides:
                resolve_templates(overrides["templates"])
            predictor.protocol.updated(**overrides)
        except ValueError as error:
            raise InputError(str(error)) from error
        return overrides

    def rgb_of(data: bytes, model):
        """The upload as (H, W, 3) uint8 RGB, refused from its header when over `model`'s pixel limit."""
        limit = getattr(model, "max_pixels", None)
        return load_image(data, **({"max_pixels": limit} if limit else {}))

    def answer(result, about: dict, picture: bool) -> dict:
        colours = ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in class_colours(list(result.class_names))]
        out = {**about, **result.summary(), "colours": colours}  # the pictures' class colours, for a legend
        if picture:
            buffer = io.BytesIO()
            result.plot().save(buffer, format="PNG")
            out["overlay_png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
            out["overlay_scale"] = display_scale(out["height"], out["width"])  # picture pixels per image pixel
        return out

    def grounded(rgb, caption: str, phrases: list[str] | None):
        detector.set_image(rgb)
        return detector.ground(caption, phrases)

    async def run(data: bytes, model, about: dict, overlay: bool, submit) -> dict:
        """Decode `data` here and have the worker run submit(rgb, finish) -> Future: the model and the answer
        (finish: result -> JSON dict, on the worker's thread, as it uses torch). 503 when the line is full, 504
        past `timeout`."""
        if waiting.locked():
            raise HTTPError(503, "too many requests are waiting; try again shortly")

        async def serve_one() -> dict:
            rgb = await asyncio.to_thread(rgb_of, data, model)
            # cancelled on timeout: dropped if its turn has not come
            return await asyncio.wrap_future(submit(rgb, lambda result: answer(result, about, overlay)))
        async with waiting:
            try:
                return await asyncio.wait_for(serve_one(), timeout)
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
    async def segment(image: UploadFile = File(...), classes: str = Form(...), overlay: bool = Form(False),
                      templates: str | None = Form(None), logit_scale: float | None = Form(None),
                      pamr: int | None = Form(None), background_threshold: float | None = Form(None),
                      area_threshold: float | None = Form(None)) -> dict:
        """Segment an uploaded image with free-text classes ('sky, grass; lawn'): the JSON of `ovdense segment`
        (segments with COCO RLE masks) and, with overlay=true, the overlay as a base64 PNG. The other fields change
        the server's protocol for this request, as `segment`'s options of the same names."""
        overrides = overrides_of(templates=templates, logit_scale=logit_scale, pamr_iterations=pamr,
                                 background_threshold=background_threshold, area_threshold=area_threshold)
        vocabulary, data = vocabulary_of(classes), await read(image)
        return await run(data, predictor, described, overlay,
                         lambda rgb, finish: worker.segment(rgb, vocabulary, overrides, finish))

    @app.post("/v1/detect", dependencies=[Depends(authorised)])
    async def detect(image: UploadFile = File(...), classes: str = Form(...), threshold: float = Form(0.3),
                     overlay: bool = Form(False)) -> dict:
        """Boxes of free-text classes: the JSON of `ovdense detect` and, with overlay=true, the box drawing."""
        if detector is None:
            raise HTTPError(404, "this server has no detector: start it with --detector")
        check_threshold(threshold)
        vocabulary, data = vocabulary_of(classes), await read(image)
        return await run(data, detector, detector_described, overlay, lambda rgb, finish: worker.call(
            lambda: finish(detector(rgb, vocabulary).above(threshold))))

    @app.post("/v1/ground", dependencies=[Depends(authorised)])
    async def ground(image: UploadFile = File(...), caption: str = Form(...), phrases: str | None = Form(None),
                     threshold: float = Form(0.3), overlay: bool = Form(False)) -> dict:
        """Boxes of a caption's phrases (its noun phrases, or `phrases` separated by ';'): the JSON of
        `ovdense ground` and, with overlay=true, the box drawing."""
        if detector is None or not hasattr(detector, "ground"):
            raise HTTPError(404, "this server has no grounding detector: start it with --detector glip")
        check_threshold(threshold)
        wanted = None if phrases is None else split_phrases(phrases)
        if wanted == []:
            raise HTTPError(400, "phrases is empty: give phrases of the caption separated by ';', or leave it out")
        data = await read(image)
        return await run(data, detector, detector_described, overlay, lambda rgb, finish: worker.call(
            lambda: finish(grounded(rgb, caption, wanted).above(threshold))))

    return app
