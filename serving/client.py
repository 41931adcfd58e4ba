"""The client of the prediction service: the only place an image or a result is ever in the clear.

It reads the public model card from both compute parties, preprocesses the image
exactly as the card says, encodes it in fixed point, splits it into two additive
shares with the OS-seeded ChaCha20 generator, and sends one share to each party
under one fresh request id. Each party answers with a share of the logits; the
client adds them.

    client = PredictionClient(["https://a:8000", "https://b:8001"], token)
    [prediction] = client.predict_files(["xray.jpeg"])
"""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from medmpc.imaging.transforms import Preprocessing
from medmpc.mpc import sharing
from medmpc.serving.options import is_loopback
from medmpc.serving.wire import ModelCard, decode_tensor, encode_tensor
from medmpc.training.predictions import Prediction, predictions


class ServiceError(RuntimeError):
    """A party refused or failed a request; the message names the party and its reason."""

    def __init__(self, server: str, status: int, detail: str) -> None:
        super().__init__(f"{server}: HTTP {status}: {detail}")
        self.server, self.status, self.detail = server, status, detail


class PredictionClient:
    """``allow_plain_http``: send shares over plain ``http://`` to a host other than this machine
    (anyone on the path then reads both shares, and with them the image); refused otherwise."""

    def __init__(
        self,
        servers: Sequence[str],
        token: str,
        *,
        timeout_s: float = 120.0,
        verify: bool | str = True,
        allow_plain_http: bool = False,
    ) -> None:
        if len(servers) != 2:
            raise ValueError(f"the service has two compute parties; got {len(servers)} server URL(s)")
        if not token or not token.isprintable() or any(c.isspace() for c in token):
            raise ValueError("the bearer token must be one word of printable characters (it is not shown here)")
        self.servers = [s.rstrip("/") for s in servers]
        for server in self.servers:
            url = httpx.URL(server)
            if url.scheme == "http" and not is_loopback(url.host) and not allow_plain_http:
                raise ValueError(
                    f"refusing plain http:// to {url.host}, which is not this machine: use https:// "
                    "(or allow_plain_http / --insecure-http, and every share crosses the network readable)"
                )
        headers = {"Authorization": f"Bearer {token}"}
        # a CA file, e.g. a self-signed deployment's own certificate
        tls = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
        self._http = [httpx.Client(base_url=s, headers=headers, timeout=timeout_s, verify=tls) for s in self.servers]
        self.timeout_s = timeout_s
        self._card: ModelCard | None = None

    def close(self) -> None:
        for h in self._http:
            h.close()

    def __enter__(self) -> PredictionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, party: int, method: str, path: str, **kw: Any) -> dict:
        try:
            r = self._http[party].request(method, path, **kw)
        except httpx.HTTPError as err:
            raise ServiceError(self.servers[party], 0, f"unreachable: {err}") from err
        if r.status_code != 200:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ServiceError(self.servers[party], r.status_code, str(detail))
        body: dict[str, Any] = r.json()
        return body

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until both parties answer ``/ready`` (weights shared, peers alive); ServiceError
        naming the first party still not ready after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        for party in range(2):
            while True:
                try:
                    self._call(party, "GET", "/ready")
                    break
                except ServiceError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1.0)

    def card(self, *, fresh: bool = False) -> ModelCard:
        """The public model card; both parties must serve the same one. It is read once, or again
        with ``fresh`` (a long-lived client, whose service may have been given another model)."""
        if self._card is None or fresh:
            cards = [ModelCard.from_dict(self._call(i, "GET", "/v1/model")) for i in range(2)]
            if cards[0] != cards[1]:
                raise ValueError(f"the two parties serve different models: {cards[0]} vs {cards[1]}")
            self._card = cards[0]
        return self._card

    def preprocess(self, paths: Sequence[str | Path]) -> torch.Tensor:
        card = self.card()
        return Preprocessing(card.image_size, card.mean, card.std).read(paths)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Encrypted logits of a preprocessed batch ``x`` of shape [n, channels, size, size], in
        requests of at most the service's ``max_batch`` images."""
        return torch.cat([self._request(chunk) for chunk in x.split(self.card().max_batch)])

    def _request(self, x: torch.Tensor) -> torch.Tensor:
        card = self.card()
        card.check_input_shape(list(x.shape))
        encoded = sharing.encode(x.float(), card.fractional_bits)
        shares = sharing.split(encoded, 2)
        request_id = uuid.uuid4().hex
        bodies = [
            {
                "request_id": request_id,
                "shape": list(x.shape),
                "dtype": "int64",
                "share": encode_tensor(sharing.share_of(shares, party).view(x.shape)),
            }
            for party in range(2)
        ]
        # both at once: each party waits for the other's share before it can compute (threads of
        # this call only, so concurrent calls never queue one party's request behind another's)
        pool = ThreadPoolExecutor(max_workers=2)
        futures = [pool.submit(self._call, i, "POST", "/v1/predict", json=bodies[i]) for i in range(2)]
        # httpx's timeout bounds each read, not the call: a server that trickles its answer is
        # stopped here, after the whole request's deadline
        deadline = time.monotonic() + self.timeout_s
        try:
            answers = []
            for i, future in enumerate(futures):
                try:
                    answers.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
                except TimeoutError:
                    raise ServiceError(self.servers[i], 504, f"no answer within {self.timeout_s:g} s") from None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        want = [x.shape[0], len(card.classes)]
        parts = []
        for i, answer in enumerate(answers):
            if answer.get("request_id") != request_id or answer.get("party") != i or answer.get("shape") != want:
                raise ServiceError(
                    self.servers[i],
                    200,
                    f"answered another request: id, party and shape must be {request_id}, {i} and {want}; got "
                    f"{answer.get('request_id')!r}, {answer.get('party')!r} and {answer.get('shape')!r}",
                )
            parts.append(decode_tensor(answer["logits_share"], want, answer["dtype"], what=f"{self.servers[i]} logits"))
        return sharing.decode(sharing.reconstruct(parts), card.fractional_bits)

    def predict_files(self, paths: Sequence[str | Path]) -> list[Prediction]:
        return predictions(paths, self.logits(self.preprocess(paths)), self.card().classes)
