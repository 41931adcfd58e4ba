"""Authenticated, encrypted channels between the federation's parties.

Real sockets, real TLS 1.3, real certificates from mpc.pki. Each refusal has its control:
the same listener accepts the legitimate parties right after the bad ones.
"""

from __future__ import annotations

import datetime
import errno
import json
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from medmpc_cli import medmpc

from medmpc.mpc import pki
from medmpc.mpc.transport import Listener, PeerError, Traffic, connect

HOSPITALS = {"hospital0", "hospital1"}


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pki") / "federation"
    pki.init_federation(folder, ["aggregator0", "aggregator1", *sorted(HOSPITALS), "hospital2", "hospital3"])
    pki.revoke(folder, "hospital2")
    expired = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    pki.issue(folder, "hospital3", days=1, not_before=expired)
    return folder


@pytest.fixture(scope="module")
def stranger(tmp_path_factory) -> Path:
    """Another CA's federation, with a certificate that also says hospital0."""
    folder = tmp_path_factory.mktemp("pki") / "other"
    pki.init_federation(folder, ["hospital0"])
    return folder


def _accept_in_background(listener: Listener, expected: set[str]) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["channels"] = listener.accept(expected, traffic=Traffic(), timeout_s=20)
        except Exception as err:  # surfaced by the test
            out["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _connect(port: int, me: str, folder: Path | None, peer: str = "aggregator0", **kw) -> object:
    identity = pki.Identity(folder, me) if folder is not None else None
    return connect(
        "127.0.0.1", port, me=me, peer=peer, traffic=Traffic(), timeout_s=kw.get("timeout_s", 5), identity=identity
    )


def test_pki_names_party_and_role_in_the_certificate(federation):
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((federation / "hospital1.pem").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=hospital1,OU=hospital"
    assert (federation / "hospital1.key").stat().st_mode & 0o077 == 0  # keys readable by their owner only


def test_only_certified_parties_of_the_expected_role_get_in(federation, stranger):
    listener = Listener("127.0.0.1", 0, identity=pki.Identity(federation, "aggregator0"))
    thread, out = _accept_in_background(listener, HOSPITALS)
    refused = {
        "another CA": lambda: _connect(listener.port, "hospital0", stranger),
        "wrong role": lambda: _connect(listener.port, "aggregator1", federation),
        "revoked": lambda: _connect(listener.port, "hospital2", federation),
        "expired": lambda: _connect(listener.port, "hospital3", federation),
    }
    for attempt in refused.values():
        with pytest.raises(PeerError):  # the handshake or the first read fails at the client
            attempt().recv(timeout_s=5)
    with socket.create_connection(("127.0.0.1", listener.port)) as plain:  # no certificate, no TLS at all
        plain.sendall(_raw_frame(json.dumps({"kind": "hello", "meta": {"from": "hospital0"}}).encode()))
        plain.settimeout(10)
        try:
            reply = plain.recv(100)
        except ConnectionResetError:
            reply = b""
        assert reply == b"" or reply[0] == 0x15  # hung up, or a TLS alert: never a message

    # control: the listener is still up and takes the two real hospitals
    good = [_connect(listener.port, name, federation) for name in sorted(HOSPITALS)]
    thread.join(30)
    listener.close()
    assert "error" not in out, out.get("error")
    assert set(out["channels"]) == HOSPITALS
    for channel in good:
        channel.close()


def test_a_client_refuses_a_server_whose_certificate_names_another_party(federation):
    listener = Listener("127.0.0.1", 0, identity=pki.Identity(federation, "aggregator1"))
    thread, _ = _accept_in_background(listener, HOSPITALS)
    with pytest.raises(PeerError, match="certificate for 'aggregator1', expected aggregator0"):
        _connect(listener.port, "hospital0", federation, peer="aggregator0")
    _connect(listener.port, "hospital0", federation, peer="aggregator1")  # control: the right name connects
    _connect(listener.port, "hospital1", federation, peer="aggregator1")
    thread.join(30)
    listener.close()


def _raw_frame(header: bytes) -> bytes:
    return struct.pack(">Q", len(header)) + header


@pytest.mark.parametrize(
    "frame",
    [
        _raw_frame(
            json.dumps(
                {"kind": "hello", "meta": {"from": "hospital0"}, "dtype": "torch.int64", "shape": [2**40]}
            ).encode()
        ),  # a 2^40-element hello
        _raw_frame(b"{not json"),
        _raw_frame(json.dumps({"kind": "hello"}).encode()),  # no meta
        struct.pack(">Q", 2**40),  # a header length no one allocates
        b"\x16\x03\x01garbage",
    ],
    ids=["huge-hello", "bad-json", "no-meta", "huge-header", "garbage"],
)
def test_a_hostile_stranger_cannot_crash_a_plaintext_listener(frame):
    listener = Listener("127.0.0.1", 0, identity=None)
    thread, out = _accept_in_background(listener, HOSPITALS)
    with socket.create_connection(("127.0.0.1", listener.port)) as hostile:
        hostile.sendall(frame)
        hostile.settimeout(10)
        try:  # the listener hangs up on it, possibly before we finish writing
            hostile.shutdown(socket.SHUT_WR)
            while hostile.recv(1 << 16):
                pass
        except TimeoutError:
            pytest.fail("the listener kept a hostile connection open")
        except OSError as hung_up:
            assert hung_up.errno in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE), hung_up
    good = [_connect(listener.port, name, None) for name in sorted(HOSPITALS)]
    thread.join(30)
    listener.close()
    assert "error" not in out, out.get("error")
    assert set(out["channels"]) == HOSPITALS  # and it still serves the real parties
    for channel in good:
        channel.close()


class _RecordingRelay:
    """A TCP relay between one client and one server that keeps every byte it forwards."""

    def __init__(self, target_port: int) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.seen = bytearray()
        self._target = target_port
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                self.seen += data
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:  # one side hung up: the test is over
            pass

    def _run(self) -> None:
        client, _ = self.server.accept()
        for _ in range(600):  # the listener behind it may still be starting
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target))
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
        else:
            client.close()
            return
        back = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        back.start()
        self._pump(client, upstream)
        back.join(10)


