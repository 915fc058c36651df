"""``normdino serve``: REST API and web viewer for fitted models (normdino.serving)."""

from __future__ import annotations

from normdino.cli.options import add_common, positive_float
from normdino.errors import NormdinoError


def add_parser(sub) -> None:
    """Add the ``serve`` command and its options to the subparsers ``sub``."""
    serve = sub.add_parser("serve", help="REST API and web viewer for fitted models (needs normdino[serve])")
    serve.add_argument("models", nargs="+", metavar="MODEL", help="model files, each as PATH or NAME=PATH")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' on every API call "
                       "(default: the NORMDINO_TOKEN environment variable, which keeps it out of the process list)")
    serve.add_argument("--max-upload-mb", type=float, default=256, help="largest upload in MB (default 256)")
    serve.add_argument("--concurrency", type=int, default=1, help="inferences at once per model (default 1)")
    serve.add_argument("--max-queue", type=int, default=16, help="requests waiting per model before 503 (default 16)")
    serve.add_argument("--result-ttl", type=float, default=600, help="seconds results stay downloadable (default 600)")
    serve.add_argument("--max-results-mb", type=positive_float, default=2048,
                       help="disk the results may take in all; past it the oldest go first (default 2048)")
    serve.add_argument("--max-megapixels", type=positive_float, default=16,
                       help="largest 2D upload in megapixels (default 16; predict's 64 would let one request take GBs)")
    serve.add_argument("--upload-timeout", type=positive_float, default=300,
                       help="seconds an upload may take to arrive (default 300)")
    serve.add_argument("--trusted-host", action="append", default=None, metavar="HOST",
                       help="a Host name this server answers (repeat for several; default: the --host address)")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="a web origin (https://viewer.example.org) whose pages may call the API (default: none)")
    serve.add_argument("--device", default="cpu")
    add_common(serve)


def run(args) -> int:
    import os

    try:
        from normdino.serving.app import serve
        from normdino.serving.settings import MB, ServeSettings
    except ImportError as err:
        raise NormdinoError(f'normdino serve needs FastAPI and uvicorn: pip install "normdino[serve]" ({err})') from None
    # An empty --token or NORMDINO_TOKEN is refused by ServeSettings (it would silently turn authentication off).
    token = args.token if args.token is not None else os.environ.get("NORMDINO_TOKEN")
    settings = ServeSettings(max_upload_bytes=int(args.max_upload_mb * MB), concurrency=args.concurrency,
                             max_queue=args.max_queue, result_ttl_s=args.result_ttl,
                             max_results_bytes=int(args.max_results_mb * MB),
                             max_image_pixels=int(args.max_megapixels * 1e6), body_timeout_s=args.upload_timeout,
                             trusted_hosts=tuple(args.trusted_host) if args.trusted_host else None,
                             cors_origins=tuple(args.cors_origin), token=token)
    serve(args.models, host=args.host, port=args.port, settings=settings, device=args.device,
          log_level="warning" if args.quiet else "debug" if args.verbose else "info")
    return 0
