"""A request's inputs, parsed and checked before it waits for the model: a bad one gets 400 (or, too large, 413)
with a JSON {"error": ...} body. Uploads over `max_upload` bytes get 413 before the rest is read."""
from __future__ import annotations

from fastapi import Request, UploadFile

from ..data.images import load_image
from ..detection.grounding import split_phrases
from ..errors import InputError
from ..text import Vocabulary, resolve_templates
from .replies import HTTPError, error_reply

MAX_UPLOAD = 20 * 1024 * 1024
MAX_PAMR = 50  # PAMR iterations a request may ask for (the papers use 10)
MAX_CLASSES = 1500  # names a request may give (LVIS has 1203)


def upload_limit(max_upload: int):
    """HTTP middleware: 413 for an upload whose Content-Length is over `max_upload` bytes, before it is read."""
    async def limit_upload(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_upload:
            return error_reply(f"the upload is {int(length)} bytes; at most {max_upload} are accepted", 413)
        return await call_next(request)
    return limit_upload


async def read_upload(image: UploadFile, max_upload: int) -> bytes:
    """The uploaded file's bytes; 413 when over `max_upload`."""
    data = await image.read(max_upload + 1)
    if len(data) > max_upload:
        raise HTTPError(413, f"the upload is over {max_upload} bytes")
    return data


def rgb_of(data: bytes, model):
    """The upload as (H, W, 3) uint8 RGB, refused from its header when over `model`'s pixel limit."""
    limit = getattr(model, "max_pixels", None)
    return load_image(data, **({"max_pixels": limit} if limit else {}))


def vocabulary_of(classes: str, max_classes: int) -> Vocabulary:
    """The Vocabulary of free-text `classes` ('sky, grass; lawn'), of at most `max_classes` names."""
    try:
        vocabulary = Vocabulary.parse(classes)
    except ValueError as error:
        raise InputError(f"classes: {error}") from error
    if len(vocabulary.queries) > max_classes:  # their text embeddings would hold the model for long
        raise InputError(f"classes: {len(vocabulary.queries)} names (synonyms included); this server takes at "
                         f"most {max_classes} (ovdense serve --max-classes)")
    return vocabulary


def overrides_of(predictor, **given) -> dict:
    """The protocol fields a request sets, checked here against `predictor`'s protocol: a bad one gets 400 before it
    waits."""
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


def check_threshold(threshold: float) -> None:
    """400 unless a detection score threshold is in [0, 1)."""
    if not 0 <= threshold < 1:
        raise HTTPError(400, f"threshold must be in [0, 1), got {threshold}")


def phrases_of(phrases: str | None) -> list[str] | None:
    """The phrases a request names, separated by ';' (None: the caption's noun phrases); 400 when it names none."""
    wanted = None if phrases is None else split_phrases(phrases)
    if wanted == []:
        raise HTTPError(400, "phrases is empty: give phrases of the caption separated by ';', or leave it out")
    return wanted
