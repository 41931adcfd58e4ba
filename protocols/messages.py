"""Every message of the federated protocol: one kind each, one dataclass each.

The roles never spell a kind as a string: they send a message object with
:func:`send` and read one back with :func:`receive` or :func:`parse`, which
refuse an unexpected kind, a missing or unknown field, or a field of the wrong
type with a :class:`~medmpc.mpc.transport.PeerError` naming the sender. Tensor
payloads (a global model, a seed, a share) travel beside the message, as the
transport frames them; the message says what the payload is.

Who sends what, in the order of one aggregation (K aggregators, aggregator 0 the
collector; the secure path, then the plaintext one)::

    coordinator -> aggregators  Collect          before the hospitals are asked
    coordinator -> hospitals    Stats | Train    (Train carries the global model)
    hospital    -> aggregators  Seed             the K-1 non-collectors, before training ends
    hospital    -> collector    Share | Withdraw the masked update, streamed; or no update
    hospital    -> coordinator  Submitted | Refused | OutOfBudget
    aggregators -> coordinator  Share            the K-1 data-independent shares (offline)
    collector   -> coordinator  Ready | Aborted
    coordinator -> collector    Reveal | Discard
    collector   -> coordinator  Share            its share of the average (online)
    hospital    -> coordinator  Update           plaintext FedAvg only: the update itself

and at any time ``coordinator -> anyone: Report`` (answered with ``TrafficReport``)
and ``Stop``. The benchmark roles (protocols.bench) add ``Baseline``/``BaselineDone``
and ``Prepare``/``Prepared``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, ClassVar, TypeVar, overload

import torch

from medmpc.mpc.transport import Channel, Incoming, Message, PeerError


class Kind(StrEnum):
    STOP = "stop"
    REPORT = "report"
    TRAFFIC = "traffic"
    STATS = "stats"
    TRAIN = "train"
    UPDATE = "update"
    SUBMITTED = "submitted"
    REFUSED = "refused"
    OUT_OF_BUDGET = "out_of_budget"
    SEED = "seed"
    SHARE = "share"
    WITHDRAW = "withdraw"
    COLLECT = "collect"
    READY = "ready"
    ABORTED = "aborted"
    REVEAL = "reveal"
    DISCARD = "discard"
    BASELINE = "baseline"
    BASELINE_DONE = "baseline_done"
    PREPARE = "prepare"
    PREPARED = "prepared"
    CONTRIBUTE = "contribute"


@dataclass(frozen=True)
class Stop:
    """Coordinator -> anyone: the run is over."""

    KIND: ClassVar[Kind] = Kind.STOP


@dataclass(frozen=True)
class Report:
    """Coordinator -> anyone: send your traffic counters."""

    KIND: ClassVar[Kind] = Kind.REPORT


@dataclass(frozen=True)
class TrafficReport:
    """Anyone -> coordinator: bytes and messages this party has sent and received so far."""

    KIND: ClassVar[Kind] = Kind.TRAFFIC
    counts: dict[str, int]


@dataclass(frozen=True)
class Stats:
    """Coordinator -> hospital: contribute your normalisation statistics and class counts."""

    KIND: ClassVar[Kind] = Kind.STATS
    tag: str


@dataclass(frozen=True)
class Train:
    """Coordinator -> hospital: train from the global model (the payload) and contribute the delta."""

    KIND: ClassVar[Kind] = Kind.TRAIN
    tag: str
    round: int
    mean: float
    std: float
    class_weight: list[float]


@dataclass(frozen=True)
class Contribute:
    """Coordinator -> benchmark hospital: contribute your random update."""

    KIND: ClassVar[Kind] = Kind.CONTRIBUTE
    tag: str


@dataclass(frozen=True)
class Update:
    """Hospital -> coordinator, plaintext FedAvg only: the update itself (the payload)."""

    KIND: ClassVar[Kind] = Kind.UPDATE
    tag: str


@dataclass(frozen=True)
class Submitted:
    """Hospital -> coordinator: my contribution to ``tag`` is with the aggregators."""

    KIND: ClassVar[Kind] = Kind.SUBMITTED
    tag: str
    train_s: float
    share_s: float
    send_s: float
    privacy: dict[str, Any] | None = None


@dataclass(frozen=True)
class Refused:
    """Hospital -> coordinator: my update cannot be aggregated (``reason``); it stays here."""

    KIND: ClassVar[Kind] = Kind.REFUSED
    tag: str
    hospital: str
    reason: str


@dataclass(frozen=True)
class OutOfBudget:
    """Hospital -> coordinator: another round would exceed my privacy budget."""

    KIND: ClassVar[Kind] = Kind.OUT_OF_BUDGET
    tag: str
    hospital: str
    reason: str


@dataclass(frozen=True)
class Seed:
    """Hospital -> non-collector aggregator: the seed of its share of my mask (the payload)."""

    KIND: ClassVar[Kind] = Kind.SEED
    tag: str
    numel: int


@dataclass(frozen=True)
class Share:
    """A share streamed as the payload: a hospital's masked update to the collector, or an
    aggregator's share of the average to the coordinator."""

    KIND: ClassVar[Kind] = Kind.SHARE
    tag: str


@dataclass(frozen=True)
class Withdraw:
    """Hospital -> collector: no contribution to ``tag`` will come from me."""

    KIND: ClassVar[Kind] = Kind.WITHDRAW
    tag: str
    hospital: str
    reason: str


@dataclass(frozen=True)
class Collect:
    """Coordinator -> aggregators: aggregation ``tag`` of ``numel`` values begins. ``divisor``
    and ``noise_std`` must be the plan's (Plan.aggregation); an aggregator checks them."""

    KIND: ClassVar[Kind] = Kind.COLLECT
    tag: str
    numel: int
    round: int
    divisor: int
    noise_std: float


