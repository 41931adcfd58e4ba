"""Framed messages over mutually authenticated TLS 1.3 (or plain TCP, for measurements only),
with deadlines and traffic counters.

A frame is an 8-byte big-endian header length, a JSON header, then an optional
raw tensor payload whose dtype and shape the header gives. Every receive has a
deadline, so a dead or silent peer becomes a :class:`PeerError` naming it
instead of a hang; a malformed frame is a :class:`PeerError` too.

With an :class:`~mpc.pki.Identity` both ends present certificates of the federation CA
and each checks that the other's names the party it expects, before anything else is
sent: a listener takes a peer's name from its certificate, never from what it says.
A listener survives bad connections (no certificate, a wrong one, garbage, a hello
announcing a payload) and keeps accepting good ones; nothing is allocated from a
length field before the peer is authenticated and the header checked.

A channel may be read by one thread while another writes to it only without TLS: an
OpenSSL connection used from two threads at once corrupts its records. Code that sends
while it receives on one link uses two channels (mpc.tls_communicator).
"""

from __future__ import annotations

import functools
import json
import math
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from medmpc.mpc.pki import Identity, peer_name

_LEN = struct.Struct(">Q")
_DTYPES = {str(t): t for t in (torch.float32, torch.float64, torch.int64, torch.uint8)}
MAX_HEADER = 1 << 20
# the transport's own message kinds; the federated protocol's are in protocols.messages
HELLO, ERROR = "hello", "error"
# payloads move in pieces of this size: big enough that a syscall moves a lot, small enough
# that the next stage finds each piece still in cache
PIECE_BYTES = 1 << 21


class PeerError(RuntimeError):
    """A peer disconnected, stalled past the timeout, or broke the protocol."""

    def __init__(self, peer: str, message: str) -> None:
        super().__init__(f"{peer}: {message}")
        self.peer = peer


@dataclass
class Traffic:
    bytes_sent: int = 0
    messages_sent: int = 0
    bytes_received: int = 0
    messages_received: int = 0
    # channels of one process may send or receive from several threads at once
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, *, sent: int = 0, received: int = 0, new_message: bool = True) -> None:
        """``new_message=False``: more bytes of a message already counted (a streamed payload)."""
        with self._lock:
            self.bytes_sent += sent
            self.messages_sent += new_message and bool(sent)
            self.bytes_received += received
            self.messages_received += new_message and bool(received)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


@dataclass
class Message:
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    tensor: torch.Tensor | None = None


