"""The federated run plan every role reads: who takes part, where they listen, what to train.

A plan comes from defaults, then a TOML config file, then command-line
overrides, and travels to every process as JSON.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medmpc.imaging.dataset import ImageSet, load_dataset
from medmpc.imaging.splits import parse_scheme
from medmpc.imaging.transforms import MIN_IMAGE_SIZE
from medmpc.models import model_names
from medmpc.mpc.pki import Identity, IdentityError, describe_channels
from medmpc.mpc.sharing import DEFAULT_FRACTIONAL_BITS
from medmpc.protocols.norm_check import max_bound, world_environment
from medmpc.training.dp import DPConfig
from medmpc.training.statistics import release_history


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# what each annotation of Plan admits, and how to say it: a TOML file or JSON may hold any type in any field
_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_whole, "a whole number"),
    "float": (_number, "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int | None": (lambda v: v is None or _whole(v), "a whole number"),
    "float | None": (lambda v: v is None or _number(v), "a number"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "list[int]": (lambda v: isinstance(v, list) and all(_whole(x) for x in v), "a list of whole numbers"),
    "dict[str, int]": (
        lambda v: isinstance(v, dict) and all(_whole(x) for x in v.values()),
        "a table of whole numbers",
    ),
}


LR_DECAYS = ("none", "cosine")
RECIPE = (
    "model",
    "image_size",
    "rounds",
    "local_epochs",
    "batch_size",
    "lr",
    "lr_decay",
    "weight_decay",
    "augment",
    "mixup",
    "precision",
    "partition",
)


@dataclass
class Plan:
    hospitals: int = 3
    aggregators: int = 2
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 2e-3
    # the training recipe (training.local.TrainConfig): weight decay, augmentation by name
    # (imaging.transforms.AUGMENTATIONS), MixUp's Beta parameter (0: off), and the peak learning
    # rate across rounds: "none" keeps lr, "cosine" decays it to lr / 10 by the last round
    weight_decay: float = 1e-4
    augment: str = "affine"
    mixup: float = 0.0
    lr_decay: str = "none"
    # the floating point of local training's passes (training.local.PRECISIONS)
    precision: str = "fp32"
    data: str = "synthetic"
    # a labelled folder from another acquisition, evaluated with the selected model at the end
    # (never used for training or selection): the report's shift_check
    shift_data: str = ""
    num_classes: int = 3
    image_size: int = 64
    model: str = "cnn"
    partition: str = "iid"
    val_fraction: float = 0.15
    seed: int = 0
    secure: bool = True
    fractional_bits: int = DEFAULT_FRACTIONAL_BITS
    timeout_s: float = 300.0
    # the fewest hospitals whose updates make a round (None: 3, or every hospital where fewer);
    # below it the round fails and nothing is revealed. With fewer than all hospitals allowed, a
    # hospital that fails is left out of its round (protocols.strategy) at the cost of the
    # aggregators' data-independent shares moving online.
    min_hospitals: int | None = None
    # Addresses. ``host`` is everyone's address unless a role's own is given (one
    # machine per role); listeners bind to ``bind`` if set (e.g. "0.0.0.0").
    host: str = "127.0.0.1"
    coordinator_host: str = ""
    aggregator_hosts: list[str] = field(default_factory=list)
    bind: str = ""
    coordinator_port: int = 0
    aggregator_ports: list[int] = field(default_factory=list)
    # the ports the listeners bind, where they differ from the ports the others connect to (a
    # port forward, NAT, or a relay in between); empty: the same
    listen_ports: dict[str, int] = field(default_factory=dict)
    # Channels. Every party's key and certificate from one federation CA (`medmpc pki init`);
    # `simulate` makes an ephemeral one per run. plaintext_transport measures the protocol's
    # cost without TLS and is never safe: every share crosses the network in the clear.
    tls_dir: str = ""
    plaintext_transport: bool = False
    # DP-SGD at every hospital when dp_epsilon is set (training.dp)
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    dp_noise: float | None = None
    dp_physical_batch: int = DPConfig.physical_batch
    # distributed central DP: each hospital clips its update to L2 norm update_clip (updates
    # are then averaged with equal weights), and the aggregators add Gaussian noise of total
    # std central_dp_noise * update_clip to the sum inside MPC, each drawing its own part
    central_dp_noise: float | None = None
    update_clip: float = 1.0
    # noise on the aggregated normalisation statistics and class counts: standard deviation
    # of the Gaussian noise on each of them (added inside MPC like central_dp_noise)
    stats_noise: float | None = None
    # the update norm check (protocols.norm_check): the aggregators reject, inside MPC, every
    # update of L2 norm above update_norm_bound, or, with update_norm_factor, above that factor
    # times the norm of round r-1's revealed average update where that is smaller; updates are
    # then averaged with equal weights over the accepted hospitals
    update_norm_bound: float | None = None
    update_norm_factor: float | None = None
    # where the aggregators' check runs: their CrypTen listeners, and the dealer's
    aggregator_mpc_ports: list[int] = field(default_factory=list)
    dealer_host: str = ""
    dealer_port: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            admits, kind = _TYPES[str(f.type)]
            if not admits(value):
                raise ValueError(f"plan setting {f.name} must be {kind}, got {value!r}")
        if self.model not in model_names():
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(model_names())}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels, got {self.image_size}")
        if self.num_classes not in (2, 3):
            raise ValueError(f"num_classes must be 2 or 3, got {self.num_classes}")
        if self.batch_size < 1 or not self.lr > 0 or not self.timeout_s > 0 or not 0 < self.val_fraction < 1:
            raise ValueError(
                "batch_size must be at least 1, lr and timeout_s positive and val_fraction in (0, 1); got "
                f"{self.batch_size}, {self.lr}, {self.timeout_s} and {self.val_fraction}"
            )
        parse_scheme(self.partition, self.hospitals)
        self._check_recipe()
        if self.hospitals < 2:
            raise ValueError(f"secure aggregation needs at least 2 hospitals, got {self.hospitals}")
        if self.secure and self.aggregators < 2:
            raise ValueError(f"need at least 2 aggregation parties, got {self.aggregators}")
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError("rounds and local epochs must be at least 1")
        self.dp_config()  # refuses a bad clipping norm, noise multiplier or physical batch now
        if self.central_dp_noise is not None and (self.central_dp_noise < 0 or not self.update_clip > 0):
            raise ValueError("central DP needs central_dp_noise >= 0 and update_clip > 0")
        if self.stats_noise is not None and not self.stats_noise > 0:
            raise ValueError(f"stats_noise must be positive, got {self.stats_noise}")
        if not 0 < self.fractional_bits <= 32:
            raise ValueError(f"fractional bits must be in 1..32, got {self.fractional_bits}")
        self._check_norm_bound()
        if self.min_hospitals is not None and not 2 <= self.min_hospitals <= self.hospitals:
            raise ValueError(
                f"min_hospitals must be in 2..{self.hospitals} (the hospitals), got {self.min_hospitals}: "
                "an average of one hospital is that hospital's update"
            )

    def _check_recipe(self) -> None:
        from medmpc.imaging.transforms import augmentation
        from medmpc.training.local import check_precision, check_private_recipe

        augmentation(self.augment)
        check_precision(self.precision)
        if not self.weight_decay >= 0 or not self.mixup >= 0:
            raise ValueError(f"weight_decay and mixup must be at least 0, got {self.weight_decay} and {self.mixup}")
        if self.dp_epsilon is not None:
            check_private_recipe(mixup=self.mixup, precision=self.precision)
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"unknown lr_decay {self.lr_decay!r}; choose one of {', '.join(LR_DECAYS)}")

    def recipe(self) -> dict[str, Any]:
        """How the model was trained, as its checkpoint records it."""
        return {k: getattr(self, k) for k in RECIPE}

    def round_lr(self, round_: int) -> float:
        """The peak learning rate of round ``round_`` (1-based) of local training."""
        if self.lr_decay == "none" or self.rounds == 1:
            return self.lr
        progress = (round_ - 1) / (self.rounds - 1)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def _check_norm_bound(self) -> None:
        if self.update_norm_bound is None:
            if self.update_norm_factor is not None:
                raise ValueError("update_norm_factor needs update_norm_bound, the bound of round 1")
            return
        top = max_bound(self.fractional_bits)
        if not self.secure:
            raise ValueError("the update norm check runs inside MPC: it needs a secure run")
        if not 0 < self.update_norm_bound <= top:
            raise ValueError(
                f"update_norm_bound must be in (0, {top:g}] at {self.fractional_bits} fractional bits, "
                f"got {self.update_norm_bound}"
            )
        if self.update_norm_factor is not None and not self.update_norm_factor > 0:
            raise ValueError(f"update_norm_factor must be positive, got {self.update_norm_factor}")
        if not self.exclusions_possible:
            raise ValueError(
                f"the update norm check leaves rejected hospitals out: it needs min_hospitals below the "
                f"{self.hospitals} hospitals (got {self.quorum})"
            )

    @property
    def norm_checked(self) -> bool:
        return self.update_norm_bound is not None

    def norm_bound(self, round_: int, previous_average_norm: float | None) -> float | None:
        """Round ``round_``'s update norm bound: update_norm_bound, or, adaptive, update_norm_factor
        times the norm of the previous round's revealed average update where that is smaller (never
        larger: hospitals pushing the average up would otherwise raise the bound round by round)."""
        if self.update_norm_bound is None:
            return None
        if self.update_norm_factor is None or round_ == 1 or previous_average_norm is None:
            return self.update_norm_bound
        floor = 2.0**-self.fractional_bits  # a zero average must not make a bound nobody passes
        return min(max(self.update_norm_factor * previous_average_norm, floor), self.update_norm_bound)

    @property
    def quorum(self) -> int:
        """The fewest hospitals whose updates make a round."""
        return self.min_hospitals if self.min_hospitals is not None else min(3, self.hospitals)

    @property
    def exclusions_possible(self) -> bool:
        """Whether a round may go on without a hospital that failed (more hospitals than the quorum)."""
        return self.quorum < self.hospitals

    def dp_config(self) -> DPConfig | None:
        if self.dp_epsilon is None:
            return None
        return DPConfig(self.dp_epsilon, self.dp_delta, self.dp_clip, self.dp_noise, self.dp_physical_batch)

    def stats_release(self) -> list[tuple[float, float, int]]:
        """The statistics release as accountant history (training.statistics), or nothing without
        stats_noise; in a secure run each aggregator knows its own part of the noise, so only K-1
        of K count."""
        counted = (self.aggregators - 1) / self.aggregators if self.secure else 1.0
        return release_history(self.stats_noise, counted=counted)

    def aggregation(
        self, tag: str, *, n_samples: int | None = None, n_hospitals: int | None = None
    ) -> tuple[float, int]:
        """The total standard deviation of the Gaussian noise added to the sum of aggregation ``tag``,
        and the divisor of the sum: the coordinator and the aggregators both take them from here,
        so the aggregators never take the noise (what the accounting counts) from the coordinator.

        * "stats" (the statistics release): noise stats_noise, divisor 1 (the sums themselves);
        * "round1".."round{rounds}": with central DP, noise central_dp_noise * update_clip and the
          mean over hospitals of their clipped updates; with the norm check, no noise and the mean
          over the ``n_hospitals`` whose updates go in (an accepted update counts once, whatever
          its data size: a sample count the hospital reports is one more lever); otherwise no noise, and the divisor is
          ``n_samples``, the total sample count, which only the statistics reveal (a wrong one
          scales the average, nothing more).

        Raises ValueError naming the tag for any other aggregation.
        """
        if tag == "stats":
            return self.stats_noise or 0.0, 1
        round_ = re.fullmatch(r"round([1-9]\d*)", tag)
        if round_ is None or int(round_[1]) > self.rounds:
            raise ValueError(f"the plan has no aggregation {tag!r}: it has stats and round1..round{self.rounds}")
        if self.central_dp_noise is not None:
            return self.central_dp_noise * self.update_clip, self.hospitals
        if self.norm_checked:
            if n_hospitals is None:
                raise ValueError(f"{tag!r} is averaged over the accepted hospitals: its divisor needs n_hospitals")
            return 0.0, n_hospitals
        if n_samples is None:
            raise ValueError(f"{tag!r} is weighted by sample count: its divisor needs n_samples")
        return 0.0, n_samples

    def identity(self, party: str) -> Identity | None:
        """``party``'s TLS credentials, or None on the plaintext transport."""
        if self.plaintext_transport:
            return None
        if not self.tls_dir:
            raise IdentityError(
                f"{party}: no TLS credentials: set tls_dir to a federation folder "
                "(`medmpc pki init`), or plaintext_transport to measure without TLS"
            )
        return Identity(Path(self.tls_dir), party)

    @property
    def transport(self) -> str:
        """What every report says about its channels."""
        return describe_channels(plaintext=self.plaintext_transport)

    def listen_address(self, party: str, address: tuple[str, int]) -> tuple[str, int]:
        """Where ``party``, whose peers connect to ``address``, binds its listener."""
        return self.bind or address[0], self.listen_ports.get(party, address[1])

    def coordinator_address(self) -> tuple[str, int]:
        return self.coordinator_host or self.host, self.coordinator_port

    def aggregator_address(self, j: int) -> tuple[str, int]:
        hosts = self.aggregator_hosts or [self.host] * self.aggregators
        return hosts[j], self.aggregator_ports[j]

    @property
    def hospital_names(self) -> list[str]:
        return [f"hospital{i}" for i in range(self.hospitals)]

    @property
    def aggregator_names(self) -> list[str]:
        return [f"aggregator{j}" for j in range(self.aggregators)] if self.secure else []

    @property
    def party_names(self) -> list[str]:
        """Every role's party (and host) name: the coordinator, the hospitals, the aggregators, and
        the dealer of the norm check."""
        return ["coordinator", *self.hospital_names, *self.aggregator_names, *(["dealer"] if self.norm_checked else [])]

    def mpc_world(self, party: str) -> dict[str, str]:
        """The environment in which ``party`` (an aggregator or the dealer) joins the aggregators'
        CrypTen world for the norm check: their listeners by index, the dealer's last."""
        hosts = self.aggregator_hosts or [self.host] * self.aggregators
        addresses = [f"{h}:{port}" for h, port in zip(hosts, self.aggregator_mpc_ports, strict=True)]
        addresses.append(f"{self.dealer_host or self.host}:{self.dealer_port}")
        names = [*self.aggregator_names, "dealer"]
        rank = names.index(party)
        plaintext = self.identity(party) is None  # refuses a plan with neither credentials nor plaintext
        listen = f"{self.bind}:{addresses[rank].rsplit(':', 1)[1]}" if self.bind else ""
        return world_environment(
            rank=rank, names=names, addresses=addresses, tls_dir=None if plaintext else self.tls_dir, listen=listen
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls(**json.loads(text))


def plan_data(plan: Plan) -> tuple[ImageSet, ImageSet]:
    """The plan's data split into the hospitals' part and the validation part, which the
    coordinator keeps and no hospital trains on. In a simulation every role carves the same
    folder up reproducibly from the plan's seed."""
    data = load_dataset(plan.data, image_size=plan.image_size, num_classes=plan.num_classes, seed=plan.seed)
    return data.held_out(plan.val_fraction, seed=plan.seed)


def plan_shift_data(plan: Plan) -> ImageSet:
    """The plan's shift-check set: a labelled folder from another acquisition (or its root's val/)."""
    return load_dataset(plan.shift_data, image_size=plan.image_size, num_classes=plan.num_classes, split="val")


def load_plan(config: Path | None, overrides: dict[str, Any]) -> Plan:
    """Defaults < TOML file < overrides (``None`` values in overrides are ignored)."""
    values: dict[str, Any] = {}
    known = {f.name for f in fields(Plan)}
    if config is not None:
        try:
            values.update(tomllib.loads(Path(config).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"cannot read config file {config}: {err}") from err
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown key(s) in {config}: {', '.join(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Plan(**values)
    except ValueError as err:
        raise ValueError(f"{err} (in {config} or the flags)" if config else str(err)) from err