def _share_through_relay(federation: Path | None) -> tuple[torch.Tensor, bytes]:
    share = torch.arange(1000, dtype=torch.int64) * 7919 + 123456789
    listener = Listener("127.0.0.1", 0, identity=pki.Identity(federation, "aggregator0") if federation else None)
    relay = _RecordingRelay(listener.port)
    thread, out = _accept_in_background(listener, {"hospital0"})
    sender = _connect(relay.port, "hospital0", federation)
    thread.join(30)
    sender.send("share", {"tag": "round1"}, share)
    received = out["channels"]["hospital0"].expect("share", timeout_s=10).tensor
    sender.close()
    listener.close()
    assert torch.equal(received, share)
    return share, bytes(relay.seen)


def test_a_recording_relay_sees_only_tls_records(federation):
    share, seen = _share_through_relay(federation)
    records, i = set(), 0
    while i + 5 <= len(seen):  # TLS record layer: type, version, length, body
        kind, length = seen[i], int.from_bytes(seen[i + 3 : i + 5], "big")
        records.add(kind)
        i += 5 + length
    assert i == len(seen) and records <= {0x14, 0x15, 0x16, 0x17}  # every byte in a TLS record
    assert 0x17 in records  # application data, encrypted
    for needle in (share.numpy().tobytes()[:64], b"round1", b'hospital0"'):
        assert needle not in seen
    # control: on the plaintext transport the same relay reads the share and the tag
    share, seen = _share_through_relay(None)
    assert share.numpy().tobytes()[:64] in seen and b"round1" in seen


def test_no_role_runs_without_credentials_unless_told_to_go_plaintext():
    from medmpc.protocols.plan import Plan

    with pytest.raises(pki.IdentityError, match="no TLS credentials"):
        Plan().identity("hospital0")
    assert Plan(plaintext_transport=True).identity("hospital0") is None
    assert "in the clear" in Plan(plaintext_transport=True).transport


