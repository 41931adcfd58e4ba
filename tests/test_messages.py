"""The federated protocol's message checks (protocols.messages): what a buggy or malicious peer
sends is refused with a PeerError naming it, before any payload it announces is read."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from medmpc.mpc.prg import SEED_BYTES
from medmpc.mpc.transport import Channel, Message, PeerError, Traffic
from medmpc.protocols import messages
from medmpc.protocols.messages import Collect, Kind, Seed, Submitted, TrafficReport, Train, Update

TRAIN = {"tag": "round1", "round": 1, "mean": 0.5, "std": 0.25, "class_weight": [1.0, 2.0, 1.0]}
COLLECT = {
    "tag": "round1",
    "numel": 8,
    "round": 1,
    "divisor": 3,
    "noise_std": 0.0,
    "hospitals": ["hospital0"],
    "deferred": False,
}


def _parse(kind: str, meta: dict, tensor: torch.Tensor | None = None, *expected: type, numel: int | None = None):
    return messages.parse_any(Message(kind, meta, tensor), "hospital1", expected or (Train,), numel=numel)


def test_a_well_formed_message_parses_into_its_dataclass():
    train = _parse("train", TRAIN, torch.zeros(4))
    assert train == Train("round1", round=1, mean=0.5, std=0.25, class_weight=[1.0, 2.0, 1.0])
    assert _parse("collect", COLLECT, None, Collect) == Collect(**COLLECT)
    assert repr(Kind.SEED) == "'seed'"  # errors name kinds as they travel


@pytest.mark.parametrize(
    "kind,meta,why",
    [
        ("abort", {}, "sent 'abort', expected 'train'"),  # no such kind
        ("collect", COLLECT, "expected 'train'"),  # a kind this receiver does not take
        ("train", {**TRAIN, "extra": 1}, "unknown \\['extra'\\]"),
        ("train", {k: v for k, v in TRAIN.items() if k != "std"}, "missing \\['std'\\]"),
        ("train", {**TRAIN, "round": True}, "round=True"),  # a bool is not an int
        ("train", {**TRAIN, "round": "1"}, "round='1'"),
        ("train", {**TRAIN, "mean": float("nan")}, "mean=nan"),  # floats are finite
        ("train", {**TRAIN, "std": float("inf")}, "std=inf"),
        ("train", {**TRAIN, "class_weight": [1.0, "x"]}, "class_weight="),
        ("train", {**TRAIN, "round": 0}, "round must be in"),
        ("train", {**TRAIN, "round": 2**70}, "round must be in"),
        ("train", {**TRAIN, "std": 0.0}, "must be positive"),
    ],
)
def test_a_malformed_message_is_refused_naming_the_sender(kind, meta, why):
    with pytest.raises(PeerError, match=f"^hospital1: .*{why}"):
        _parse(kind, meta, torch.zeros(4))


@pytest.mark.parametrize(
    "meta,why",
    [
        ({**COLLECT, "numel": -5}, "numel must be in"),
        ({**COLLECT, "numel": 2**40}, "numel must be in"),
        ({**COLLECT, "divisor": 0}, "divisor must be positive"),
        ({**COLLECT, "noise_std": -1.0}, "noise_std not negative"),
        ({**COLLECT, "noise_std": float("nan")}, "noise_std=nan"),
    ],
)
def test_collect_requests_out_of_range_are_refused(meta, why):
    with pytest.raises(PeerError, match=why):
        _parse("collect", meta, None, Collect)


def test_replies_are_checked_inside_their_containers():
    good = {"tag": "round1", "train_s": 1.0, "share_s": 0.1, "send_s": 0.2, "privacy": {"epsilon": 2.5}}
    assert _parse("submitted", good, None, Submitted).privacy == {"epsilon": 2.5}
    for privacy in ({}, {"x": 1}, {"epsilon": "hi"}, {"epsilon": float("nan")}):
        with pytest.raises(PeerError, match="hospital1: "):
            _parse("submitted", {**good, "privacy": privacy}, None, Submitted)
    counts = TrafficReport(Traffic().as_dict()).counts
    with pytest.raises(PeerError, match="counts must be"):
        _parse("traffic", {"counts": {}}, None, TrafficReport)
    with pytest.raises(PeerError, match="non-negative"):
        _parse("traffic", {"counts": {k: -1 for k in counts}}, None, TrafficReport)


def test_payloads_must_be_what_the_kind_carries():
    with pytest.raises(PeerError, match="'train' with no payload, expected a torch.float32 payload"):
        _parse("train", TRAIN, None)
    with pytest.raises(PeerError, match="'train' with a torch.int64 payload"):
        _parse("train", TRAIN, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(PeerError, match="'train' with 4 values, expected 10"):
        _parse("train", TRAIN, torch.zeros(4), numel=10)
    with pytest.raises(PeerError, match="'collect' with a torch.float32 payload, expected no payload"):
        _parse("collect", COLLECT, torch.zeros(4), Collect)
    seed = {"tag": "round1", "numel": 8}
    with pytest.raises(PeerError, match=f"'seed' with 31 values, expected {SEED_BYTES}"):
        _parse("seed", seed, torch.zeros(31, dtype=torch.uint8), Seed, numel=8)  # the seed's own size wins
    assert _parse("seed", seed, torch.zeros(SEED_BYTES, dtype=torch.uint8), Seed, numel=8).numel == 8


def _linked() -> tuple[Channel, Channel]:
    """Two ends of a loopback TCP connection: the coordinator's side and the hospital's."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return Channel(a, "hospital1", Traffic(), 5.0), Channel(b, "hospital1", Traffic(), 5.0)


def test_a_refused_payload_is_never_read():
    """A header announcing 2^40 values is refused from the header alone: nothing is allocated,
    and the channel is closed rather than left with the unread bytes."""
    sender, receiver = _linked()
    header = {"kind": "update", "meta": {"tag": "round1"}, "dtype": "torch.float32", "shape": [2**40]}
    thread = threading.Thread(target=sender._send_header, args=(header,))
    thread.start()
    with pytest.raises(PeerError, match=f"hospital1: sent 'update' with {2**40} values, expected 8"):
        messages.receive(receiver, Update, numel=8)
    thread.join(5)
    assert receiver.sock.fileno() == -1  # closed
    # control: the same header with the expected size is taken, and its payload read
    sender, receiver = _linked()
    messages.send(sender, Update("round1"), torch.arange(8.0))
    update, msg = messages.receive(receiver, Update, numel=8)
    assert update == Update("round1") and torch.equal(msg.tensor, torch.arange(8.0))
