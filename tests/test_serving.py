"""The prediction service end to end: three real party processes over loopback HTTP."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import ssl
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from checkpoints import trained_cnn
from medmpc_cli import medmpc
from scipy import stats
from uniformity import as_unit, looks_uniform

from medmpc.imaging.dataset import load_dataset
from medmpc.imaging.images import DataError, read_image
from medmpc.mpc import pki, sharing
from medmpc.mpc.compile import Precision
from medmpc.serving.client import PredictionClient, ServiceError
from medmpc.serving.engine import LEADER, BatchEngine
from medmpc.serving.launch import PARTIES, LocalService
from medmpc.serving.wire import decode_tensor
from medmpc.training.checkpoint import Checkpoint

pytestmark = pytest.mark.slow
TOKEN = "test-token-" + uuid.uuid4().hex
OTHER = "other-token-" + uuid.uuid4().hex  # a second and a third client
THIRD = "third-token-" + uuid.uuid4().hex
SIZE = 64
FRACTIONAL_BITS = Precision().activations  # what the served model card says, as a client reads it
QUEUE, QUOTA = 12, 6  # requests waiting at a party: in all, and from one client


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, chest_xray) -> Path:
    data = load_dataset(str(chest_xray / "train"), image_size=SIZE, seed=0)
    data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:400])
    return trained_cnn(data, epochs=3, path=tmp_path_factory.mktemp("serve") / "model.pt")


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"{OTHER}\n{TOKEN}\n{THIRD}\n")
    return path


@pytest.fixture(scope="module")
def service(checkpoint, tokens_file):
    with LocalService(
        checkpoint, tokens_file, share_timeout_s=3, max_body_mb=1, max_batch=8, max_queue=QUEUE, per_client_queue=QUOTA
    ) as svc:
        yield svc


@pytest.fixture(scope="module")
def val_images(chest_xray) -> list[Path]:
    return sorted(p for p in (chest_xray / "val").rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))


def _plaintext(checkpoint: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return Checkpoint.load(checkpoint).build()(x)


def test_predictions_equal_the_plaintext_model_for_every_val_image(service, checkpoint, val_images):
    assert len(val_images) == 16
    with PredictionClient(service.urls, TOKEN) as client:
        assert client.card().synthetic is False  # trained on real X-rays (the clinic's test has the other case)
        x = client.preprocess(val_images)
        # two concurrent requests of 8 images: the service batches whatever is queued
        with ThreadPoolExecutor(2) as pool:
            logits = torch.cat(list(pool.map(client.logits, x.split(8))))
        predictions = client.predict_files(val_images[:2])
        many = client.predict_files(val_images[:10])  # more than the service's max_batch: split, not refused
    plain = _plaintext(checkpoint, x)
    assert (logits - plain).abs().max() < 0.05
    assert torch.equal(logits.argmax(1), plain.argmax(1))
    classes = Checkpoint.load(checkpoint).classes
    assert [p.prediction for p in predictions] == [classes[int(i)] for i in plain[:2].argmax(1)]
    assert abs(sum(predictions[0].probabilities.values()) - 1) < 1e-5
    assert [p.prediction for p in many] == [classes[int(i)] for i in plain[:10].argmax(1)]


def test_concurrent_single_image_requests_share_encrypted_passes(service, val_images):
    with PredictionClient(service.urls, TOKEN) as client:
        x = client.preprocess(val_images[:6])
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(client.logits, x.split(1)))
    batches = [e for e in _events(service, "model-owner") if e["event"] == "batch"]
    assert max(e["requests"] for e in batches) >= 2


def test_an_idle_service_prepares_the_next_batch_before_it_arrives(service, val_images):
    """While idle, both parties have the dealer make the next batch's material (the size of the last
    batch), so that batch runs online only; once used, it is prepared again."""
    with PredictionClient(service.urls, TOKEN) as client:
        x = client.preprocess(val_images[:1])
        client.logits(x)  # the last batch is now one image
        start = len(_events(service, "model-owner"))
        _wait_for(service, "model-owner", start, "prepared")
        assert [e["images"] for e in _events(service, "model-owner")[start:] if e["event"] == "prepared"] == [1]
        served = len(_events(service, "model-owner"))
        client.logits(x)
    _wait_for(service, "model-owner", served, "batch")  # logged just after the answer goes out
    batch = served + next(i for i, e in enumerate(_events(service, "model-owner")[served:]) if e["event"] == "batch")
    assert _events(service, "model-owner")[batch]["images"] == 1
    _wait_for(service, "model-owner", batch + 1, "prepared")  # and ready again for the next one


def _wait_for(service: LocalService, party: str, start: int, event: str, timeout_s: float = 120) -> None:
    """Until ``party`` logs ``event`` after its first ``start`` events."""
    deadline = time.monotonic() + timeout_s
    while not any(e["event"] == event for e in _events(service, party)[start:]):
        assert time.monotonic() < deadline, f"{party} logged no {event!r} within {timeout_s} s"
        time.sleep(0.2)


def _events(service: LocalService, party: str) -> list[dict]:
    lines = service.log_file(party).read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _body(
    shape: list[int], request_id: str | None = None, share: torch.Tensor | None = None, dtype: str = "int64"
) -> dict:
    share = torch.zeros(shape, dtype=torch.int64) if share is None else share
    data = base64.b64encode(share.numpy().tobytes()).decode()
    return {"request_id": request_id or uuid.uuid4().hex, "shape": shape, "dtype": dtype, "share": data}


def test_each_bad_input_gets_a_clear_error_and_the_service_keeps_answering(service, val_images, tmp_path):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    one = [1, 1, SIZE, SIZE]
    with httpx.Client(headers=auth, timeout=30) as http, PredictionClient(service.urls, TOKEN) as client:
        x = client.preprocess(val_images[:1])
        want = client.logits(x)

        def still_works() -> None:
            assert (client.logits(x) - want).abs().max() < 0.01

        post = lambda i, **kw: http.post(f"{service.urls[i]}/v1/predict", **kw)

        # a non-image file: the client refuses it by name before anything is sent ...
        text = tmp_path / "notes.txt"
        text.write_text("not an x-ray")
        with pytest.raises(DataError, match="notes.txt"):
            client.predict_files([text])
        # ... and image bytes posted as the body are not a share
        r = post(0, content=val_images[0].read_bytes(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 422
        still_works()

        r = post(0, json=_body([1, 1, 32, 32]))
        assert r.status_code == 422 and "expected [n, 1, 64, 64]" in r.json()["detail"]
        r = post(1, json={**_body(one), "dtype": "float32"})
        assert r.status_code == 422 and "dtype" in r.json()["detail"]
        r = post(0, json={**_body(one), "share": base64.b64encode(b"\0" * 100).decode()})
        assert r.status_code == 422 and "needs 32768" in r.json()["detail"]
        r = post(0, json=_body([9, 1, SIZE, SIZE]))
        assert r.status_code == 422 and "1 to 8 images" in r.json()["detail"]
        still_works()

        # a request id known to one party only: each side times out, alone
        start = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.map(lambda i: post(i, json=_body(one, request_id=f"only-at-{i}-{uuid.uuid4().hex}")), (0, 1))
        assert a.status_code == b.status_code == 504
        assert "never received its share" in a.json()["detail"]
        assert time.monotonic() - start < 15
        still_works()

        # a share that never arrives at the second party
        r = post(0, json=_body(one))
        assert r.status_code == 504
        still_works()

        # a full queue: more unmatched shares than it holds are turned away at once (from three
        # clients, as one alone may hold only half of it)
        senders = [TOKEN] * QUOTA + [OTHER] * QUOTA + [THIRD] * 2
        with ThreadPoolExecutor(len(senders)) as pool:
            codes = sorted(
                r.status_code for r in pool.map(lambda t: post(0, json=_body(one), headers=_auth(t)), senders)
            )
        assert codes == [429, 429] + [504] * QUEUE
        still_works()

        # an oversized body is refused before it is read
        r = post(0, json=_body([8, 1, SIZE, SIZE]) | {"share": "A" * (2 * 2**20)})
        assert r.status_code == 413
        # the same request id twice at one party
        dup = _body(one)
        with ThreadPoolExecutor(2) as pool:
            codes = sorted(r.status_code for r in pool.map(lambda _: post(0, json=dup), range(2)))
        assert codes == [409, 504]
        still_works()


def test_clients_without_a_valid_token_get_401_and_touch_nothing(service):
    before = len(_events(service, "compute"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = httpx.post(f"{service.urls[1]}/v1/predict", json=_body([1, 1, SIZE, SIZE]), headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{service.urls[1]}/v1/model", headers=headers).status_code == 401
    events = _events(service, "compute")[before:]
    assert [e["status"] for e in events] == [401] * 6 and all(e["event"] == "refused" for e in events)
    # the open endpoints stay open
    assert httpx.get(f"{service.urls[0]}/health").json()["status"] == "alive"
    assert httpx.get(f"{service.urls[1]}/ready").json()["ready"] is True
    assert "/v1/predict" in httpx.get(f"{service.urls[0]}/openapi.json").json()["paths"]


def _shared_bodies(x: torch.Tensor, request_id: str) -> list[dict]:
    """What PredictionClient sends each party, under a request id of the caller's choosing."""
    shares = sharing.split(sharing.encode(x, FRACTIONAL_BITS), 2)
    return [_body(list(x.shape), request_id, sharing.share_of(shares, i).view(x.shape)) for i in range(2)]


