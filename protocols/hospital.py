"""The hospital role: holds its own images, trains locally, submits only updates."""

from __future__ import annotations

import datetime
import time
from typing import Any

import torch

from imaging.dataset import ImageSet, load_dataset
from imaging.splits import partition, stratified_split
from imaging.transforms import Preprocessing
from models import build_model
from models.vector import load_vector, to_vector
from mpc.sharing import EncodingError
from mpc.transport import Channel, PeerError, Traffic, connect
from protocols.accountant import BudgetError, PrivacyAccountant
from protocols.commands import die, next_command
from protocols.dp import DPSGD, check_compatible, privacy_summary
from protocols.plan import Plan
from protocols.secure_aggregation import clip_update
from protocols.statistics import local_statistics
from protocols.submit import PlainSubmitter, SecureSubmitter, Submitter
from training.local import TrainConfig, train


def hospital_partition(plan: Plan, index: int) -> ImageSet:
    """This hospital's images: its share of the training data minus the validation split.

    In a real deployment every hospital reads its own folder instead; the
    simulation carves the same folder up reproducibly from the plan's seed.
    """
    data = load_dataset(plan.data, image_size=plan.image_size, num_classes=plan.num_classes, seed=plan.seed)
    train_idx, _ = stratified_split(data.labels, plan.val_fraction, seed=plan.seed)
    parts = partition(data.labels[train_idx], plan.hospitals, plan.partition, seed=plan.seed)
    return data.subset(train_idx[parts[index]])


def contribution_tag(kind: str, meta: dict[str, Any]) -> str:
    """The tag of a "stats" or "train" request, which must be the statistics' or the round's own:
    the aggregators take the noise from the plan by tag (Plan.aggregation), so an update sent
    under another aggregation's tag would get that one's noise. Refuses any other, naming the
    coordinator."""
    tag = meta["tag"]
    expected = {"stats": "stats", "train": f"round{meta.get('round')}"}.get(kind, tag)
    if tag != expected:
        raise PeerError("coordinator", f"sent a {kind!r} request for {tag!r}; it must be {expected!r}")
    return tag


class Hospital:
    def __init__(self, plan: Plan, index: int) -> None:
        self.plan, self.index, self.name = plan, index, f"hospital{index}"
        self.traffic = Traffic()
        self.data: ImageSet | None = None
        self.private: DPSGD | None = None

    def _connect(self) -> tuple[Channel, Submitter]:
        p = self.plan
        links = {"me": self.name, "traffic": self.traffic, "timeout_s": p.timeout_s, "identity": p.identity(self.name)}
        coord = connect(*p.coordinator_address(), peer="coordinator", **links)
        if not p.secure:
            return coord, PlainSubmitter(self.name, coord)
        aggs = [connect(*p.aggregator_address(j), peer=agg, **links) for j, agg in enumerate(p.aggregator_names)]
        return coord, SecureSubmitter(self.name, aggs, n_hospitals=p.hospitals, fractional_bits=p.fractional_bits)

    def _local_update(self, msg_meta: dict[str, Any], global_vector: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Train from the global model; return the sample-weighted delta and the training time."""
        assert self.data is not None
        p = self.plan
        model = build_model(p.model, p.num_classes)
        load_vector(model, global_vector)
        prep = Preprocessing(p.image_size, msg_meta["mean"], msg_meta["std"])
        cfg = TrainConfig(
            epochs=p.local_epochs, batch_size=p.batch_size, lr=p.lr,
            seed=p.seed + 1000 * msg_meta["round"] + self.index,
        )  # fmt: skip
        start = time.perf_counter()
        train(
            model, self.data.images, self.data.labels, prep, cfg, num_classes=p.num_classes,
            class_weight=torch.tensor(msg_meta["class_weight"]), private=self.private,
            desc=f"{self.name} round {msg_meta['round']}",
        )  # fmt: skip
        delta = to_vector(model) - global_vector
        if self.plan.central_dp_noise is not None:
            # central DP: bounded, equally weighted contributions (sensitivity update_clip, on the
            # encoded integers: clipped onto the fixed-point grid)
            clipped = clip_update(delta, clip=self.plan.update_clip, fractional_bits=self.plan.fractional_bits)
            return clipped, time.perf_counter() - start
        return delta * len(self.data), time.perf_counter() - start

    def _baseline(self, coord: Channel) -> torch.Tensor:
        """Bench only: time a plaintext all-reduce of the update among the hospitals."""
        import torch.distributed as dist

        from protocols.bench import baseline_allreduce, bench_update

        p = self.plan
        if not dist.is_initialized():
            dist.init_process_group(
                "gloo", init_method=f"tcp://{p.host}:{p.baseline_port}", rank=self.index,
                world_size=p.hospitals, timeout=datetime.timedelta(seconds=p.timeout_s),
            )  # fmt: skip
            dist.all_reduce(torch.zeros(1))  # connect before timing
        update = bench_update(p, self.index)
        coord.send("baseline_done", {"seconds": baseline_allreduce(update)})
        return update

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
        return DPSGD(
            dp, n_samples=len(self.data), batch_size=self.plan.batch_size,
            planned_epochs=self.plan.rounds * self.plan.local_epochs, who=self.name, prior=prior,
        )  # fmt: skip

    def run(self) -> None:
        if not self.plan.bench_params:
            self.data = hospital_partition(self.plan, self.index)
        self.private = self._setup_privacy()  # before connecting: a refused plan never starts
        coord, submitter = self._connect()
        bench: torch.Tensor | None = None
        while (msg := next_command(coord, self.traffic)) is not None:
            if msg.kind == "baseline":
                bench = self._baseline(coord)
                continue
            if msg.kind == "prepare":
                submitter.prepare(msg.meta["tag"], msg.meta["numel"])
                coord.send("prepared")
                continue
            tag = contribution_tag(msg.kind, msg.meta)
            train_s, drill = 0.0, None
            if msg.kind == "stats":
                assert self.data is not None
                update = local_statistics(self.data)
            elif msg.kind == "train":
                drill = self.plan.drill(self.name, msg.meta["round"])
                if drill == "kill":
                    die()
                assert msg.tensor is not None
                submitter.prepare(tag, msg.tensor.numel())  # masks are made before training ends
                if self.private is not None:
                    try:
                        self.private.reserve(self.plan.local_epochs)
                    except BudgetError as err:
                        submitter.abort(tag, str(err))
                        coord.send("budget_exhausted", {"tag": tag, "hospital": self.name, "reason": str(err)})
                        continue
                update, train_s = self._local_update(msg.meta, msg.tensor)
                if drill in ("nan", "overflow"):  # a broken update that must be refused
                    update[0] = float("nan") if drill == "nan" else 1e30
            elif msg.kind == "bench":
                update = bench
            else:
                raise RuntimeError(f"{self.name}: unexpected message {msg.kind!r} from the coordinator")
            try:
                timings = submitter.submit(tag, update, crash_midway=drill == "crash_sending")
            except EncodingError as err:
                coord.send("aborted", {"tag": tag, "hospital": self.name, "reason": str(err)})
                continue  # the update stays here; nothing about it was revealed
            privacy = {} if self.private is None else {"privacy": privacy_summary(self.private)}
            coord.send("submitted", {"tag": tag, "train_s": train_s, **timings, **privacy})
