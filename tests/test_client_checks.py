"""The prediction client against compute servers that misbehave: answers to another request, of
the wrong shape or from the wrong party are refused, and a server that trickles its answer is cut
off at the request's deadline (httpx's timeout bounds each read, not the call)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from medmpc.serving.client import PredictionClient, ServiceError
from medmpc.serving.wire import ModelCard, encode_tensor

CARD = ModelCard("cnn", ("normal", "bacterial", "viral"), 1, 16, 0.5, 0.25, 16, 4)


def _server(party: int, misbehaviour: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, body: bytes, *, trickle: bool = False) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(0, len(body), 8 if trickle else len(body)):
                self.wfile.write(body[i : i + (8 if trickle else len(body))])
                self.wfile.flush()
                if trickle:
                    time.sleep(0.3)

        def do_GET(self) -> None:
            self._send(json.dumps(CARD.to_dict()).encode())

        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            n = request["shape"][0]
            shape = [n, 1] if misbehaviour == "shape" else [n, len(CARD.classes)]
            answer = {
                "request_id": "someone-elses" if misbehaviour == "id" else request["request_id"],
                "party": 7 if misbehaviour == "party" else party,
                "shape": shape,
                "dtype": "int64",
                "logits_share": encode_tensor(torch.zeros(shape, dtype=torch.int64)),
                "batch_images": n,
            }
            self._send(json.dumps(answer).encode(), trickle=misbehaviour == "trickle")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def servers(request) -> Iterator[list[str]]:
    running = [_server(0, "none"), _server(1, request.param)]
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in running]
    for s in running:
        s.shutdown()


@pytest.mark.parametrize("servers", ["id", "party", "shape"], indirect=True)
def test_an_answer_to_another_request_is_refused(servers):
    with PredictionClient(servers, "t0k3n", timeout_s=10) as client:
        with pytest.raises(ServiceError, match="answered another request") as err:
            client.logits(torch.zeros(2, 1, 16, 16))
    assert err.value.server == servers[1]


@pytest.mark.parametrize("servers", ["trickle"], indirect=True)
def test_a_trickling_server_is_cut_off_at_the_deadline(servers):
    with PredictionClient(servers, "t0k3n", timeout_s=2) as client:
        start = time.monotonic()
        with pytest.raises(ServiceError, match="no answer within 2 s"):
            client.logits(torch.zeros(1, 1, 16, 16))
        assert time.monotonic() - start < 5  # the answer alone would take about 15 s


@pytest.mark.parametrize("servers", ["none"], indirect=True)
def test_control_well_behaved_servers_are_answered(servers):
    with PredictionClient(servers, "t0k3n", timeout_s=10) as client:
        assert client.logits(torch.zeros(6, 1, 16, 16)).shape == (6, 3)  # two requests of max_batch 4 and 2