def _post(service: LocalService, party: int, token: str, body: dict) -> httpx.Response:
    return httpx.post(f"{service.urls[party]}/v1/predict", json=body, headers=_auth(token), timeout=30)


def _reconstruct(answers: list[httpx.Response]) -> torch.Tensor:
    parts = [decode_tensor(a.json()["logits_share"], a.json()["shape"], "int64", what="logits") for a in answers]
    return sharing.decode(sharing.reconstruct(parts), FRACTIONAL_BITS)


def test_two_clients_using_one_request_id_each_get_their_own_prediction(service, checkpoint, val_images):
    with PredictionClient(service.urls, TOKEN) as client:
        x = client.preprocess(val_images[:2])
    request_id = "same-" + uuid.uuid4().hex
    bodies = {TOKEN: _shared_bodies(x[:1], request_id), OTHER: _shared_bodies(x[1:], request_id)}
    with ThreadPoolExecutor(4) as pool:
        # both clients' shares wait at party 0 under the one id before either partner share arrives
        first = {t: pool.submit(_post, service, 0, t, bodies[t][0]) for t in bodies}
        time.sleep(0.5)
        second = {t: pool.submit(_post, service, 1, t, bodies[t][1]) for t in bodies}
        answers = {t: [first[t].result(), second[t].result()] for t in bodies}
    for token, want in zip(bodies, _plaintext(checkpoint, x)):
        assert [a.status_code for a in answers[token]] == [200, 200], [a.text for a in answers[token]]
        assert (_reconstruct(answers[token])[0] - want).abs().max() < 0.05


