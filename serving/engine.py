"""The batching queue each compute party runs beside its HTTP front end.

Requests arrive at both compute parties independently (one share each). A request
is known by its key, (client id, request id): the client id is what the front end
derives from the client's authenticated token (a hash, never the token itself), so
it is the same at both parties for one client and no other client can claim it;
two clients may therefore use the same request id without meeting. The two
parties' engine threads agree, in lockstep over the CrypTen channel, on which keys
both of them hold; those (up to ``max_batch`` images) form one batch that both run
through the encrypted model in the same order. Per cycle:

1. the leader (model owner, rank 0) offers the keys it holds, with their shapes, in
   round-robin order across clients (each client's oldest request, then each one's
   second oldest, ...), so a client with many waiting requests cannot push another
   client's out of the next batch;
2. the other party answers with those it holds too (and any whose shapes differ);
3. both take the same batch, run it, and hand each request its share of the logits,
   re-randomised with a fresh CSPRNG mask so the returned shares are uniformly random.

A request whose partner share never arrives simply stays unmatched until its
deadline; it never blocks the others. When idle, the leader still offers (an empty
list) every ``heartbeat_s`` and both parties ask the dealer for one tiny triple, so
neither the peer nor the dealer hits its silence timeout.

Idle with nothing prepared for the size of the last batch (one image at first), both parties
prepare that size instead: the offline pass of mpc.compile, which has the dealer make that
batch's keys and triples and opens the convolutions' weight masks, so a batch of that size
runs online only. One size is kept at a time (material for another is dropped: one 64-px
ResNet-18 image's gate keys are hundreds of megabytes); a batch of another size asks the
dealer as it goes.

Admission: at most ``max_queue`` requests wait at a party, and at most
``per_client_queue`` of them from one client, so one client cannot fill the queue
and starve the others.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from medmpc.mpc import crypten_compat, prg
from medmpc.mpc.compile import Program
from medmpc.serving.logs import log
from medmpc.serving.wire import ModelCard

LEADER, FOLLOWER = 0, 1

Key = tuple[str, str]  # (client id, request id)


class EngineUnavailable(RuntimeError):
    """The engine is not (or no longer) running: the peer or the dealer is gone."""


class DuplicateRequest(ValueError):
    pass


class QueueFull(RuntimeError):
    """More requests are waiting than the queue holds; the client should retry later."""


class ClientQuotaExceeded(QueueFull):
    """This client already has as many requests waiting as one client may; others are still admitted."""


class ShareMismatch(ValueError):
    """The two parties received shares of different shapes under one request id."""


@dataclass
class Result:
    logits_share: torch.Tensor
    batch_images: int


@dataclass
class _Pending:
    share: torch.Tensor
    deadline: float
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


def _settle(future: concurrent.futures.Future, *, result: Any = None, error: BaseException | None = None) -> None:
    """Complete a future unless its HTTP request already gave up on it."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled by a timed-out request


def _abandoned(shape: list[int]) -> _Pending:
    """A stand-in share for a request its caller gave up on (zeros: the result is dropped)."""
    return _Pending(torch.zeros(shape, dtype=torch.int64), 0.0)


@dataclass
class Model:
    """What a compute party needs to serve: the public card, the compiled program, its weight shares."""

    card: ModelCard
    program: Program
    weights: dict[str, Any]


