"""The FastAPI application: health, models, predict, result downloads, and the viewer at ``/``.

Every error a client can cause is a 4xx JSON body ``{"error": "<one sentence>", "status": <code>}``; an
unexpected failure is a 500 with a sentence and no traceback, and the server keeps serving. Inference runs
in worker threads behind a per-model semaphore, so the event loop (and ``/health``) stays free.
Nothing about an upload (its name, its content, its headers) is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import secrets
import time
import traceback
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from normdino import __version__
from normdino.errors import NormdinoError
from normdino.io.rendering import colormap_lut
from normdino.serving.logs import withhold_patient_data
from normdino.serving.models import ServedModel, release_memory, run_prediction
from normdino.serving.results import ResultStore, discard
from normdino.serving.settings import LOOPBACK_NAMES, MB, ServeSettings
from normdino.serving.uploads import UploadError, check_upload, copy_limited

log = logging.getLogger("normdino.serving")

STATIC = Path(__file__).parent / "static"
_MULTIPART_SLACK = 64 * 1024  # form boundaries and part headers around the file
_TOKEN_SENTENCE = "This server needs a token: send the header 'Authorization: Bearer <token>'."
# The viewer loads nothing from elsewhere and runs no inline script; it may not be framed by another site.
VIEWER_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                             "frame-ancestors 'none'; base-uri 'none'",
                  "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
# Results are patient data: never cached by a browser or proxy, never sniffed into another type.
NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
_MEDIA_TYPES = {".png": "image/png", ".gz": "application/gzip", ".csv": "text/csv", ".json": "application/json",
                ".npy": "application/octet-stream", ".u8": "application/octet-stream",
                ".u16": "application/octet-stream", ".dcm": "application/dicom"}


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The one error shape of this API."""
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def public_message(err: Exception, *folders: Path) -> str:
    """An error's sentence with the server's temporary paths replaced by words, first letter capitalised."""
    message = str(err)
    for folder in folders:
        message = re.sub(re.escape(str(folder)) + r"[^\s:,;()'\"]*", "the uploaded file", message)
    message = message.replace("Image the uploaded file", "The uploaded image").strip()
    message = message or "The upload could not be processed."
    return message[0].upper() + message[1:]