def test_a_client_over_its_quota_gets_429_and_others_are_still_served(service, checkpoint, val_images):
    one = [1, 1, SIZE, SIZE]
    with ThreadPoolExecutor(QUEUE) as pool, PredictionClient(service.urls, TOKEN) as client:
        x = client.preprocess(val_images[:1])
        # as many unmatched shares as the whole queue holds, from one client
        flood = [pool.submit(_post, service, 0, OTHER, _body(one)) for _ in range(QUEUE)]
        time.sleep(0.5)
        logits = client.logits(x)
        answers = [f.result() for f in flood]
    assert sorted(a.status_code for a in answers) == [429] * (QUEUE - QUOTA) + [504] * QUOTA
    assert all(f"per-client quota is {QUOTA}" in a.json()["detail"] for a in answers if a.status_code == 429)
    assert (logits - _plaintext(checkpoint, x)).abs().max() < 0.05


def test_offers_take_turns_across_clients():
    engine = BatchEngine(rank=LEADER, max_batch=8, max_queue=8, per_client_queue=8, heartbeat_s=1.0)
    engine._ready = True  # no CrypTen: only the queue is under test
    share = torch.zeros(1, 1, 2, 2, dtype=torch.int64)
    for client, request_id in [("a", "1"), ("a", "2"), ("a", "3"), ("b", "1"), ("c", "1"), ("b", "2")]:
        engine.submit(request_id, share, 10.0, client=client)
    assert [key for key, _ in engine._offer()] == [
        ("a", "1"),
        ("b", "1"),
        ("c", "1"),
        ("a", "2"),
        ("b", "2"),
        ("a", "3"),
    ]


