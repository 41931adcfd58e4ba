"""Every message of the federated protocol: one kind each, one dataclass each.

The roles never spell a kind as a string: they send a message object with
:func:`send` and read one back with :func:`receive` or :func:`parse`, which
refuse an unexpected kind, a missing or unknown field, or a field of the wrong
type with a :class:`~medmpc.mpc.transport.PeerError` naming the sender. Tensor
payloads (a global model, a seed, a share) travel beside the message, as the
transport frames them; the message says what the payload is.

Who sends what, in the order of one aggregation (K aggregators, aggregator 0 the
collector; the secure path, then the plaintext one)::

    coordinator -> aggregators  Collect          before the hospitals are asked (with the norm
                                                 check, the aggregators then agree on a sketch key)
    coordinator -> hospitals    Stats | Train    (Train carries the global model)
    hospital    -> aggregators  Seed             the K-1 non-collectors, before training ends
    hospital    -> collector    Share | Withdraw the masked update, streamed; or no update
    hospital    -> coordinator  Submitted | Refused | OutOfBudget
    aggregators -> coordinator  Share            the K-1 data-independent shares (offline)
    aggregators <-> aggregators (and dealer)     the norm check, in CrypTen: one bit per hospital
    collector   -> coordinator  Ready | Aborted  (Aborted names the hospitals the check rejected)
    coordinator -> collector    Reveal | Discard
    collector   -> coordinator  Share            its share of the average (online)
    hospital    -> coordinator  Update           plaintext FedAvg only: the update itself

Where a round may go on without a hospital (Plan.exclusions_possible), every aggregator answers
Collect with Ready | Aborted and waits for Reveal | Discard before it sends its share; after an
Aborted the coordinator sends ``Contribute`` to the remaining hospitals, which hand in the same
update again under fresh masks.

and at any time ``coordinator -> anyone: Report`` (answered with ``TrafficReport``)
and ``Stop``. The benchmark roles (protocols.bench) add ``Baseline``/``BaselineDone``
and ``Prepare``/``Prepared``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, ClassVar, TypeVar, overload

import torch

from medmpc.mpc.prg import SEED_BYTES
from medmpc.mpc.transport import Channel, Incoming, Message, PeerError, Traffic


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

    def __repr__(self) -> str:  # error messages say 'seed', not <Kind.SEED: 'seed'>
        return repr(self.value)


# bounds no honest message comes near; past them a value is an attack or a bug, refused by name
MAX_NUMEL = 1 << 32  # values in one aggregation
MAX_ROUND = 1 << 20
TRAFFIC_COUNTERS = set(Traffic().as_dict())


def _require(condition: bool, problem: str) -> None:
    if not condition:
        raise ValueError(problem)


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

    def __post_init__(self) -> None:
        _require(set(self.counts) == TRAFFIC_COUNTERS, f"counts must be {sorted(TRAFFIC_COUNTERS)}")
        _require(all(v >= 0 for v in self.counts.values()), "counts must be non-negative")


@dataclass(frozen=True)
class Stats:
    """Coordinator -> hospital: contribute your normalisation statistics and class counts."""

    KIND: ClassVar[Kind] = Kind.STATS
    tag: str


@dataclass(frozen=True)
class Train:
    """Coordinator -> hospital: train from the global model (the payload) and contribute the delta."""

    KIND: ClassVar[Kind] = Kind.TRAIN
    PAYLOAD: ClassVar[torch.dtype | None] = torch.float32
    tag: str
    round: int
    mean: float
    std: float
    class_weight: list[float]

    def __post_init__(self) -> None:
        _require(1 <= self.round <= MAX_ROUND, f"round must be in 1..{MAX_ROUND}")
        _require(self.std > 0 and all(w >= 0 for w in self.class_weight), "std and class weights must be positive")


@dataclass(frozen=True)
class Contribute:
    """Coordinator -> hospital: hand in your update for ``tag`` again (the round's aggregation is
    run again without the hospitals that failed), or, to a benchmark hospital, your random update;
    secret-shared to the aggregators or, ``in_the_clear``, to the coordinator itself (plaintext
    FedAvg)."""

    KIND: ClassVar[Kind] = Kind.CONTRIBUTE
    tag: str
    in_the_clear: bool = False


@dataclass(frozen=True)
class Update:
    """Hospital -> coordinator, plaintext FedAvg only: the update itself (the payload)."""

    KIND: ClassVar[Kind] = Kind.UPDATE
    PAYLOAD: ClassVar[torch.dtype | None] = torch.float32
    tag: str


@dataclass(frozen=True)
class Submitted:
    """Hospital -> coordinator: my contribution to ``tag`` is with the aggregators."""

    KIND: ClassVar[Kind] = Kind.SUBMITTED
    tag: str
    train_s: float
    share_s: float
    send_s: float
    privacy: dict[str, float | int | str | None] | None = None

    def __post_init__(self) -> None:
        _require(min(self.train_s, self.share_s, self.send_s) >= 0, "times must be non-negative")
        _require(self.privacy is None or isinstance(self.privacy.get("epsilon"), float | int), "privacy needs epsilon")


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
    PAYLOAD: ClassVar[torch.dtype | None] = torch.uint8
    PAYLOAD_NUMEL: ClassVar[int | None] = SEED_BYTES
    tag: str
    numel: int

    def __post_init__(self) -> None:
        _require(0 < self.numel <= MAX_NUMEL, f"numel must be in 1..{MAX_NUMEL}")


@dataclass(frozen=True)
class Share:
    """A share streamed as the payload: a hospital's masked update to the collector, or an
    aggregator's share of the average to the coordinator."""

    KIND: ClassVar[Kind] = Kind.SHARE
    PAYLOAD: ClassVar[torch.dtype | None] = torch.int64
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
    """Coordinator -> aggregators: aggregation ``tag`` of ``numel`` values from ``hospitals``
    begins. ``divisor`` and ``noise_std`` must be the plan's (Plan.aggregation); an aggregator
    checks them, and that ``hospitals`` are the plan's and at least its quorum."""

    KIND: ClassVar[Kind] = Kind.COLLECT
    tag: str
    numel: int
    round: int
    divisor: int
    noise_std: float
    hospitals: list[str]
    # the aggregators' mask sums wait for the reveal (the plan lets a round go on without a
    # hospital): each aggregator checks it against its own plan
    deferred: bool
    # the public L2 bound every update must pass (protocols.norm_check), or None: no check
    norm_bound: float | None = None

    def __post_init__(self) -> None:
        _require(self.norm_bound is None or self.norm_bound > 0, "norm_bound must be positive")
        _require(0 < self.numel <= MAX_NUMEL, f"numel must be in 1..{MAX_NUMEL}")
        _require(0 <= self.round <= MAX_ROUND, f"round must be in 0..{MAX_ROUND}")
        _require(self.divisor >= 1 and self.noise_std >= 0, "divisor must be positive and noise_std not negative")