# A refused body up to this much (past the upload limit) is read and dropped after the answer, so that the client,
# still sending, reads the answer instead of a reset connection; larger ones are cut off. Strangers (no token,
# another origin) get far less.
_LINGER_BYTES = 64 * MB
_STRANGER_LINGER_BYTES = 1 * MB
# Paths anyone may fetch: the viewer and the API's documentation. Everything else needs the token when one is set.
_PUBLIC = ("/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def _is_public(path: str) -> bool:
    return path in _PUBLIC or path.startswith("/static/")


def forget(err: BaseException) -> BaseException:
    """Drop the frames an error's chain holds (and their locals: decoded arrays, inflated buffers), so that
    they are freed when the request ends, not at some later garbage collection (a traceback's frames and the
    exception they hold form reference cycles)."""
    seen = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if link.__traceback__ is not None:
            traceback.clear_frames(link.__traceback__)
            link.__traceback__ = None
        link = link.__cause__ or link.__context__
    err.__cause__ = err.__context__ = None
    return err


def upload_name(filename: str | None) -> str:
    """The upload's own file name as a client sent it, reduced to a plain base name (or "" when it has none)."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()[:255]
    return "" if base in (".", "..") else base


class RequestGate:
    """ASGI middleware in front of every route: the token, the caller's origin, the upload's size and time.

    The token is checked on the request's headers, before a byte of its body is read: a client without it gets
    a 401 and nothing it sends is kept; so is the Origin of a POST or DELETE (403 unless it is the server's own
    or a configured one). POST bodies over the size limit are refused from Content-Length, or as
    they stream in; a body that takes longer than ``body_timeout_s`` to arrive is refused with a 408 and its
    connection closed (a slow client cannot hold a connection and a temporary file open for ever). A refused
    body of bounded declared size is drained by the server after the answer (nothing is stored), so that the
    client can read the refusal; a larger or unbounded one is cut off with ``Connection: close``.
    """

    def __init__(self, app: Any, settings: ServeSettings):
        self.app = app
        self.token = None if settings.token is None else settings.token.encode()
        self.max_bytes = settings.max_upload_bytes + _MULTIPART_SLACK
        self.timeout_s = settings.body_timeout_s
        self.origins = {o.rstrip("/") for o in settings.cors_origins}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length_text = headers.get(b"content-length", b"")
        length = int(length_text) if length_text.isdigit() else None
        if self.token is not None and not _is_public(scope["path"]) and not self._authorized(headers):
            await self._refuse(scope, receive, send, 401, _TOKEN_SENTENCE, length, {"WWW-Authenticate": "Bearer"},
                               linger=_STRANGER_LINGER_BYTES)
            return
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and not self._same_origin(headers):
            await self._refuse(scope, receive, send, 403, "Cross-origin requests are refused: this API answers its "
                               "own viewer and the origins the server was started with (--cors-origin).", length,
                               linger=_STRANGER_LINGER_BYTES)
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if length is not None and length > self.max_bytes:
            await self._refuse(scope, receive, send, 413, self.sentence, length, linger=self.max_bytes + _LINGER_BYTES)
            return
        await self.app(scope, self._guarded(receive), send)

    def _same_origin(self, headers: dict) -> bool:
        """No Origin header (not a browser's cross-site call), the server's own origin, or a configured one.

        Browsers send a cross-site multipart POST without asking first (a "simple" request), so CORS alone would
        let any web page make this server work; such requests are refused here, before their body is read.
        """
        origin = headers.get(b"origin")
        if origin is None:
            return True
        text = origin.decode("latin-1").rstrip("/")
        return text in self.origins or text.partition("://")[2] == headers.get(b"host", b"").decode("latin-1")

    def _authorized(self, headers: dict) -> bool:
        scheme, _, credentials = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(credentials.strip(), self.token)

    async def _refuse(self, scope: dict, receive: Any, send: Any, status: int, sentence: str, length: int | None,
                      headers: dict | None = None, linger: int = _LINGER_BYTES) -> None:
        """Answer now, unread body and all: a declared body up to ``linger`` bytes is drained by the server
        (the client reads the answer reliably); a larger or unbounded one is cut off."""
        headers = dict(headers or {})
        has_body = length is not None and length > 0 or length is None and scope["method"] in ("POST", "PUT")
        if has_body and (length is None or length > linger):
            headers["Connection"] = "close"
        await error(status, sentence, headers)(scope, receive, send)

    def _guarded(self, receive: Any) -> Any:
        """``receive`` that counts the body against the size limit and gives it ``timeout_s`` to arrive."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        received = 0
        body_done = False

        async def guarded_receive() -> dict:
            nonlocal received, body_done
            if body_done:  # later calls wait for the client to disconnect: no deadline on those
                return await receive()
            message = await next_message()
            received += len(message.get("body", b""))
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            if received > self.max_bytes:  # drop the rest up to the linger bound, then answer
                while not body_done and received <= self.max_bytes + _LINGER_BYTES:
                    message = await next_message()
                    received += len(message.get("body", b""))
                    body_done = message["type"] != "http.request" or not message.get("more_body", False)
                raise HTTPException(413, self.sentence, headers=None if body_done else {"Connection": "close"})
            return message

        async def next_message() -> dict:
            try:
                return await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"The upload did not arrive within the server's limit of "
                                         f"{self.timeout_s:g} s.", headers={"Connection": "close"}) from None

        return guarded_receive

    @property
    def sentence(self) -> str:
        return f"The upload is larger than the server's limit of {(self.max_bytes - _MULTIPART_SLACK) / MB:g} MB."


def _file_order(name: str) -> tuple[int, str]:
    """Maps first, then masks, pictures, raw arrays and tables: the order a reader wants them."""
    for rank, part in enumerate(("_anomaly.png", "_anomaly.nii", "_mask.", "_overlay.", "_top_slices.", ".npy")):
        if part in name:
            return rank, name
    return 9, name


def _validation_sentence(exc: RequestValidationError) -> str:
    """One sentence for FastAPI's list of validation errors (missing file, a query value of the wrong type)."""
    errors = exc.errors()
    if not errors:
        return "The request is invalid."
    first = errors[0]
    where, name = (list(first.get("loc", ())) + ["request", ""])[:2]
    if name == "file" and first.get("type") == "missing":
        return "The request has no file: upload it as the multipart form field 'file'."
    if where == "query":
        return f"The query parameter '{name}' is invalid: {first.get('msg', 'wrong value')}."
    return f"The request is invalid: {first.get('msg', 'wrong value')} ({where} {name})."


def create_app(models: dict[str, ServedModel], settings: ServeSettings = ServeSettings(),
               store: ResultStore | None = None) -> FastAPI:
    """The application serving these models with these limits."""
    if not models:
        raise NormdinoError("no model to serve")
    withhold_patient_data()
    store = ResultStore(settings.result_ttl_s, max_bytes=settings.max_results_bytes) if store is None else store
    for served in models.values():
        served.concurrency = settings.concurrency

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def sweep_forever() -> None:
            while True:
                await asyncio.sleep(max(1.0, min(60.0, settings.result_ttl_s / 4)))
                await run_in_threadpool(store.sweep)

        task = asyncio.create_task(sweep_forever())
        try:
            yield
        finally:
            task.cancel()
            store.close()

    app = FastAPI(title="normdino", version=__version__, lifespan=lifespan,
                  description="Anomaly maps, masks and scores from normative models of DINO patch embeddings. "
                              "Research software, not a medical device.")
    app.state.models = models
    app.state.settings = settings
    app.state.store = store
    # Outermost last: a foreign Host header is refused first (DNS rebinding), then CORS (only when configured:
    # browsers on other origins may not call the API by default), then the token and upload limits.
    app.add_middleware(RequestGate, settings=settings)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization"], allow_credentials=False)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.trusted_hosts or ["*"]))
    bearer = HTTPBearer(auto_error=False, description="Set when the server was started with --token.")

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.token is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), settings.token.encode()):
            raise HTTPException(401, _TOKEN_SENTENCE, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "The request was refused."
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"There is no {request.url.path} on this server."
        return error(exc.status_code, detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, _validation_sentence(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return error(500, "The server failed on this request (an internal error); it keeps serving.")

    api = [Depends(authorize)]

    @app.get("/health", dependencies=api, tags=["api"], summary="Is the server up; how busy is each model")
    async def health() -> dict:
        return {"status": "ok", "version": __version__,
                "models": {name: {"running": m.running, "waiting": m.waiting} for name, m in models.items()},
                "results": len(store)}

    @app.get("/models", dependencies=api, tags=["api"], summary="The served models")
    async def list_models() -> dict:
        return {"models": [m.describe() for m in models.values()]}

    def pick(name: str | None) -> ServedModel:
        if name is None:
            if len(models) == 1:
                return next(iter(models.values()))
            raise HTTPException(400, f"Several models are served: choose one with ?model= ({', '.join(models)}).")
        if name not in models:
            raise HTTPException(404, f"There is no model named '{name}'; served: {', '.join(models)}.")
        return models[name]

    @app.post("/predict", dependencies=api, tags=["api"],
              summary="Anomaly map, mask and score of an image (PNG/JPEG/TIFF), a NIfTI volume or a DICOM zip")
    async def predict(
        file: UploadFile = File(..., description="PNG, JPEG, TIFF, .nii, .nii.gz, or a zip of one DICOM series"),
        model: str | None = Query(None, description="model name (optional with one model)"),
        fpr: float | None = Query(None, description="false-positive rate of the mask, e.g. 0.05"),
    ) -> JSONResponse:
        served = pick(model)
        detector = served.detector
        fpr = float(detector.default_fpr) if fpr is None else fpr
        try:
            detector.pixel_threshold(fpr)
        except NormdinoError as err:
            raise HTTPException(400, public_message(err)) from None
        if served.running + served.waiting >= settings.concurrency + settings.max_queue:
            return error(503, f"Model '{served.name}' is busy ({served.waiting} requests waiting); try again shortly.",
                         {"Retry-After": "5"})
        job = store.upload_folder()
        result_id, out_dir = store.new_result()
        started = time.perf_counter()
        published = False
        try:
            raw = job / "upload.bin"
            await run_in_threadpool(copy_limited, file.file, raw, settings.max_upload_bytes)
            upload = await run_in_threadpool(check_upload, raw, job, settings)
            served.waiting += 1
            queued = True
            try:
                async with served.slots:
                    served.waiting -= 1
                    queued = False
                    served.running += 1
                    try:
                        answer, names = await run_in_threadpool(run_prediction, served, upload, fpr, out_dir,
                                                                 upload_name(file.filename))
                    finally:
                        served.running -= 1
                        if served.running == 0:
                            await run_in_threadpool(release_memory)
            finally:
                if queued:
                    served.waiting -= 1
            store.publish(result_id, names)
            published = True
        except UploadError as err:
            return error(err.status, public_message(forget(err), job, out_dir))
        except NormdinoError as err:
            return error(400, public_message(forget(err), job, out_dir))
        except Exception as err:  # noqa: BLE001 - the server must keep serving
            log.error("predict failed on model %s: %s", served.name, type(err).__name__,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            forget(err)
            return error(500, "The server failed on this upload (an internal error); it keeps serving.")
        finally:
            await file.close()
            discard(job)
            if not published:
                store.remove(result_id)
                if served.running == 0:  # a refused upload's buffers go back to the system too
                    await run_in_threadpool(release_memory)
        log.info("predict: model %s, %s, %.2f s", served.name, upload.kind, time.perf_counter() - started)
        base = f"/results/{result_id}"
        answer["id"] = result_id
        answer["expires_in_s"] = settings.result_ttl_s
        answer["files"] = {name: f"{base}/{name}" for name in sorted(names, key=_file_order)
                           if not name.startswith("view_")}
        answer["viewer"].update(images=f"{base}/view_images.u8", maps=f"{base}/view_maps.u16",
                                calibration=served.calibration(), colormap=colormap_lut().tolist())
        return JSONResponse(answer, headers=NO_STORE)

    @app.get("/results/{result_id}/{name}", dependencies=api, tags=["api"], summary="Download a result file")
    async def result_file(result_id: str, name: str) -> FileResponse:
        path = store.file(result_id, name)
        if path is None or not path.is_file():
            raise HTTPException(404, "This result does not exist or has expired; run the prediction again.")
        media = _MEDIA_TYPES.get(path.suffix, "application/octet-stream")
        return FileResponse(path, media_type=media, filename=None if name.startswith("view_") else name,
                            headers=NO_STORE)

    @app.delete("/results/{result_id}", dependencies=api, tags=["api"], status_code=204,
                summary="Delete a result now")
    async def delete_result(result_id: str) -> Response:
        if not store.remove(result_id):
            raise HTTPException(404, "This result does not exist or has expired.")
        return Response(status_code=204)

    @app.get("/", include_in_schema=False)
    async def viewer() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=VIEWER_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(model_specs: list[str], host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings = ServeSettings(),
          device: str = "cpu", log_level: str = "info") -> None:
    """Load the models and run the server until interrupted."""
    import uvicorn

    from normdino.serving.models import load_models

    if settings.token is None and host not in LOOPBACK_NAMES:
        log.warning("serving on %s without --token: anyone who reaches this address can use the API", host)
    hosts = settings.hosts_for(host)
    if hosts == ["*"]:
        log.warning("serving on all addresses without --trusted-host: requests with any Host header are answered "
                    "(name this server's host names to refuse DNS-rebinding requests)")
    settings = dataclasses.replace(settings, trusted_hosts=tuple(hosts))
    app = create_app(load_models(model_specs, device=device, concurrency=settings.concurrency), settings)
    log.info("viewer and API on http://%s:%d/  (API docs at /docs)", host if ":" not in host else f"[{host}]", port)
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)
