"""What a request gets back: its answer as JSON, or, refused, a status with a JSON {"error": ...} body (bad images
and vocabularies get 4xx)."""
from __future__ import annotations

import base64
import io

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..errors import InputError
from ..visualize import class_colours, display_scale


class HTTPError(Exception):
    """A refusal: the HTTP status and the message a request gets back."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def error_reply(message: str, status: int) -> JSONResponse:
    """The JSON {"error": message} body every refusal gets."""
    return JSONResponse({"error": message}, status_code=status)


async def _http_error(request: Request, error: HTTPError):
    return error_reply(error.message, error.status)


async def _input_error(request: Request, error: InputError):
    return error_reply(str(error), 400)


async def _invalid_request(request: Request, error: RequestValidationError):
    problems = "; ".join(f"{'.'.join(map(str, problem['loc'][1:]))}: {problem['msg']}"
                         for problem in error.errors())
    return error_reply(problems, 422)


# FastAPI's exception_handlers: HTTPError, bad inputs (400) and FastAPI's own validation (422) as {"error": ...}
ERROR_REPLIES = {HTTPError: _http_error, InputError: _input_error, RequestValidationError: _invalid_request}


def answer(result, about: dict, picture: bool) -> dict:
    """The JSON of a model's `result`: `about` (what /v1/models reports), the result's summary, the class colours of
    its pictures (for a legend) and, with `picture`, its plot as a base64 PNG."""
    colours = ["#{:02x}{:02x}{:02x}".format(*(int(v) for v in c)) for c in class_colours(list(result.class_names))]
    out = {**about, **result.summary(), "colours": colours}  # the pictures' class colours, for a legend
    if picture:
        buffer = io.BytesIO()
        result.plot().save(buffer, format="PNG")
        out["overlay_png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
        out["overlay_scale"] = display_scale(out["height"], out["width"])  # picture pixels per image pixel
    return out