@pytest.mark.slow
def test_every_bench_output_says_which_channels_it_used():

    def bench(*flags: str) -> dict:
        args = ("bench", "secure-aggregation", "--params", 5000, "--hospitals", 2, "--repeat", 1, "--json", *flags)
        return json.loads(medmpc(*args).stdout)

    secure, plain = bench(), bench("--plaintext-transport")
    assert secure["transport"].startswith("TLS 1.3") and "in the clear" in plain["transport"]
    assert secure["max_abs_err"] < 1e-4 and plain["max_abs_err"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("intruder", ["another CA", "plaintext", None])  # None: the control, all certified
def test_a_crypten_process_without_the_federations_certificate_cannot_join(tmp_path, intruder):
    """The CrypTen parties' own channels (mpc.tls_communicator): a dealer holding a certificate
    of another CA, or speaking plain TCP, stops the run at the handshake, naming it."""
    import sys

    from medmpc.mpc.launch import PartyError, PartyProcess, free_port, party_name, supervise

    names = [party_name(rank, 2) for rank in range(3)]
    pki.init_federation(tmp_path / "ours", names)
    pki.init_federation(tmp_path / "theirs", ["dealer"])
    parties = ",".join(f"127.0.0.1:{free_port()}" for _ in names)
    common = [
        "-m",
        "medmpc.mpc.party",
        "--job",
        "medmpc.mpc.selfcheck:arithmetic",
        "--world-size",
        "2",
        "--parties",
        parties,
        "--timeout",
        "20",
    ]
    dealer_dir = tmp_path / ("theirs" if intruder == "another CA" else "ours")
    dealer_channel = ["--plaintext-transport"] if intruder == "plaintext" else ["--mpc-tls-dir", str(dealer_dir)]
    procs = [
        PartyProcess(f"party{r}", [sys.executable, *common, "--rank", str(r), "--mpc-tls-dir", str(tmp_path / "ours")])
        for r in range(2)
    ]
    procs.append(PartyProcess("dealer", [sys.executable, *common, "--rank", "2", "--dealer", *dealer_channel]))
    if intruder is None:
        assert supervise(procs, timeout_s=60, workdir=tmp_path)["party0"] is None  # ran to the end
        return
    with pytest.raises(PartyError, match="TLS handshake failed|disconnected|malformed"):
        supervise(procs, timeout_s=60, workdir=tmp_path)


def test_front_ends_refuse_plain_http_beyond_this_machine(tmp_path):
    import subprocess
    import sys

    from medmpc.serving.client import PredictionClient

    with pytest.raises(ValueError, match="refusing plain http:// to 198.18.0.7"):
        PredictionClient(["http://198.18.0.7:8000", "https://198.18.0.8:8001"], "t0ken")
    PredictionClient(["http://127.0.0.1:8000", "http://localhost:8001"], "t0ken").close()  # control: loopback
    PredictionClient(["http://198.18.0.7:8000", "http://198.18.0.8:8001"], "t0ken", allow_plain_http=True).close()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medmpc.serving.party",
            "--role",
            "compute",
            "--parties",
            "a:1,b:2,c:3",
            "--plaintext-transport",
            "--host",
            "0.0.0.0",
            "--port",
            "8001",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "refusing to serve plain HTTP on 0.0.0.0" in proc.stderr


def test_predict_sends_one_token_and_never_prints_any(tmp_path):

    secrets = ["first-secret-token", "second-secret-token"]
    tokens = tmp_path / "tokens"
    tokens.write_text("\n".join(secrets) + "\n")
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    run = ("predict", "--servers", "http://127.0.0.1:9,http://127.0.0.1:10", image, "--token-file", tokens)
    proc = medmpc(*run, check=False, timeout=60)
    assert proc.returncode != 0 and "holds 2 tokens" in proc.stderr
    tokens.write_text(secrets[0] + "\n")  # control: one token gets as far as the unreachable server
    proc = medmpc(*run, check=False, timeout=60)
    assert proc.returncode != 0 and "unreachable" in proc.stderr
    for out in (proc.stdout, proc.stderr):
        assert not any(s in out for s in secrets)


def _relayed_simulation(tmp_path: Path, **plan_fields: object) -> tuple[dict, list[_RecordingRelay]]:
    """A whole federated run in which every connection to the coordinator and to each aggregator
    passes a recording relay (the listeners bind elsewhere: Plan.listen_ports)."""
    from medmpc.mpc.launch import free_port
    from medmpc.protocols.plan import Plan
    from medmpc.protocols.simulate import simulate

    plan = Plan(
        hospitals=2,
        aggregators=2,
        rounds=1,
        local_epochs=1,
        data="synthetic:60",
        image_size=32,
        batch_size=16,
        timeout_s=60,
        **plan_fields,
    )
    listeners = {name: free_port() for name in ["coordinator", *plan.aggregator_names]}
    # coordinator: 2 hospitals and 2 aggregators connect; each aggregator: 2 hospitals
    relays = {
        name: [_RecordingRelay(port) for _ in range(4 if name == "coordinator" else 2)]
        for name, port in listeners.items()
    }
    # one advertised port per listener: a small acceptor hands each connection to the next relay
    fronts = {name: _Fanout(relays[name]) for name in listeners}
    plan.listen_ports = listeners
    plan.coordinator_port = fronts["coordinator"].port
    plan.aggregator_ports = [fronts[name].port for name in plan.aggregator_names]
    report = simulate(plan, tmp_path / "run")
    return report, [r for rs in relays.values() for r in rs]


class _Fanout:
    """Accepts connections on one port and splices each into the next relay of a list."""

    def __init__(self, relays: list[_RecordingRelay]) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._run, args=(relays,), daemon=True).start()

    def _run(self, relays: list[_RecordingRelay]) -> None:
        for relay in relays:
            client, _ = self.server.accept()
            upstream = socket.create_connection(("127.0.0.1", relay.port))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_splice, args=(src, dst), daemon=True).start()


