"""`ovdense serve`: segmentation (and detection, grounding) over HTTP; the app itself is `ovdense.serve`. Beyond
loopback an --api-key is required."""
from __future__ import annotations

from ..catalog import DETECTION_METHODS
from ..errors import UsageError
from .build import (build_detection_predictor, build_predictor, check_model_options, describe, detector_args,
                    use_shipped_method)
from .options import add_model_options, command_parser


def add_parser(sub):
    parser = command_parser(sub, "serve", "serve segmentation over HTTP (FastAPI)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (beyond loopback needs --api-key)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="bearer token required on /v1 requests")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads get 413")
    parser.add_argument("--queue", type=int, default=16, help="requests that may wait for the model (more get 503)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a request may wait and run (then 504)")
    parser.add_argument("--max-classes", type=int, default=1500, help="names a request may give, synonyms included")
    parser.add_argument("--max-megapixels", type=float, default=80.0,
                        help="larger images get 400 (an 80 MP image takes about 4.6 GB at its peak)")
    parser.add_argument("--detector", choices=("none",) + DETECTION_METHODS, default="glip",
                        help="the detector behind /v1/detect (and, glip, /v1/ground)")
    parser.add_argument("--detector-checkpoint", help="its trained file (default: the one shipped, --detector-weights "
                                                      "synthetic)")
    parser.add_argument("--detector-weights", help="'synthetic' (shipped) or CLIP weights for a --detector-checkpoint")
    add_model_options(parser)
    return parser


def _check(args) -> None:
    """The serving options; a host beyond loopback without --api-key is refused."""
    import ipaddress
    if (args.port < 0 or args.port > 65535 or args.queue < 0 or args.timeout <= 0 or args.max_upload_mb <= 0
            or args.max_classes < 1 or args.max_megapixels <= 0):
        raise UsageError("--port must be 0-65535, --queue >= 0, --timeout, --max-upload-mb and --max-megapixels > 0, "
                         "--max-classes >= 1")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not args.api_key:
        raise UsageError(f"--host {args.host} is reachable beyond this machine: give --api-key KEY (clients send "
                         "'Authorization: Bearer KEY')")


def _models(args) -> tuple:
    """(segmentation predictor, its description, detector or None, its description or None)."""
    check_model_options(args)
    if args.method:  # a method named on the shipped tiny CLIP: its shipped checkpoint (default: maskclip, any words)
        use_shipped_method(args)
    args.no_cache = True  # the text cache stays in memory: nothing a request sends reaches the disk
    predictor = build_predictor(args)
    described = {**describe(predictor), "preset": args.preset, "device": str(predictor.device)}
    detector = detector_described = None
    if args.detector != "none":
        weights = args.detector_weights or (None if args.detector_checkpoint else "synthetic")
        detector, detector_described = build_detection_predictor(
            detector_args(args, args.detector, checkpoint=args.detector_checkpoint, weights=weights))
    for model in (predictor, detector):
        if model is not None:
            model.max_pixels = int(args.max_megapixels * 1e6)
    return predictor, described, detector, detector_described


def run(args) -> int:
    import signal
    import threading
    _check(args)
    try:
        import uvicorn

        from ..serve import ModelWorker, create_app
    except ImportError as error:
        raise UsageError("ovdense serve needs FastAPI and uvicorn: pip install 'ovdense[serve]'") from error
    predictor, described, detector, detector_described = _models(args)
    worker = ModelWorker(predictor, args.batch_size, own_thread=False)  # the models run here, where they loaded
    app = create_app(predictor, described, api_key=args.api_key, max_upload=int(args.max_upload_mb * 1024 * 1024),
                     queue=args.queue, timeout=args.timeout, max_classes=args.max_classes, detector=detector,
                     detector_described=detector_described, worker=worker)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn, off the main thread, leaves the signals to us
        signal.signal(sig, server.handle_exit)

    def serve() -> None:
        try:
            server.run()
        finally:  # also when the server could not start (the port taken): the worker must not wait forever
            worker.close()
    serving = threading.Thread(target=serve, name="ovdense-http")
    serving.start()
    try:
        print(f"serving {described['method']} on {described['model']} at http://{args.host}:{args.port} "
              "(docs at /docs)", flush=True)
        worker.run()  # until the server's shutdown closes the worker, after the requests in flight
    finally:  # the worker ended otherwise: the server must not go on without it
        server.should_exit = True
        serving.join()
    return 0 if server.started else 1
