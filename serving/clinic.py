"""The clinic's web page (``medmpc clinic``): drop X-rays, read encrypted predictions.

The page is served by the clinic's own process on the clinic's machine (a loopback address only),
never by a compute party. The browser posts each file's bytes to this process, which decodes the
image, secret-shares it (``serving.client``) and sends one share to each compute party: the image
never leaves this machine unshared, and only this process reconstructs the logits.

Who may use it: whoever opens the address the command printed, which carries a random session key
(as Jupyter does); the page then holds the key in an HttpOnly, SameSite=Strict cookie. Without it,
another program or user on this machine gets neither the page nor the API, so cannot spend the
clinic's token. Against other web sites open in the same browser: a request must name this server
in ``Host`` (a DNS-rebinding site names its own), and a prediction must carry ``CLINIC_HEADER``,
which a cross-site form cannot send and a cross-site ``fetch`` can send only after a CORS preflight
this app never grants; the cookie is not sent cross-site either.

What it does not protect: the result's integrity (either server can shift the logits undetected;
the protocol is semi-honest), and the screen of the machine it runs on.
"""

from __future__ import annotations

import hmac
import secrets
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from medmpc.imaging.images import IMAGE_SUFFIXES, DataError
from medmpc.serving.client import PredictionClient, ServiceError
from medmpc.serving.clinic_page import PAGE, SCRIPT, STYLE
from medmpc.serving.options import is_loopback

CLINIC_HEADER = "X-Medmpc-Clinic"
FILENAME_HEADER = "X-Filename"  # percent-encoded, as the page's encodeURIComponent writes it
SESSION_COOKIE = "medmpc_clinic"
# images decoded at once: one costs up to about a gigabyte at the pixel limit
_DECODES = threading.BoundedSemaphore(2)