@dataclass
class Incoming:
    """A received header whose tensor payload (``dtype`` set) has not been read yet."""

    channel: Channel
    kind: str
    meta: dict[str, Any]
    dtype: torch.dtype | None
    shape: list[int]
    deadline: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.dtype is not None else 0

    def reject(self, message: str) -> PeerError:
        """The error for a payload we will not read; the connection is closed, since the
        unread bytes would be taken for the next message."""
        self.channel.sock.close()
        return PeerError(self.channel.peer, message)

    def read(
        self, *, into: torch.Tensor | None = None, on_piece: Callable[[int, torch.Tensor], None] | None = None
    ) -> torch.Tensor | None:
        """The payload, read straight into tensor memory PIECE_BYTES at a time: into ``into``
        (contiguous, of the announced dtype and size) if given, else into a new tensor, or, with
        ``on_piece`` and no ``into``, into one reused scratch piece (nothing is returned then).
        ``on_piece(start, piece)`` is called after each piece with its element offset, while
        the rest of the payload is still arriving."""
        if self.dtype is None:
            return None
        ch, dtype, numel, size = self.channel, self.dtype, self.numel, self.dtype.itemsize
        if into is not None and (into.dtype != dtype or into.numel() != numel or not into.is_contiguous()):
            raise self.reject(f"sent {numel} {dtype} values, expected {into.numel()} {into.dtype}")
        step = max(1, PIECE_BYTES // size)
        dest = into.view(-1) if into is not None else None
        if dest is None and on_piece is None:
            dest = torch.empty(numel, dtype=dtype)
        buffer = dest if dest is not None else torch.empty(min(step, numel), dtype=dtype)  # else: one scratch piece
        for start in range(0, numel, step):
            piece = buffer[start : start + step] if dest is not None else buffer[: min(step, numel - start)]
            ch._recv_exact(piece.numel() * size, self.deadline, piece.view(torch.uint8).numpy().data)
            ch.traffic.count(received=piece.numel() * size, new_message=False)
            if on_piece is not None:
                on_piece(start, piece)
        if dest is None:
            return None
        return dest.view(self.shape) if into is None else into


class Channel:
    """One connection to a named peer."""

    def __init__(self, sock: socket.socket, peer: str, traffic: Traffic, timeout_s: float) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.peer, self.traffic, self.timeout_s = sock, peer, traffic, timeout_s

    def send(self, kind: str, meta: dict[str, Any] | None = None, tensor: torch.Tensor | None = None) -> None:
        if tensor is None:
            self._send_header({"kind": kind, "meta": meta or {}})
            return
        t = tensor.detach().cpu().contiguous()
        self.send_stream(kind, meta, dtype=t.dtype, shape=list(t.shape), pieces=[t.reshape(-1)] if t.numel() else [])

    def send_error(self, message: str) -> None:
        """Tell the peer why this party gives up on it: its next receive raises PeerError(message)."""
        self.send(ERROR, {"message": message})

    def send_stream(
        self,
        kind: str,
        meta: dict[str, Any] | None,
        *,
        dtype: torch.dtype,
        shape: list[int],
        pieces: Iterable[torch.Tensor],
    ) -> None:
        """A tensor message whose payload is made while it is sent: the header first, then each
        piece as ``pieces`` yields it, so the receiver works on the first pieces while the later
        ones are still being computed. The bytes on the wire are those of :meth:`send`.

        If ``pieces`` fails or yields the wrong amount, the connection is closed: the peer
        sees a broken message (PeerError), never a short or misaligned one."""
        if str(dtype) not in _DTYPES:
            raise TypeError(f"cannot send dtype {dtype}")
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        self._send_header({"kind": kind, "meta": meta or {}, "dtype": str(dtype), "shape": list(shape)})
        sent = 0
        try:
            for piece in pieces:
                if piece.dtype != dtype or sent + piece.numel() > numel:
                    raise ValueError(
                        f"piece of {piece.numel()} {piece.dtype} values does not fit the announced message"
                    )
                self._sendall(piece.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
                sent += piece.numel()
            if sent != numel:
                raise ValueError(f"announced {numel} values, sent {sent}")
        except BaseException:
            self.sock.close()
            raise
        self.traffic.count(sent=nbytes, new_message=False)

    def _send_header(self, header: dict[str, Any]) -> None:
        head = json.dumps(header).encode()
        self._sendall(_LEN.pack(len(head)) + head)
        self.traffic.count(sent=_LEN.size + len(head))

    def _sendall(self, data: bytes | memoryview) -> None:
        try:
            self.sock.settimeout(self.timeout_s)
            self.sock.sendall(data)
        except OSError as err:
            raise PeerError(self.peer, f"send failed ({err})") from err

    def _recv_exact(
        self, n: int, deadline: float, into: memoryview | None = None, *, wait_s: float | None = None
    ) -> memoryview:
        view = memoryview(bytearray(n)) if into is None else into
        got = 0
        silent = f"no message within {self.timeout_s if wait_s is None else wait_s:.0f} s (stalled or dead)"
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerError(self.peer, silent)
            self.sock.settimeout(left)
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except TimeoutError as err:
                raise PeerError(self.peer, silent) from err
            except OSError as err:
                raise PeerError(self.peer, f"connection lost ({err})") from err
            if k == 0:
                raise PeerError(self.peer, "disconnected (process ended or crashed)")
            got += k
        return view

    def recv(
        self,
        timeout_s: float | None = None,
        *,
        into: torch.Tensor | None = None,
        on_piece: Callable[[int, torch.Tensor], None] | None = None,
    ) -> Message:
        """The next message, payload included (see :meth:`Incoming.read` for ``into``/``on_piece``)."""
        incoming = self.recv_header(timeout_s)
        return Message(incoming.kind, incoming.meta, incoming.read(into=into, on_piece=on_piece))

    def recv_header(self, timeout_s: float | None = None) -> Incoming:
        """The next message's header; its payload, if any, must be read next (``Incoming.read``),
        within the same deadline. Lets a receiver check who sent what before taking the payload."""
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait_s
        (n,) = _LEN.unpack(self._recv_exact(_LEN.size, deadline, wait_s=wait_s))
        if n > MAX_HEADER:
            raise PeerError(self.peer, f"header of {n} bytes is too large (at most {MAX_HEADER})")
        try:
            header = json.loads(bytes(self._recv_exact(n, deadline)))
            kind, meta = header["kind"], header["meta"]
            dtype = _DTYPES[header["dtype"]] if "dtype" in header else None
            shape = [int(d) for d in header.get("shape", [])]
            if not isinstance(kind, str) or not isinstance(meta, dict) or any(d < 0 for d in shape):
                raise ValueError("kind, meta or shape of the wrong type")
        except (ValueError, KeyError, TypeError) as err:
            raise PeerError(self.peer, f"sent a malformed frame ({type(err).__name__}: {err})") from None
        self.traffic.count(received=_LEN.size + n)
        if kind == ERROR:
            raise PeerError(self.peer, str(meta.get("message", "reported an error")))
        return Incoming(self, kind, meta, dtype, shape, deadline)

    def expect(
        self,
        kind: str,
        timeout_s: float | None = None,
        *,
        into: torch.Tensor | None = None,
        on_piece: Callable[[int, torch.Tensor], None] | None = None,
    ) -> Message:
        msg = self.recv(timeout_s, into=into, on_piece=on_piece)
        if msg.kind != kind:
            raise PeerError(self.peer, f"expected a {kind!r} message, got {msg.kind!r}")
        return msg

    def close(self) -> None:
        self.sock.close()


def _advanced_past(done: int, progress: list[int], failures: list[BaseException]) -> bool:
    return bool(failures) or min(progress) > done


def gather(
    channels: list[Channel], kind: str, into: list[torch.Tensor], on_ready: Callable[[int, int], None]
) -> list[Message]:
    """One ``kind`` tensor message from each channel, received concurrently, channel j's payload
    into ``into[j]`` (all of one size). ``on_ready(start, end)`` runs in the calling thread for
    each range of elements that every payload has reached, so the caller works on the first
    elements while the rest are still arriving."""
    numel = into[0].numel()
    progress = [0] * len(channels)
    failures: list[BaseException] = []
    changed = threading.Condition()

    def receive(j: int) -> Message:
        def advanced(start: int, piece: torch.Tensor) -> None:
            with changed:
                progress[j] = start + piece.numel()
                changed.notify()

        try:
            return channels[j].expect(kind, into=into[j], on_piece=advanced)
        except BaseException as err:
            with changed:
                failures.append(err)
                changed.notify()
            raise

    with ThreadPoolExecutor(len(channels)) as pool:
        futures = [pool.submit(receive, j) for j in range(len(channels))]
        done = 0
        while done < numel:
            with changed:
                changed.wait_for(functools.partial(_advanced_past, done, progress, failures))
                if failures:
                    raise failures[0]
                ready = min(progress)
            on_ready(done, ready)
            done = ready
        return [f.result() for f in futures]


def connect(
    host: str,
    port: int,
    *,
    me: str,
    peer: str,
    traffic: Traffic,
    timeout_s: float,
    identity: Identity | None,
) -> Channel:
    """Connect (retrying while the peer starts up), check that the peer's certificate names
    ``peer`` (with an ``identity``; ``None`` is plain TCP), and introduce ourselves."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
            break
        except OSError as err:
            if time.monotonic() > deadline:
                raise PeerError(peer, f"cannot connect to {host}:{port} within {timeout_s:.0f} s ({err})") from err
            time.sleep(0.05)
    if identity is not None:
        sock = _authenticated(
            identity.client_context().wrap_socket(sock, do_handshake_on_connect=False), peer, deadline, expected={peer}
        )
    ch = Channel(sock, peer, traffic, timeout_s)
    ch.send(HELLO, {"from": me})
    return ch


def _authenticated(sock: ssl.SSLSocket, peer: str, deadline: float, *, expected: set[str]) -> ssl.SSLSocket:
    """``sock`` after its TLS handshake, if the peer's verified certificate names one of ``expected``."""
    try:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        sock.do_handshake()
    except (ssl.SSLError, OSError) as err:
        sock.close()
        raise PeerError(peer, f"TLS handshake failed ({err})") from None
    name = peer_name(sock)
    if name not in expected:
        sock.close()
        raise PeerError(peer, f"presented a certificate for {name!r}, expected {' or '.join(sorted(expected))}")
    return sock


class Listener:
    """Accepts connections from a known set of peers: with an ``identity``, each is named by
    its certificate (and must say the same name in its hello); without, by its hello alone."""

    def __init__(self, host: str, port: int, *, identity: Identity | None) -> None:
        self.identity = identity
        self._context = identity.server_context() if identity is not None else None
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.port = int(self.sock.getsockname()[1])

    def accept(self, expected: set[str], *, traffic: Traffic, timeout_s: float) -> dict[str, Channel]:
        channels: dict[str, Channel] = {}
        deadline = time.monotonic() + timeout_s
        while len(channels) < len(expected):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = ", ".join(sorted(expected - set(channels)))
                raise PeerError(missing, f"did not connect within {timeout_s:.0f} s")
            self.sock.settimeout(left)
            try:
                sock, _ = self.sock.accept()
            except TimeoutError:
                continue
            try:
                ch = self._introduced(sock, expected - set(channels), traffic, timeout_s, deadline)
            except PeerError as err:  # one bad connection never stops the listener
                print(f"listener: refused a connection: {err}", file=sys.stderr)
                continue
            channels[ch.peer] = ch
        return channels

    def _introduced(
        self, sock: socket.socket, expected: set[str], traffic: Traffic, timeout_s: float, deadline: float
    ) -> Channel:
        who = "unknown peer"
        if self._context is not None:
            tls = self._context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            sock = _authenticated(tls, who, deadline, expected=expected)
            who = peer_name(sock)
        ch = Channel(sock, who, traffic, timeout_s)
        try:
            hello = ch.recv_header(max(0.1, deadline - time.monotonic()))
            name = hello.meta.get("from", "")
            if hello.kind != HELLO or hello.dtype is not None:
                raise PeerError(who, f"sent {hello.kind!r} with a payload where a hello was due")
            if name not in expected or (self._context is not None and name != who):
                ch.send_error(f"unexpected peer {name!r}")
                raise PeerError(who, f"introduced itself as {name!r}, expected one of {sorted(expected)}")
        except PeerError:
            ch.close()
            raise
        ch.peer = name
        return ch

    def close(self) -> None:
        self.sock.close()
