"""The HTTP front end of one service party (FastAPI; OpenAPI docs at /docs).

Open: ``/health`` (the process answers), ``/ready`` (it can serve), ``/docs``.
Behind a bearer token: ``/v1/model`` (the public model card) and ``/v1/predict``
(a share in, this party's share of the logits out). Authentication and the body
size limit are checked before a request body is read, so a refused request
touches nothing.

Each token is one client: its requests are queued under ``client_id(token)``, so
two clients never meet on a request id and each has its own queue quota. Clients
that share a token share that identity too.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from medmpc.serving.engine import BatchEngine, DuplicateRequest, EngineUnavailable, QueueFull, ShareMismatch
from medmpc.serving.logs import log
from medmpc.serving.wire import (
    PredictRequest,
    PredictResponse,
    WireError,
    check_request_id,
    decode_tensor,
    encode_tensor,
)


def client_id(*, token: str) -> str:
    """The client's name inside the service (queue keys, offers between the parties, logs): the same
    at both compute parties for one token, and a one-way hash of it, so neither the other party nor a
    log reader learns the token (tokens must be random; a guessable one could be found from its hash)."""
    return hashlib.sha256(b"medmpc client id\0" + token.encode()).hexdigest()[:16]


def _error(status: int, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


def health_app(name: str, ready: Callable[[], tuple[bool, str]]) -> FastAPI:
    """The endpoints every party has, the dealer included."""
    app = FastAPI(title=f"medmpc {name}", description="medmpc encrypted prediction service party")

    @app.get("/health")
    def health() -> dict:
        return {"status": "alive", "party": name}

    @app.get("/ready")
    def is_ready() -> Response:
        ok, reason = ready()
        return JSONResponse({"ready": ok, "party": name, "reason": reason}, status_code=200 if ok else 503)

    return app


class _Tokens:
    """The configured bearer tokens, each one client (named by :func:`client_id`)."""

    def __init__(self, tokens: list[str]) -> None:
        if not tokens:
            raise ValueError("no client tokens configured: pass --tokens-file FILE or set MEDMPC_TOKENS")
        self._secrets = [t.encode() for t in tokens]
        self._clients = [client_id(token=t) for t in tokens]

    def client(self, authorization: str) -> str | None:
        """The client an ``Authorization`` header authenticates, or None."""
        scheme, _, token = authorization.partition(" ")
        # compare against every token, so timing does not tell how many matched
        matches = [hmac.compare_digest(token.encode(), s) for s in self._secrets]
        if scheme.lower() != "bearer" or not any(matches):
            return None
        return self._clients[matches.index(True)]


Guard = Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]


def _guard(tokens: _Tokens, *, party: int, max_body_bytes: int) -> Guard:
    """Middleware: the API's token and body-size checks, before any body is read."""

    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if not request.url.path.startswith("/v1/"):
            return await call_next(request)
        client = tokens.client(request.headers.get("authorization", ""))
        if client is None:
            log("refused", party=party, path=request.url.path, status=401)
            return _error(401, "missing or invalid bearer token", **{"WWW-Authenticate": "Bearer"})
        request.state.client = client
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                return _error(411, "a Content-Length header is required")
            if not length.isdigit() or int(length) > max_body_bytes:
                log("refused", party=party, path=request.url.path, status=413, bytes=length)
                return _error(413, f"body of {length} bytes exceeds the limit of {max_body_bytes}")
        return await call_next(request)

    return guard


# how a request that fails with one of these errors is answered: status, and the detail made
# from the request id and the error
_REFUSALS: dict[type[Exception], tuple[int, Callable[[str, Exception], str]]] = {
    WireError: (422, lambda rid, err: str(err)),
    DuplicateRequest: (409, lambda rid, err: str(err)),
    QueueFull: (429, lambda rid, err: f"busy: {err}; retry later"),
    EngineUnavailable: (503, lambda rid, err: f"service unavailable: {err}"),
    ShareMismatch: (409, lambda rid, err: f"request {rid}: {err}"),
}


def _refusal(request_id: str, err: Exception) -> tuple[int, JSONResponse]:
    status, detail = next(_REFUSALS[kind] for kind in type(err).__mro__ if kind in _REFUSALS)
    headers = {"Retry-After": "1"} if status == 429 else {}
    return status, _error(status, detail(request_id, err), **headers)


def compute_app(
    name: str,
    engine: BatchEngine,
    *,
    tokens: list[str],
    share_timeout_s: float,
    request_timeout_s: float,
    max_body_bytes: int,
) -> FastAPI:
    """A compute party's app: health plus the authenticated prediction API. A request waits at most
    ``share_timeout_s`` for the other party to hold its partner share, and ``request_timeout_s`` in all."""
    guard = _guard(_Tokens(tokens), party=engine.rank, max_body_bytes=max_body_bytes)
    app = health_app(name, lambda: (engine.ready, engine.failure or ("serving" if engine.ready else "starting")))
    app.middleware("http")(guard)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI's default echoes the input back, which fails on binary bodies and would
        # copy share values into responses; say only where and what is wrong
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _error(422, f"not a prediction request ({problems})")

    @app.get("/v1/model")
    def model_card() -> Response:
        if engine.card is None:
            return _error(503, "the model is not loaded yet")
        return JSONResponse(engine.card.to_dict())

    @app.post("/v1/predict", response_model=PredictResponse)
    async def predict(req: PredictRequest, request: Request) -> Response | PredictResponse:
        start = time.perf_counter()
        client = request.state.client

        def done(status: int, response: Response | PredictResponse, **extra: object) -> Response | PredictResponse:
            log(
                "request",
                party=engine.rank,
                client=client,
                request_id=req.request_id[:64],
                status=status,
                ms=round(1000 * (time.perf_counter() - start), 1),
                **extra,
            )
            return response

        try:
            check_request_id(req.request_id)
            if engine.card is None:
                raise EngineUnavailable("the model is not loaded yet")
            engine.card.check_input_shape(req.shape)
            share = decode_tensor(req.share, req.shape, req.dtype, what="share")
            future = engine.submit(req.request_id, share, share_timeout_s, client=client)
            result = await asyncio.wait_for(asyncio.wrap_future(future), request_timeout_s)
        except TimeoutError as err:
            engine.forget(req.request_id, client=client)
            why = f"{err} within {share_timeout_s:g} s" if str(err) else f"no result within {request_timeout_s:g} s"
            return done(504, _error(504, f"request {req.request_id}: {why}"))
        except tuple(_REFUSALS) as err:
            return done(*_refusal(req.request_id, err))
        share_out = result.logits_share
        return done(
            200,
            PredictResponse(
                request_id=req.request_id,
                party=engine.rank,
                shape=list(share_out.shape),
                logits_share=encode_tensor(share_out),
                batch_images=result.batch_images,
            ),
            images=req.shape[0],
            batch_images=result.batch_images,
        )

    return app