# what a person reads for the service's refusals, by HTTP status (0: no answer at all)
_SERVICE_PROBLEMS = {
    0: "the prediction service is unreachable",
    401: "the prediction service refused this clinic's token (check --token-file)",
    503: "the prediction service is not ready or one of its parties is down",
    504: "the prediction service did not answer in time",
}
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_NO_KEY = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>medmpc clinic</title></head>
<body><h1>Open the clinic's own address</h1><p>This page needs the address <code>medmpc clinic</code>
printed when it started (it ends in <code>?key=...</code>).</p></body></html>"""


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def service_problem(err: ServiceError) -> str:
    """One sentence on what went wrong at the service, naming the server."""
    what = _SERVICE_PROBLEMS.get(err.status, f"the prediction service failed (HTTP {err.status})")
    return f"{what}: {err.server} said {err.detail}"


def _upload_name(raw: str) -> str:
    name = Path(unquote(raw)).name  # never a path: the name is only shown and gives the format
    if not name:
        raise DataError(f"an upload needs its file name in the {FILENAME_HEADER} header")
    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"{name} is not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
    return name


def readable_in_transit(servers: list[str]) -> bool:
    """Whether shares go over plain HTTP to another machine, where anyone on the path reads both."""
    return any(httpx.URL(s).scheme == "http" and not is_loopback(httpx.URL(s).host) for s in servers)


class Clinic:
    """The page and its API over ``client``. ``allowed_hosts``: the ``Host`` values it answers to;
    ``key``: the session key in the address a person opens (default: a fresh random one)."""

    def __init__(
        self,
        client: PredictionClient,
        *,
        allowed_hosts: set[str],
        max_upload_bytes: int,
        key: str | None = None,
    ) -> None:
        self.client = client
        self.key = key or secrets.token_urlsafe(24)
        self.allowed_hosts = allowed_hosts
        self.max_upload_bytes = max_upload_bytes
        self.app = self._build()

    def _has_session(self, request: Request) -> bool:
        return hmac.compare_digest(request.cookies.get(SESSION_COOKIE, "").encode(), self.key.encode())

    def _build(self) -> FastAPI:
        app = FastAPI(title="medmpc clinic", docs_url=None, redoc_url=None, openapi_url=None)

        @app.middleware("http")
        async def only_this_page(request: Request, call_next: Any) -> Response:
            if request.headers.get("host", "") not in self.allowed_hosts:
                return _error(421, f"this clinic page answers only at {', '.join(sorted(self.allowed_hosts))}")
            if request.url.path.startswith("/api/"):
                if not self._has_session(request):
                    return _error(401, "no clinic session: open the address `medmpc clinic` printed")
                if request.method != "GET" and CLINIC_HEADER not in request.headers:
                    return _error(403, f"the clinic's API answers its own page only (no {CLINIC_HEADER} header)")
            response: Response = await call_next(request)
            response.headers.update(_HEADERS)
            return response

        @app.get("/", response_class=HTMLResponse)
        def page(request: Request, key: str = "") -> Response:
            if key:
                if not hmac.compare_digest(key.encode(), self.key.encode()):
                    return HTMLResponse(_NO_KEY, status_code=401)
                # the key moves into a cookie and out of the address bar and the history
                opened = RedirectResponse("/", status_code=303)
                opened.set_cookie(SESSION_COOKIE, self.key, httponly=True, samesite="strict", path="/")
                return opened
            if not self._has_session(request):
                return HTMLResponse(_NO_KEY, status_code=401)
            return HTMLResponse(PAGE)

        @app.get("/clinic.js")
        def script() -> Response:
            return Response(SCRIPT, media_type="text/javascript")

        @app.get("/clinic.css")
        def style() -> Response:
            return Response(STYLE, media_type="text/css")

        @app.get("/api/status")
        def status() -> JSONResponse:
            try:
                card = self.client.card(fresh=True)
            except ServiceError as err:
                return _error(503, service_problem(err))
            except Exception as err:  # e.g. the two parties serve different models
                return _error(502, f"the prediction service is inconsistent: {err}")
            return JSONResponse(
                {
                    "servers": self.client.servers,
                    "model": card.model_name,
                    "classes": list(card.classes),
                    "image_size": card.image_size,
                    "synthetic": card.synthetic,
                    "readable_in_transit": readable_in_transit(self.client.servers),
                    "timeout_s": self.client.timeout_s,
                }
            )

        @app.post("/api/predict")
        async def predict(request: Request) -> JSONResponse:
            try:
                name = _upload_name(request.headers.get(FILENAME_HEADER, ""))
            except DataError as err:
                return _error(415, str(err))
            length = request.headers.get("content-length", "")
            if not length.isdigit() or int(length) > self.max_upload_bytes:
                return _error(413, f"{name}: larger than the clinic accepts ({self.max_upload_bytes // 2**20} MiB)")
            body = await request.body()
            if not body:
                return _error(422, f"{name} is empty")
            return await run_in_threadpool(self._predict_one, name, body)

        return app

    def _predict_one(self, name: str, body: bytes) -> JSONResponse:
        """Decode, share and predict one uploaded file, which lives only in a private temporary folder."""
        start = time.perf_counter()
        with _DECODES, tempfile.TemporaryDirectory(prefix="medmpc-clinic-") as tmp:
            path = Path(tmp) / f"upload{Path(name).suffix.lower()}"
            path.write_bytes(body)
            try:
                self.client.card(fresh=True)  # the classes as served now, not as they were at start
                [prediction] = self.client.predict_files([path])
            except DataError as err:
                return _error(422, str(err).replace(str(path), name))
            except ServiceError as err:
                return _error(502, service_problem(err))
            except Exception as err:  # whatever else: said in the page, never a bare 500
                return _error(502, f"{name}: {type(err).__name__}: {str(err).replace(str(path), name)}")
        return JSONResponse(
            {
                "image": name,
                "prediction": prediction.prediction,
                "probabilities": prediction.probabilities,
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