@dataclass(frozen=True)
class Ready:
    """Collector -> coordinator: every hospital's share of ``tag`` is in."""

    KIND: ClassVar[Kind] = Kind.READY
    tag: str
    sum_s: float


@dataclass(frozen=True)
class Aborted:
    """Collector -> coordinator: hospitals withdrew from ``tag`` (hospital -> reason); every
    share of it is dropped."""

    KIND: ClassVar[Kind] = Kind.ABORTED
    tag: str
    reasons: dict[str, str]


@dataclass(frozen=True)
class Reveal:
    """Coordinator -> collector: send your share of the average of ``tag``."""

    KIND: ClassVar[Kind] = Kind.REVEAL
    tag: str


@dataclass(frozen=True)
class Discard:
    """Coordinator -> collector: drop every share of ``tag`` unrevealed."""

    KIND: ClassVar[Kind] = Kind.DISCARD
    tag: str


@dataclass(frozen=True)
class Baseline:
    """Benchmark coordinator -> hospitals: time one plaintext all-reduce of your update."""

    KIND: ClassVar[Kind] = Kind.BASELINE


@dataclass(frozen=True)
class BaselineDone:
    KIND: ClassVar[Kind] = Kind.BASELINE_DONE
    seconds: float


@dataclass(frozen=True)
class Prepare:
    """Benchmark coordinator -> hospitals: make your masks and seeds for ``tag`` now (offline)."""

    KIND: ClassVar[Kind] = Kind.PREPARE
    tag: str
    numel: int


@dataclass(frozen=True)
class Prepared:
    KIND: ClassVar[Kind] = Kind.PREPARED


MESSAGES: dict[Kind, type] = {
    cls.KIND: cls
    for cls in (
        Stop,
        Report,
        TrafficReport,
        Stats,
        Train,
        Contribute,
        Update,
        Submitted,
        Refused,
        OutOfBudget,
        Seed,
        Share,
        Withdraw,
        Collect,
        Ready,
        Aborted,
        Reveal,
        Discard,
        Baseline,
        BaselineDone,
        Prepare,
        Prepared,
    )
}
_KINDS = {cls: kind for kind, cls in MESSAGES.items()}

A = TypeVar("A")
B = TypeVar("B")
C = TypeVar("C")
D = TypeVar("D")


def send(channel: Channel, message: Any, tensor: torch.Tensor | None = None) -> None:
    """Send ``message`` (one of this module's dataclasses), with ``tensor`` as its payload."""
    channel.send(message.KIND, asdict(message), tensor)


def send_stream(
    channel: Channel, message: Any, *, dtype: torch.dtype, shape: list[int], pieces: Iterator[torch.Tensor]
) -> None:
    """Send ``message`` with a payload of ``shape`` streamed from ``pieces`` as they are made."""
    channel.send_stream(message.KIND, asdict(message), dtype=dtype, shape=shape, pieces=pieces)


# parse and receive return the union of the kinds they were told to expect
@overload
def parse(msg: Message | Incoming, peer: str, a: type[A], /) -> A: ...
@overload
def parse(msg: Message | Incoming, peer: str, a: type[A], b: type[B], /) -> A | B: ...
@overload
def parse(msg: Message | Incoming, peer: str, a: type[A], b: type[B], c: type[C], /) -> A | B | C: ...
@overload
def parse(msg: Message | Incoming, peer: str, a: type[A], b: type[B], c: type[C], d: type[D], /) -> A | B | C | D: ...
def parse(msg: Message | Incoming, peer: str, *expected: type) -> Any:
    """The typed message behind ``msg`` from ``peer``, which must be one of ``expected``.
    Raises PeerError naming ``peer`` for another kind, a missing or unknown field, or a field
    of the wrong type."""
    cls = MESSAGES.get(Kind(msg.kind)) if msg.kind in Kind._value2member_map_ else None
    if cls is None or cls not in expected:
        wanted = " or ".join(repr(str(_KINDS[c])) for c in expected)
        raise PeerError(peer, f"sent {msg.kind!r}, expected {wanted}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(msg.meta) - set(fields))
    missing = sorted(n for n, f in fields.items() if n not in msg.meta and f.default is dataclasses.MISSING)
    if unknown or missing:
        raise PeerError(peer, f"sent a malformed {msg.kind!r}: missing {missing}, unknown {unknown}")
    for name, value in msg.meta.items():
        if not _conforms(value, hints[name]):
            raise PeerError(peer, f"sent a malformed {msg.kind!r}: {name}={value!r} is not {hints[name]}")
    return cls(**msg.meta)


@overload
def receive(channel: Channel, a: type[A], /) -> tuple[A, Message]: ...
@overload
def receive(channel: Channel, a: type[A], b: type[B], /) -> tuple[A | B, Message]: ...
@overload
def receive(channel: Channel, a: type[A], b: type[B], c: type[C], /) -> tuple[A | B | C, Message]: ...
@overload
def receive(channel: Channel, a: type[A], b: type[B], c: type[C], d: type[D], /) -> tuple[A | B | C | D, Message]: ...
def receive(channel: Channel, *expected: type) -> tuple[Any, Message]:
    """The next message on ``channel``, which must be one of ``expected``, with its payload."""
    msg = channel.recv()
    return parse(msg, channel.peer, *expected), msg


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a JSON-decoded ``value`` fits the type ``hint`` (to the depth of a container's items)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_conforms(k, key) and _conforms(v, item) for k, v in value.items())
    return isinstance(value, hint)