def test_tokens_never_appear_in_logs_or_error_messages(service, val_images):
    one = [1, 1, SIZE, SIZE]
    with PredictionClient(service.urls, TOKEN) as client:
        x = client.preprocess(val_images[:1])
    served = _shared_bodies(x, uuid.uuid4().hex)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda i: _post(service, i, TOKEN, served[i]), (0, 1)))
    # from another client: a quota's worth unmatched (504), then a duplicate (409) and one over the quota (429)
    dup = _body(one)
    with ThreadPoolExecutor(QUOTA + 2) as pool:
        waiting = [pool.submit(_post, service, 0, OTHER, b) for b in [dup] + [_body(one) for _ in range(QUOTA - 1)]]
        time.sleep(0.5)
        answers += pool.map(lambda b: _post(service, 0, OTHER, b), [dup, _body(one)])
        answers += [f.result() for f in waiting]
    invalid = {**_body(one), "dtype": "float32"}
    answers += [_post(service, 1, THIRD, invalid), _post(service, 1, TOKEN + "x", _body(one))]
    assert sorted(a.status_code for a in answers) == [200, 200, 401, 409, 422, 429] + [504] * QUOTA
    # each client is known by one id, the same at both parties, that is not its token
    requests = [e for p in ("model-owner", "compute") for e in _events(service, p) if e["event"] == "request"]
    ids = [
        {e["client"] for e in requests if e["request_id"] == body["request_id"]} for body in (served[0], dup, invalid)
    ]
    assert [len(i) for i in ids] == [1, 1, 1] and len(set().union(*ids)) == 3
    texts = [a.text + str(a.headers) for a in answers] + [service.log_file(p).read_text() for p in PARTIES]
    for token in (TOKEN, OTHER, THIRD):
        assert not any(token in text for text in texts)


class RecordingProxy:
    """A TCP relay in front of one party that keeps every byte the client sent through it."""

    def __init__(self, upstream: str) -> None:
        host, port = re.match(r"http://([^:]+):(\d+)", upstream).groups()
        self.upstream = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.streams: list[bytearray] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.server.accept()
            up = socket.create_connection(self.upstream)
            sent = bytearray()
            self.streams.append(sent)
            threading.Thread(target=self._pump, args=(conn, up, sent), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, conn, None), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        while data := src.recv(65536):
            if record is not None:
                record += data
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)

    def received_shares(self) -> list[torch.Tensor]:
        shares = []
        for stream in self.streams:
            pos = 0
            while (end := stream.find(b"\r\n\r\n", pos)) >= 0:
                head = bytes(stream[pos:end])
                length = re.search(rb"content-length: (\d+)", head, re.I)
                length = int(length.group(1)) if length else 0
                if head.startswith(b"POST /v1/predict"):
                    body = json.loads(stream[end + 4 : end + 4 + length])
                    shares.append(torch.frombuffer(bytearray(base64.b64decode(body["share"])), dtype=torch.int64))
                pos = end + 4 + length
        return shares


def test_what_each_party_receives_does_not_depend_on_the_image(service, val_images):
    proxies = [RecordingProxy(url) for url in service.urls]
    normal = next(p for p in val_images if "NORMAL" in str(p))
    pneumonia = next(p for p in val_images if "PNEUMONIA" in str(p))
    with PredictionClient([p.url for p in proxies], TOKEN) as client:
        images = client.preprocess([normal, pneumonia])
        for _ in range(3):
            for image in images.split(1):
                client.logits(image)
    for proxy in proxies:
        received = proxy.received_shares()
        assert len(received) == 6
        a, b = torch.cat(received[0::2]), torch.cat(received[1::2])  # three shares of each image
        assert looks_uniform(a) and looks_uniform(b)
        assert stats.ks_2samp(as_unit(a), as_unit(b)).pvalue > 1e-4
    # the control: the encoded images themselves (what would travel without sharing) fail the test
    encoded = sharing.encode(images, FRACTIONAL_BITS)
    assert not looks_uniform(encoded[0]) and stats.ks_2samp(as_unit(encoded[0]), as_unit(encoded[1])).pvalue < 1e-6