class BatchEngine:
    """``per_client_queue`` None means a quarter of ``max_queue`` (at least 1)."""

    def __init__(
        self, *, rank: int, max_batch: int, max_queue: int, heartbeat_s: float, per_client_queue: int | None = None
    ) -> None:
        self.rank = rank
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.per_client_queue = max(1, max_queue // 4) if per_client_queue is None else per_client_queue
        self.heartbeat_s = heartbeat_s
        self.card: ModelCard | None = None
        self.failure: str | None = None
        self._ready = False
        self._lock = threading.Lock()
        self._arrived = threading.Event()
        self._pending: dict[Key, _Pending] = {}  # insertion order = arrival order

    # ---- called from the HTTP side -------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready and self.failure is None

    def submit(
        self, request_id: str, share: torch.Tensor, match_timeout_s: float, *, client: str
    ) -> concurrent.futures.Future:
        """Queue a share under (``client``, ``request_id``); it fails with TimeoutError unless the other
        party holds its partner share within ``match_timeout_s``.

        ``client`` must be derived from the authenticated caller identically at both parties, and must
        not be the secret it is derived from: it travels to the other party and into logs. A front end
        without per-client credentials would pass one id for everyone, and all its clients would share
        one quota and one request-id space (the HTTP app always has tokens: it refuses to start without).
        """
        if not self.ready:
            raise EngineUnavailable(self.failure or "the engine is still starting")
        key = (client, request_id)
        with self._lock:
            if key in self._pending:
                raise DuplicateRequest(f"request {request_id!r} is already queued at this party")
            waiting = sum(c == client for c, _ in self._pending)
            if waiting >= self.per_client_queue:
                raise ClientQuotaExceeded(
                    f"this client already has {waiting} requests waiting "
                    f"(the per-client quota is {self.per_client_queue})"
                )
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already waiting (the queue holds {self.max_queue})")
            pending = _Pending(share, time.monotonic() + match_timeout_s)
            self._pending[key] = pending
        self._arrived.set()
        return pending.future

    def forget(self, request_id: str, *, client: str) -> None:
        """Drop a request whose caller gave up (a no-op once it is in a batch)."""
        with self._lock:
            self._pending.pop((client, request_id), None)

    # ---- the engine thread ---------------------------------------------------------
    def run(self, setup: Callable[[], Model]) -> None:
        """Thread body: ``setup`` initialises CrypTen and shares the weights; then serve until the
        process ends or a peer fails."""
        try:
            model = setup()
            self.card = model.card
            self._ready = True
            log("engine_ready", party=self.rank, model=model.card.model_name, max_batch=self.max_batch)
            self._serve(model)
        except Exception as err:  # the peer or the dealer died, or a timeout: nothing more can be served
            self.failure = f"{type(err).__name__}: {err}"
            log("engine_failed", party=self.rank, error=self.failure)
        finally:
            self._ready = False
            with self._lock:
                pending, self._pending = self._pending, {}
            for p in pending.values():
                _settle(p.future, error=EngineUnavailable(self.failure or "the engine stopped"))

    def _serve(self, model: Model) -> None:
        crypten = crypten_compat.patched()
        comm = crypten.communicator.get()
        last_dealer_contact = time.monotonic()
        retry = False
        prepared: int | None = None  # the batch size whose dealer material is ready, if any
        last_size = 1  # prepare for the size of the last batch (one image at first)
        while True:
            if self.rank == LEADER:
                self._wait_for_work(retry)
                ids = self._offer()
                keepalive = time.monotonic() - last_dealer_contact > self.heartbeat_s
                prepare = last_size if not ids and prepared != last_size else None
                offer = {"ids": ids, "keepalive": keepalive, "prepare": prepare}
            else:
                offer = None
            cycle_start = time.monotonic()
            offer = comm.broadcast_obj(offer, LEADER)
            answer = self._match(offer["ids"]) if self.rank == FOLLOWER else None
            answer = comm.broadcast_obj(answer, FOLLOWER)
            self._fail(
                answer["mismatched"], ShareMismatch("the two compute parties received shares of different shapes")
            )
            # unmatched at a matching round after its deadline: the partner share never came (time
            # spent computing other batches does not count against a request)
            self._expire(before=cycle_start, matched=set(answer["have"]))
            batch = self._claim(answer["have"], dict((rid, shape) for rid, shape in offer["ids"]))
            retry = bool(offer["ids"]) and not batch
            if batch:
                last_size = sum(p.share.shape[0] for _, p in batch)
                if last_size == prepared:
                    prepared = None  # the batch takes it
                self._run_batch(model, batch)
                last_dealer_contact = time.monotonic()
            elif offer["prepare"] is not None:
                if not 1 <= offer["prepare"] <= self.max_batch:
                    raise ValueError(f"the leader asked to prepare {offer['prepare']} images, above --max-batch")
                prepared = offer["prepare"]
                self._prepare(model, prepared)
                last_dealer_contact = time.monotonic()
            elif offer["keepalive"]:
                size = torch.Size([1])
                crypten.mpc.get_default_provider().generate_additive_triple(size, size, "mul")
                last_dealer_contact = time.monotonic()

    def _offer(self) -> list[tuple[Key, list[int]]]:
        """The waiting keys with their shapes, round-robin across clients: each client's oldest, then
        each one's second oldest, ...; clients in the order of their oldest waiting request."""
        with self._lock:
            by_client: dict[str, list[tuple[Key, list[int]]]] = {}
            for key, p in self._pending.items():
                by_client.setdefault(key[0], []).append((key, list(p.share.shape)))
        rounds = itertools.zip_longest(*by_client.values())
        return [entry for round_ in rounds for entry in round_ if entry is not None]

    def _wait_for_work(self, retry: bool) -> None:
        # after an offer nobody could match, poll briefly for the partner shares to arrive
        self._arrived.wait(0.02 if retry else self.heartbeat_s)
        self._arrived.clear()

    def _expire(self, *, before: float, matched: set[Key]) -> None:
        with self._lock:
            late = [rid for rid, p in self._pending.items() if p.deadline < before and rid not in matched]
            expired = [self._pending.pop(rid) for rid in late]
        for p in expired:
            _settle(p.future, error=TimeoutError("the other compute party never received its share"))

    def _match(self, offered: list[tuple[Key, list[int]]]) -> dict[str, list[Key]]:
        have: list[Key] = []
        mismatched: list[Key] = []
        with self._lock:
            for key, shape in offered:
                if key in self._pending:
                    (have if list(self._pending[key].share.shape) == shape else mismatched).append(key)
        return {"have": have, "mismatched": mismatched}

    def _fail(self, ids: list[Key], error: Exception) -> None:
        with self._lock:
            failed = [self._pending.pop(rid) for rid in ids if rid in self._pending]
        for p in failed:
            _settle(p.future, error=error)

    def _claim(self, have: list[Key], shapes: dict[Key, list[int]]) -> list[tuple[Key, _Pending]]:
        """Both parties take the same prefix of ``have`` (the leader's round-robin offer order)."""
        batch, images = [], 0
        for rid in have:
            n = shapes[rid][0]
            if images + n > self.max_batch:
                break
            batch.append(rid)
            images += n
        with self._lock:
            # a request the caller gave up on in the meantime is still computed (the peer
            # expects it); its result is simply dropped
            return [(rid, self._pending.pop(rid) if rid in self._pending else _abandoned(shapes[rid])) for rid in batch]

    def _prepare(self, model: Model, images: int) -> None:
        """While idle: the dealer's material for the next batch of ``images`` (its keys, triples and
        the convolutions' masks), so that batch does not wait for the dealer."""
        crypten = crypten_compat.patched()
        start = time.perf_counter()
        model.program.discard_prepared()  # one batch size at a time: the last one seen
        card = model.card
        shape = (images, card.channels, card.image_size, card.image_size)
        placeholder = crypten.mpc.MPCTensor.from_shares(
            torch.zeros(shape, dtype=torch.int64), precision=card.fractional_bits
        )
        model.program.trace(placeholder, model.weights)
        log("prepared", party=self.rank, images=images, seconds=round(time.perf_counter() - start, 4))

    def _run_batch(self, model: Model, batch: list[tuple[Key, _Pending]]) -> None:
        crypten = crypten_compat.patched()
        start = time.perf_counter()
        shares = torch.cat([p.share for _, p in batch])
        x = crypten.mpc.MPCTensor.from_shares(shares, precision=model.card.fractional_bits)
        out = model.program.run(x, model.weights)._tensor.share
        # re-randomise: the leader adds a fresh CSPRNG mask, the follower subtracts it
        mask = prg.random_ring(out.numel()).view_as(out) if self.rank == LEADER else torch.empty_like(out)
        mask = crypten.communicator.get().broadcast(mask, LEADER)
        out = out + mask if self.rank == LEADER else out - mask
        images = shares.shape[0]
        for part, (_, p) in zip(out.split([p.share.shape[0] for _, p in batch]), batch):
            _settle(p.future, result=Result(part.clone(), images))
        log("batch", party=self.rank, requests=len(batch), images=images, seconds=round(time.perf_counter() - start, 4))