@dataclass(frozen=True)
class Ready:
    """Collector (or any aggregator, where exclusions are possible) -> coordinator: every
    expected hospital's share of ``tag`` is in."""

    KIND: ClassVar[Kind] = Kind.READY
    tag: str
    sum_s: float
    # the norm check's online cost at this aggregator (protocols.norm_check), where it ran
    check_s: float = 0.0
    check_bytes: int = 0
    check_rounds: int = 0

    def __post_init__(self) -> None:
        _require(min(self.sum_s, self.check_s, self.check_bytes, self.check_rounds) >= 0, "costs must be non-negative")


@dataclass(frozen=True)
class Aborted:
    """Aggregator -> coordinator: hospitals withdrew from ``tag`` or failed (hospital -> reason);
    every share of it is dropped. ``lost``: those whose connection to this aggregator is gone."""

    KIND: ClassVar[Kind] = Kind.ABORTED
    tag: str
    reasons: dict[str, str]
    lost: list[str]


@dataclass(frozen=True)
class Reveal:
    """Coordinator -> collector (every aggregator, where exclusions are possible): send your
    share of the average of ``tag``."""

    KIND: ClassVar[Kind] = Kind.REVEAL
    tag: str


@dataclass(frozen=True)
class Discard:
    """Coordinator -> collector (every aggregator, where exclusions are possible): drop every
    share of ``tag`` unrevealed."""

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

    def __post_init__(self) -> None:
        _require(self.seconds >= 0, "seconds must be non-negative")