def test_logs_never_hold_shares(service, val_images):
    with PredictionClient(service.urls, TOKEN) as client:
        x = client.preprocess(val_images[:1])
        assert client.card().fractional_bits == FRACTIONAL_BITS
        encoded = sharing.encode(x, FRACTIONAL_BITS)
        client.logits(x)
    fragments = {base64.b64encode(encoded.numpy().tobytes()[i : i + 48]).decode() for i in (0, 4096, 16384)}
    for party in ("model-owner", "compute", "dealer"):
        text = service.log_file(party).read_text()
        for event in _events(service, party):
            assert set(event) <= {
                "ts",
                "event",
                "party",
                "client",
                "request_id",
                "status",
                "ms",
                "images",
                "batch_images",
                "requests",
                "seconds",
                "model",
                "max_batch",
                "role",
                "host",
                "port",
                "tls",
                "path",
                "bytes",
                "error",
            }
        assert not any(f in text for f in fragments)
        assert not re.search(r"[A-Za-z0-9+/]{200,}", text)  # no base64 blob of any share


def test_the_predict_command_prints_the_reconstructed_prediction(service, checkpoint, val_images, tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    out = medmpc(
        "predict", "--servers", ",".join(service.urls), "--token-file", token, "--json", val_images[0], timeout=120
    )
    [pred] = json.loads(out.stdout)["predictions"]
    ckpt = Checkpoint.load(checkpoint)
    x = ckpt.preprocessing(read_image(val_images[0], SIZE)[None])
    assert pred["prediction"] == ckpt.classes[int(_plaintext(checkpoint, x).argmax())]
    env = {k: v for k, v in os.environ.items() if k != "MEDMPC_TOKEN"}
    bad = medmpc("predict", "--servers", ",".join(service.urls), val_images[0], check=False, timeout=60, env=env)
    assert bad.returncode == 2 and "no bearer token" in bad.stderr


def test_tls_and_a_killed_party_fails_requests_fast(checkpoint, tokens_file, val_images, tmp_path):
    cert, key = pki.self_signed(tmp_path, ["127.0.0.1"])
    with LocalService(checkpoint, tokens_file, tls_cert=cert, tls_key=key, peer_timeout_s=30) as svc:
        assert all(u.startswith("https://") for u in svc.urls)
        with PredictionClient(svc.urls, TOKEN, verify=str(cert)) as client:
            [pred] = client.predict_files(val_images[:1])
            assert pred.prediction in Checkpoint.load(checkpoint).classes
            with pytest.raises(ServiceError, match="HTTP 0: unreachable"):
                PredictionClient(svc.urls, TOKEN).card()  # an unverified certificate is refused
            svc.stop("compute")
            start = time.monotonic()
            with pytest.raises(ServiceError) as err:
                client.predict_files(val_images[:1])
            assert time.monotonic() - start < 25
            assert err.value.status in (0, 503, 504)
        deadline = time.monotonic() + 30
        ca = ssl.create_default_context(cafile=cert)
        while httpx.get(f"{svc.urls[0]}/ready", verify=ca).status_code == 200:
            assert time.monotonic() < deadline, "the model owner still claims to be ready"
            time.sleep(0.5)
        assert httpx.get(f"{svc.urls[0]}/ready", verify=ca).json()["reason"]


def test_serve_refuses_to_start_without_client_tokens(checkpoint):
    env = {k: v for k, v in os.environ.items() if k != "MEDMPC_TOKENS"}
    out = medmpc("serve", "--model", checkpoint, check=False, timeout=60, env=env)
    assert out.returncode == 2 and "no client tokens" in out.stderr
