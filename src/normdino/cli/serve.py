"""``normdino serve``: REST API and web viewer for fitted models (normdino.serving)."""

from __future__ import annotations

from normdino.cli.options import add_common
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
    serve.add_argument("--device", default="cpu")
    add_common(serve)


def run(args) -> int:
    import os

    try:
        from normdino.serving.app import serve
        from normdino.serving.settings import MB, ServeSettings
    except ImportError as err:
        raise NormdinoError(f'normdino serve needs FastAPI and uvicorn: pip install "normdino[serve]" ({err})') from None
    settings = ServeSettings(max_upload_bytes=int(args.max_upload_mb * MB), concurrency=args.concurrency,
                             max_queue=args.max_queue, result_ttl_s=args.result_ttl,
                             token=args.token or os.environ.get("NORMDINO_TOKEN") or None)
    serve(args.models, host=args.host, port=args.port, settings=settings, device=args.device,
          log_level="warning" if args.quiet else "debug" if args.verbose else "info")
    return 0
