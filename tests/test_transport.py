"""The framed transport over real sockets: streamed payloads, rejected payloads, concurrent gathers."""

import itertools
import socket
import threading

import pytest
import torch

from medmpc.mpc.transport import PIECE_BYTES, Channel, PeerError, Traffic, gather


def _pair(timeout_s: float = 10.0) -> tuple[Channel, Channel]:
    """Two ends of one loopback TCP connection: "left" sends, "right" receives."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    # each end is named for its peer, as in the parties
    return Channel(a, "right", Traffic(), timeout_s), Channel(b, "left", Traffic(), timeout_s)


def _in_background(fn) -> threading.Thread:
    # payloads larger than the socket buffers need a reader on the other end while they are sent
    t = threading.Thread(target=fn)
    t.start()
    return t


def test_a_streamed_payload_arrives_piece_by_piece_and_counts_like_one_message():
    left, right = _pair()
    x = torch.arange(3 * PIECE_BYTES // 8 + 5, dtype=torch.int64)
    sender = _in_background(
        lambda: left.send_stream(
            "share", {"tag": "t"}, dtype=torch.int64, shape=[x.numel()], pieces=iter(x.split(1000))
        )
    )
    seen: list[tuple[int, int]] = []
    total = torch.zeros_like(x)
    msg = right.recv(
        on_piece=lambda start, piece: (
            seen.append((start, piece.numel())),
            total[start : start + piece.numel()].add_(piece),
        )
    )
    sender.join()
    assert msg.kind == "share" and msg.meta == {"tag": "t"} and msg.tensor is None
    assert torch.equal(total, x)
    assert [s for s, _ in seen] == list(range(0, x.numel(), PIECE_BYTES // 8))  # in order, several pieces
    assert sum(n for _, n in seen) == x.numel()
    # the same bytes and one message, as if sent whole
    sender = _in_background(lambda: left.send("share", {"tag": "t"}, x))
    assert torch.equal(right.recv().tensor, x)
    sender.join()
    streamed, whole = left.traffic.as_dict(), right.traffic.as_dict()
    assert streamed["messages_sent"] == 2 and streamed["bytes_sent"] == whole["bytes_received"]


def test_a_stream_that_breaks_its_promise_is_a_broken_message_not_a_short_one():
    left, right = _pair(timeout_s=5)
    with pytest.raises(ValueError, match="announced 10 values, sent 4"):
        left.send_stream("share", {}, dtype=torch.int64, shape=[10], pieces=[torch.zeros(4, dtype=torch.int64)])
    with pytest.raises(PeerError, match="left: disconnected"):
        right.recv()


def test_a_payload_of_the_wrong_size_is_rejected_and_the_connection_closed():
    left, right = _pair(timeout_s=5)
    left.send("share", {}, torch.zeros(6, dtype=torch.int64))
    with pytest.raises(PeerError, match="left: sent 6 torch.int64 values, expected 5 torch.int64"):
        right.recv(into=torch.empty(5, dtype=torch.int64))
    with pytest.raises(OSError):
        right.recv()  # closed: the unread payload can never be taken for a message


def test_gather_hands_out_ranges_every_payload_has_reached():
    pairs = [_pair() for _ in range(3)]
    n = 2 * PIECE_BYTES // 8 + 123
    xs = [torch.randint(-(2**62), 2**62, (n,)) for _ in pairs]
    senders = [_in_background(lambda p=p, x=x: p[0].send("share", {}, x)) for p, x in zip(pairs, xs)]
    into = [torch.empty(n, dtype=torch.int64) for _ in pairs]
    total = torch.zeros(n, dtype=torch.int64)
    ranges: list[tuple[int, int]] = []

    def ready(lo: int, hi: int) -> None:
        ranges.append((lo, hi))
        total[lo:hi] = into[0][lo:hi] + into[1][lo:hi] + into[2][lo:hi]

    msgs = gather([p[1] for p in pairs], "share", into, ready)
    for s in senders:
        s.join()
    assert [m.kind for m in msgs] == ["share"] * 3
    assert ranges[0][0] == 0 and ranges[-1][1] == n and all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert torch.equal(total, xs[0] + xs[1] + xs[2])


def test_gather_fails_with_the_peer_that_broke():
    pairs = [_pair(timeout_s=5) for _ in range(2)]
    pairs[0][0].send("share", {}, torch.ones(8, dtype=torch.int64))
    pairs[1][0].send("error", {"message": "aggregator1: refusing to reveal"})
    with pytest.raises(PeerError, match="refusing to reveal"):
        gather([p[1] for p in pairs], "share", [torch.empty(8, dtype=torch.int64) for _ in pairs], lambda lo, hi: None)
