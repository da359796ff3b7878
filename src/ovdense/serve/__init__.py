"""`ovdense serve`: segmentation over HTTP (FastAPI on uvicorn: the maintained ASGI pair with OpenAPI docs at /docs).

The model loads once; requests share it and its text-embedding cache (in memory). Nothing a request sends is
written to disk, and no request names a file. The parts:
- `app`: `create_app` and its routes (/, /healthz, /v1/models, /v1/segment, /v1/detect, /v1/ground); at most `queue`
  requests wait (more get 503 at once), and one that waits and runs longer than `timeout` gets 504 (its work is
  dropped if its turn had not come).
- `worker`: `ModelWorker`, the one thread that runs the models, batching the segmentation requests that wait together.
- `inputs`: a request's upload, vocabulary and options, parsed and checked against the limits before it waits.
- `replies`: the JSON answers, and the JSON {"error": ...} body of every refusal.
"""
from .app import create_app
from .worker import BATCH_PIXELS, ModelWorker

__all__ = ["BATCH_PIXELS", "ModelWorker", "create_app"]
