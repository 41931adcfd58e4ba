"""The hospital role: holds its own images, trains locally, submits only updates."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from medmpc.imaging.dataset import ImageSet
from medmpc.imaging.splits import partition
from medmpc.imaging.transforms import Preprocessing
from medmpc.models import architecture, build_model
from medmpc.models.vector import load_vector, to_vector
from medmpc.mpc.sharing import EncodingError
from medmpc.mpc.transport import Channel, PeerError, Traffic, connect
from medmpc.protocols import messages
from medmpc.protocols.commands import next_command
from medmpc.protocols.messages import Contribute, OutOfBudget, Refused, Stats, Submitted, Train
from medmpc.protocols.plan import Plan, plan_data
from medmpc.protocols.run_state import load_accountant, save_accountant
from medmpc.protocols.secure_aggregation import clip_update
from medmpc.protocols.submit import PlainSubmitter, SecureSubmitter, Submitter
from medmpc.training.accountant import BudgetError, PrivacyAccountant
from medmpc.training.dp import DPSGD, check_compatible, privacy_summary
from medmpc.training.local import TrainConfig, train
from medmpc.training.statistics import local_statistics


def hospital_partition(plan: Plan, index: int) -> ImageSet:
    """This hospital's images: its share of the training data minus the validation split.

    In a real deployment every hospital reads its own folder instead; the
    simulation carves the same folder up reproducibly from the plan's seed.
    """
    shared, _ = plan_data(plan)
    parts = partition(shared.labels, plan.hospitals, plan.partition, seed=plan.seed)
    return shared.subset(parts[index])


def check_tag(request: Stats | Train) -> str:
    """The tag of a request, which must be the statistics' or the round's own: the aggregators
    take the noise from the plan by tag (Plan.aggregation), so an update sent under another
    aggregation's tag would get that one's noise. Refuses any other, naming the coordinator."""
    expected = "stats" if isinstance(request, Stats) else f"round{request.round}"
    if request.tag != expected:
        raise PeerError("coordinator", f"sent a {request.KIND!r} request for {request.tag!r}; it must be {expected!r}")
    return request.tag


class Hospital:
    def __init__(self, plan: Plan, index: int, *, state: Path | None = None, resume: bool = False) -> None:
        """``state``: where this hospital keeps its DP-SGD accountant (protocols.run_state) after
        every reservation; ``resume``: start from the accountant saved there, if any."""
        self.plan, self.index, self.name = plan, index, f"hospital{index}"
        self.state, self.resume = state, resume
        self.traffic = Traffic()
        self.data: ImageSet | None = None
        self.private: DPSGD | None = None

    def _connect(self) -> tuple[Channel, Submitter]:
        p = self.plan
        identity = p.identity(self.name)

        def link(address: tuple[str, int], peer: str) -> Channel:
            return connect(
                *address, me=self.name, peer=peer, traffic=self.traffic, timeout_s=p.timeout_s, identity=identity
            )

        coord = link(p.coordinator_address(), "coordinator")
        if not p.secure:
            return coord, PlainSubmitter(self.name, coord)
        aggs = [link(p.aggregator_address(j), agg) for j, agg in enumerate(p.aggregator_names)]
        return coord, SecureSubmitter(self.name, aggs, n_hospitals=p.hospitals, fractional_bits=p.fractional_bits)

    def _local_update(self, request: Train, global_vector: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Train from the global model; return the delta (sample-weighted, unless the plan averages
        with equal weights) and the training time."""
        assert self.data is not None
        p = self.plan
        model = build_model(p.model, p.num_classes)
        load_vector(model, global_vector)
        prep = Preprocessing(p.image_size, request.mean, request.std)
        cfg = TrainConfig(
            epochs=p.local_epochs,
            batch_size=p.batch_size,
            lr=p.round_lr(request.round),
            weight_decay=p.weight_decay,
            augment=p.augment,
            mixup=p.mixup,
            precision=p.precision,
            seed=p.seed + 1000 * request.round + self.index,
        )
        start = time.perf_counter()
        train(
            model,
            self.data.images,
            self.data.labels,
            prep,
            cfg,
            num_classes=p.num_classes,
            class_weight=torch.tensor(request.class_weight),
            private=self.private,
            desc=f"{self.name} round {request.round}",
        )
        delta = to_vector(model) - global_vector
        if self.plan.central_dp_noise is not None:
            # central DP: bounded, equally weighted contributions (sensitivity update_clip, on the
            # encoded integers: clipped onto the fixed-point grid)
            clipped = clip_update(delta, clip=self.plan.update_clip, fractional_bits=self.plan.fractional_bits)
            return clipped, time.perf_counter() - start
        if self.plan.norm_checked:  # the bound is on the update itself, which counts once
            return delta, time.perf_counter() - start
        return delta * len(self.data), time.perf_counter() - start

    def _setup_privacy(self) -> DPSGD | None:
        """Plan DP-SGD for every local epoch of every round; refuse a plan that cannot meet the budget."""
        dp = self.plan.dp_config()
        if dp is not None or self.plan.central_dp_noise is not None:
            # also for central DP: noise on BatchNorm running variances could make them negative
            check_compatible(build_model(self.plan.model, self.plan.num_classes), self.plan.model)
        if dp is None:
            return None
        assert self.data is not None
        # the noisy statistics release touched the same patients first
        prior = PrivacyAccountant(self.plan.stats_release())
        private = DPSGD(
            dp,
            n_samples=len(self.data),
            batch_size=self.plan.batch_size,
            planned_epochs=self.plan.rounds * self.plan.local_epochs,
            who=self.name,
            prior=prior,
        )
        if self.resume and self.state is not None and self.state.exists():
            # the noise multiplier was planned for the whole run, as before the interruption
            private.accountant = PrivacyAccountant.from_dict(load_accountant(self.state, self.plan))
        return private

    def _reserve(self, private: DPSGD) -> None:
        """Account for this round's epochs before training, and keep the accountant where a
        resumed run finds it."""
        private.reserve(self.plan.local_epochs)
        if self.state is not None:
            save_accountant(self.state, self.plan, private.accountant.to_dict())

    def run(self) -> None:
        self.data = hospital_partition(self.plan, self.index)
        self.private = self._setup_privacy()  # before connecting: a refused plan never starts
        coord, submitter = self._connect()
        model_numel = to_vector(architecture(self.plan.model, self.plan.num_classes)).numel()
        kept: tuple[str, torch.Tensor] | None = None  # the last contribution, for a rerun of its aggregation
        while (command := next_command(coord, self.traffic, Stats, Train, Contribute, numel=model_numel)) is not None:
            request, msg = command
            if isinstance(request, Contribute):  # the same update again, under fresh masks, without training
                if kept is None or kept[0] != request.tag:
                    raise PeerError(
                        "coordinator", f"asked for {request.tag!r} again, which this hospital did not hand in"
                    )
                self.contribute(coord, submitter, request.tag, kept[1], train_s=0.0)
                continue
            tag = check_tag(request)
            train_s = 0.0
            if isinstance(request, Stats):
                update = local_statistics(self.data)
            else:
                assert msg.tensor is not None  # next_command checked the payload
                submitter.prepare(tag, msg.tensor.numel())  # masks are made before training ends
                if self.private is not None:
                    try:
                        self._reserve(self.private)
                    except BudgetError as err:
                        submitter.withdraw(tag, str(err))
                        messages.send(coord, OutOfBudget(tag, hospital=self.name, reason=str(err)))
                        continue
                update, train_s = self._local_update(request, msg.tensor)
            kept = (tag, update)
            self.contribute(coord, submitter, tag, update, train_s=train_s)

    def contribute(
        self, coord: Channel, submitter: Submitter, tag: str, update: torch.Tensor, *, train_s: float
    ) -> None:
        """Submit ``update`` to aggregation ``tag`` and tell the coordinator how it went."""
        try:
            timings = submitter.submit(tag, update)
        except EncodingError as err:
            # the details (how many values, how large) stay in this hospital's own log
            print(str(err), file=sys.stderr, flush=True)
            messages.send(coord, Refused(tag, hospital=self.name, reason=f"{self.name}: update has {err.category}"))
            return  # the update stays here; nothing about it was revealed
        privacy = None if self.private is None else privacy_summary(self.private)
        messages.send(coord, Submitted(tag, train_s=train_s, privacy=privacy, **timings))