def _splice(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _only_tls_records(seen: bytes) -> bool:
    i = 0
    while i + 5 <= len(seen):
        if seen[i] not in (0x14, 0x15, 0x16, 0x17):
            return False
        i += 5 + int.from_bytes(seen[i + 3 : i + 5], "big")
    return i == len(seen)


@pytest.mark.slow
def test_every_link_of_a_secure_simulation_carries_only_tls_records(tmp_path):
    report, relays = _relayed_simulation(tmp_path)
    assert report["transport"].startswith("TLS") and "validation" in report
    assert all(r.seen for r in relays)  # every link was used, and went through a relay
    assert all(_only_tls_records(bytes(r.seen)) for r in relays)
    assert not any(b'"round1"' in r.seen or b"hello" in r.seen for r in relays)
    # control: the same relays read the protocol's messages when the parties talk plain TCP
    report, relays = _relayed_simulation(tmp_path / "plain", plaintext_transport=True)
    assert "in the clear" in report["transport"]
    assert not all(_only_tls_records(bytes(r.seen)) for r in relays)
    assert any(b"hello" in r.seen for r in relays)


def _relayed_service(checkpoint: Path, image: Path, tmp_path: Path, *, plaintext: bool) -> list[bytes]:
    """One prediction through a local service whose three parties reach each other only through
    recording relays (they listen elsewhere: --listen); what each relay saw."""
    from medmpc.mpc.launch import free_port
    from medmpc.serving.client import PredictionClient
    from medmpc.serving.launch import PARTIES, LocalService
    from medmpc.training.checkpoint import Checkpoint

    token = "relay-test-" + "ab" * 16
    tmp_path.mkdir(parents=True, exist_ok=True)
    tokens = tmp_path / "tokens"
    tokens.write_text(token + "\n")
    listen = tuple(free_port() for _ in PARTIES)
    relays = {p: [_RecordingRelay(port) for _ in range(2)] for p, port in zip(PARTIES, listen)}  # 2 peers each
    fronts = tuple(_Fanout(relays[p]).port for p in PARTIES)
    with LocalService(
        checkpoint, tokens, mpc_ports=fronts, mpc_listen_ports=listen, peer_timeout_s=60, plaintext_transport=plaintext
    ) as service:
        with PredictionClient(service.urls, token) as client:
            (prediction,) = client.predict_files([image])
    assert prediction.prediction in Checkpoint.load(checkpoint).classes
    return [bytes(r.seen) for rs in relays.values() for r in rs]


@pytest.mark.slow
def test_every_link_between_the_service_parties_carries_only_tls_records(trained_checkpoint, chest_xray, tmp_path):
    image = sorted((chest_xray / "val" / "NORMAL").iterdir())[0]
    seen = _relayed_service(trained_checkpoint, image, tmp_path / "tls", plaintext=False)
    assert all(seen) and all(_only_tls_records(s) for s in seen)  # 6 one-way links, all TLS
    # control: on plain TCP the same relays read CrypTen's messages (the pickled model card, for one)
    seen = _relayed_service(trained_checkpoint, image, tmp_path / "plain", plaintext=True)
    assert not all(_only_tls_records(s) for s in seen) and any(b"model_name" in s for s in seen)