@dataclass(frozen=True)
class Prepare:
    """Benchmark coordinator -> hospitals: make your masks and seeds for ``tag`` now (offline)."""

    KIND: ClassVar[Kind] = Kind.PREPARE
    tag: str
    numel: int

    def __post_init__(self) -> None:
        _require(0 < self.numel <= MAX_NUMEL, f"numel must be in 1..{MAX_NUMEL}")


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
def parse(msg: Message | Incoming, peer: str, a: type[A], /, *, numel: int | None = None) -> A: ...
@overload
def parse(msg: Message | Incoming, peer: str, a: type[A], b: type[B], /, *, numel: int | None = None) -> A | B: ...
@overload
def parse(
    msg: Message | Incoming, peer: str, a: type[A], b: type[B], c: type[C], /, *, numel: int | None = None
) -> A | B | C: ...
@overload
def parse(
    msg: Message | Incoming, peer: str, a: type[A], b: type[B], c: type[C], d: type[D], /, *, numel: int | None = None
) -> A | B | C | D: ...
def parse(msg: Message | Incoming, peer: str, *expected: type, numel: int | None = None) -> Any:
    return parse_any(msg, peer, expected, numel=numel)


def parse_any(msg: Message | Incoming, peer: str, expected: tuple[type, ...], *, numel: int | None = None) -> Any:
    """The typed message behind ``msg`` from ``peer``, which must be one of ``expected``.

    Raises PeerError naming ``peer`` for another kind, a missing or unknown field, a field of
    the wrong type (floats must be finite) or out of its range, or a payload the kind does not
    carry: of another dtype, or of another size than ``numel`` (where the receiver knows it) or
    than the kind's own. On a header (Incoming) this is all checked before the payload is read.
    """
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
    if isinstance(msg, Incoming):
        dtype, count = msg.dtype, msg.numel
    else:
        dtype, count = (None, 0) if msg.tensor is None else (msg.tensor.dtype, msg.tensor.numel())
    payload = getattr(cls, "PAYLOAD", None)
    if dtype != payload:
        raise PeerError(peer, f"sent {msg.kind!r} with {_describe(dtype)}, expected {_describe(payload)}")
    size = getattr(cls, "PAYLOAD_NUMEL", None) or numel
    if payload is not None and size is not None and count != size:
        raise PeerError(peer, f"sent {msg.kind!r} with {count} values, expected {size}")
    try:
        return cls(**msg.meta)
    except ValueError as err:
        raise PeerError(peer, f"sent a malformed {msg.kind!r}: {err}") from None


def _describe(dtype: torch.dtype | None) -> str:
    return "no payload" if dtype is None else f"a {dtype} payload"


@overload
def receive(channel: Channel, a: type[A], /, *, numel: int | None = None) -> tuple[A, Message]: ...
@overload
def receive(channel: Channel, a: type[A], b: type[B], /, *, numel: int | None = None) -> tuple[A | B, Message]: ...
@overload
def receive(
    channel: Channel, a: type[A], b: type[B], c: type[C], /, *, numel: int | None = None
) -> tuple[A | B | C, Message]: ...
@overload
def receive(
    channel: Channel, a: type[A], b: type[B], c: type[C], d: type[D], /, *, numel: int | None = None
) -> tuple[A | B | C | D, Message]: ...
def receive(channel: Channel, *expected: type, numel: int | None = None) -> tuple[Any, Message]:
    return receive_any(channel, expected, numel=numel)


def receive_any(
    channel: Channel, expected: tuple[type, ...], *, numel: int | None = None, timeout_s: float | None = None
) -> tuple[Any, Message]:
    """The next message on ``channel``, which must be one of ``expected`` (see :func:`parse_any`),
    with its payload: the header is checked first, and a payload is read only once accepted.
    ``timeout_s``: the wait, if not the channel's own."""
    incoming = channel.recv_header(timeout_s)
    try:
        message = parse_any(incoming, channel.peer, expected, numel=numel)
    except PeerError:
        if incoming.dtype is not None:
            channel.close()  # the unread payload would be taken for the next message
        raise
    return message, Message(incoming.kind, incoming.meta, incoming.read())


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
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_conforms(k, key) and _conforms(v, item) for k, v in value.items())
    return isinstance(value, hint)
