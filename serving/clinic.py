"""The clinic's web page (``medmpc clinic``): drop X-rays, read encrypted predictions.

The page is served by the clinic's own process on the clinic's machine (127.0.0.1 by default),
never by a compute party. The browser posts each file's bytes to this process, which decodes the
image, secret-shares it (``serving.client``) and sends one share to each compute party: the image
never leaves this machine unshared, and only this process reconstructs the logits.

Only a browser on this machine that loaded the page may use its API. A request must name this
server in ``Host`` (a DNS-rebinding site names its own), and a prediction must carry
``CLINIC_HEADER``, which a cross-site form cannot send and a cross-site ``fetch`` can send only
after a CORS preflight this app never grants; so another web site the clinician has open cannot
spend the clinic's token or read a result.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response

from medmpc.imaging.images import IMAGE_SUFFIXES, DataError
from medmpc.serving.client import PredictionClient, ServiceError
from medmpc.serving.clinic_page import PAGE, SCRIPT, STYLE

CLINIC_HEADER = "X-Medmpc-Clinic"
FILENAME_HEADER = "X-Filename"  # percent-encoded, as the page's encodeURIComponent writes it

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


def clinic_app(client: PredictionClient, *, allowed_hosts: set[str], max_upload_bytes: int) -> FastAPI:
    """The page and its API. ``allowed_hosts``: the ``Host`` values this server answers to."""
    app = FastAPI(title="medmpc clinic", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def only_this_machine(request: Request, call_next: Any) -> Response:
        if request.headers.get("host", "") not in allowed_hosts:
            return _error(421, f"this clinic page answers only at {', '.join(sorted(allowed_hosts))}")
        if request.url.path.startswith("/api/") and request.method != "GET" and CLINIC_HEADER not in request.headers:
            return _error(403, f"requests to the clinic's API come from its own page (no {CLINIC_HEADER} header)")
        response: Response = await call_next(request)
        response.headers.update(_HEADERS)
        return response

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
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
            card = client.card()
        except ServiceError as err:
            return _error(503, service_problem(err))
        return JSONResponse(
            {
                "servers": client.servers,
                "model": card.model_name,
                "classes": list(card.classes),
                "image_size": card.image_size,
                "synthetic": card.synthetic,
                "accepts": list(IMAGE_SUFFIXES),
            }
        )

    @app.post("/api/predict")
    async def predict(request: Request) -> JSONResponse:
        try:
            name = _upload_name(request.headers.get(FILENAME_HEADER, ""))
        except DataError as err:
            return _error(415, str(err))
        length = request.headers.get("content-length", "")
        if not length.isdigit() or int(length) > max_upload_bytes:
            return _error(413, f"{name}: larger than the clinic accepts ({max_upload_bytes // 2**20} MiB)")
        body = await request.body()
        if not body:
            return _error(422, f"{name} is empty")
        return await run_in_threadpool(_predict_one, client, name, body)

    return app


def _predict_one(client: PredictionClient, name: str, body: bytes) -> JSONResponse:
    """Decode, share and predict one uploaded file, which lives only in a private temporary folder."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medmpc-clinic-") as tmp:
        path = Path(tmp) / f"upload{Path(name).suffix.lower()}"
        path.write_bytes(body)
        try:
            [prediction] = client.predict_files([path])
        except DataError as err:
            return _error(422, str(err).replace(str(path), name))
        except ServiceError as err:
            return _error(502, service_problem(err))
    return JSONResponse(
        {
            "image": name,
            "prediction": prediction.prediction,
            "probabilities": prediction.probabilities,
            "seconds": round(time.perf_counter() - start, 3),
        }
    )
