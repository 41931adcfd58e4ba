"""The coordinator role: drives the rounds, sees only revealed averages, evaluates, reports."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from medmpc.imaging.transforms import Preprocessing
from medmpc.models import build_model
from medmpc.models.vector import load_vector, to_vector
from medmpc.mpc.transport import Channel, Listener, PeerError, Traffic
from medmpc.protocols import messages
from medmpc.protocols.messages import (
    Contribute,
    OutOfBudget,
    Refused,
    Report,
    Stats,
    Stop,
    Submitted,
    TrafficReport,
    Train,
    Update,
)
from medmpc.protocols.plan import Plan, plan_data, plan_shift_data
from medmpc.protocols.run_state import CoordinatorState
from medmpc.protocols.strategy import Aggregation, BudgetExhausted, PlainFedAvg, RoundAborted, SecureFedAvg, Strategy
from medmpc.training.accountant import PrivacyAccountant
from medmpc.training.checkpoint import Checkpoint
from medmpc.training.evaluation import Selection, shift_check
from medmpc.training.local import class_weights, predict
from medmpc.training.metrics import classification_metrics
from medmpc.training.reports import write_json
from medmpc.training.statistics import Statistics, release_privacy

_CURVE_KEYS = ("accuracy", "balanced_accuracy", "mcc", "roc_auc", "pneumonia_roc_auc")


class Coordinator:
    def __init__(self, plan: Plan, out: Path, *, resume: bool = False) -> None:
        """``resume``: continue the run whose state this coordinator saved in ``out``
        (protocols.run_state) at the round after the last completed one."""
        self.plan, self.out, self.resume = plan, out, resume
        self.traffic = Traffic()
        self.channels: dict[str, Channel] = {}
        self.gone: dict[str, str] = {}  # hospitals this coordinator no longer talks to, and why
        self.last_traffic: dict[str, dict[str, int]] = {}

    # -- one aggregation -------------------------------------------------
    def aggregate(
        self,
        strategy: Strategy,
        job: Aggregation,
        request: Stats | Train | Contribute,
        *,
        tensor: torch.Tensor | None = None,
        begun: bool = False,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Send ``request`` (for ``job.tag``) to every hospital still connected; return the revealed
        average and timings, with the hospitals that contributed and those left out (and why).

        A hospital that fails (refuses its update, crashes, falls silent past the timeout, loses a
        connection, sends something malformed) ends the round, unless the plan lets a round go on
        without it: then this aggregation is dropped unrevealed and run again among the others,
        who hand in the same update under fresh masks, while at least the plan's quorum remains.
        An excluded hospital whose connections are intact is invited again next round.
        ``begun``: the caller already called ``strategy.begin`` for every hospital (to let them
        prepare first).
        """
        p, tag = self.plan, job.tag
        excluded = dict(self.gone)
        invited = [h for h in p.hospital_names if h not in self.gone]
        attempts = 0
        out_of_budget = False
        while True:
            attempts += 1
            if len(invited) < p.quorum:
                raise (BudgetExhausted if out_of_budget else RoundAborted)(
                    f"{tag} not run, nothing revealed: {len(invited)} hospitals left, fewer than the {p.quorum} "
                    f"the plan needs; left out: {_listed(excluded)}"
                )
            if job.norm_bound is not None:  # the mean over the hospitals whose updates go in
                job = replace(job, divisor=p.aggregation(tag, n_samples=job.divisor, n_hospitals=len(invited))[1])
            if not (begun and attempts == 1):
                strategy.begin(job, invited)
            # a rerun asks for the same update again (a benchmark's Contribute is its own rerun)
            rerun = request if isinstance(request, Contribute) else Contribute(tag)
            ask, payload = (request, tensor) if attempts == 1 else (rerun, None)
            replies, failed = self._replies(strategy, tag, invited, ask, payload, numel=job.numel)
            if attempts == 1:  # a rerun trains nothing: the round's training time is the first attempt's
                train_s = max((r.train_s for r in replies.values() if isinstance(r, Submitted)), default=0.0)
            settled = strategy.settle()
            failed |= {h: why for h, why in settled.failed.items() if h not in failed}
            for h in settled.lost:
                self._drop(h, tag)
            exhausted = {h: r.reason for h, r in replies.items() if isinstance(r, OutOfBudget)}
            if exhausted or failed:
                strategy.discard()
            if exhausted and not p.exclusions_possible:
                raise BudgetExhausted(f"{tag} not run, nothing revealed: {'; '.join(exhausted.values())}")
            for h, why in exhausted.items():  # it will refuse every later round too
                failed[h] = why.removeprefix(f"{h}: ")
                self.gone[h] = "not invited: out of its privacy budget"
                out_of_budget = True
            if not failed:
                break
            if not p.exclusions_possible:
                raise RoundAborted(f"{tag} aborted, nothing revealed: {_listed(failed)}")
            excluded |= failed
            invited = [h for h in invited if h not in failed]
        avg, timings = strategy.finish()
        submitted = [r for r in replies.values() if isinstance(r, Submitted)]
        info: dict[str, Any] = {
            "local_training_s": train_s,
            "sharing_s": max(r.share_s + r.send_s for r in submitted),
            **timings,
            "contributors": invited,
            "attempts": attempts,
        }
        privacy = {h: r.privacy for h, r in replies.items() if isinstance(r, Submitted) and r.privacy is not None}
        return avg, info | ({"privacy": privacy} if privacy else {}) | ({"excluded": excluded} if excluded else {})

    def _replies(
        self,
        strategy: Strategy,
        tag: str,
        invited: list[str],
        ask: Stats | Train | Contribute,
        payload: torch.Tensor | None,
        *,
        numel: int,
    ) -> tuple[dict[str, Submitted | OutOfBudget], dict[str, str]]:
        """Ask each of ``invited`` and read its reply: the replies, and the hospitals that failed
        (hospital -> why; a failure ends the round here unless the plan allows exclusions)."""
        replies: dict[str, Submitted | OutOfBudget] = {}
        failed: dict[str, str] = {}

        def fail(name: str, err: PeerError) -> None:
            if not self.plan.exclusions_possible:
                raise err
            failed[name] = str(err).removeprefix(f"{name}: ")
            self._drop(name, tag)

        for name in list(invited):
            try:
                messages.send(self.channels[name], ask, payload)
            except PeerError as err:
                fail(name, err)
        # all at once, so every hospital has the same deadline: read one after another, a silent
        # hospital would make the coordinator late for the others, who would then give up on it
        asked = [name for name in invited if name not in failed]
        with ThreadPoolExecutor(max(1, len(asked))) as pool:
            pending = {name: pool.submit(self._reply, strategy, name, tag, numel) for name in asked}
        for name, future in pending.items():
            try:
                reply = future.result()
            except PeerError as err:
                fail(name, err)
                continue
            if isinstance(reply, Refused):
                failed[name] = f"refused: {reply.reason.removeprefix(f'{name}: ')}"
            else:
                replies[name] = reply
        return replies, failed

    def _reply(self, strategy: Strategy, name: str, tag: str, numel: int) -> Submitted | Refused | OutOfBudget:
        """One hospital's answer to this aggregation (in plaintext FedAvg, its update first)."""
        ch = self.channels[name]
        first, msg = messages.receive(ch, Update, Submitted, Refused, OutOfBudget, numel=numel)
        _check_reply(name, tag, first)
        if not isinstance(first, Update):
            return first
        strategy.receive(name, msg)  # plaintext FedAvg: the update itself, then how it went
        reply, _ = messages.receive(ch, Submitted, Refused, OutOfBudget)
        _check_reply(name, tag, reply)
        return reply

    def _drop(self, hospital: str, tag: str) -> None:
        """Stop talking to ``hospital`` for the rest of the run: a channel of it failed during
        ``tag`` (closed, silent, or out of step)."""
        channel = self.channels.pop(hospital, None)
        if channel is not None:
            channel.close()
        self.gone.setdefault(hospital, f"not invited: its connection failed in {tag}")

    def traffic_since_last(self) -> dict[str, dict[str, int]]:
        """Bytes and messages each party sent since the previous call (asks every party)."""
        now = {"coordinator": self.traffic.as_dict()}
        for name, ch in list(self.channels.items()):
            try:
                messages.send(ch, Report())
                now[name] = messages.receive(ch, TrafficReport)[0].counts
            except PeerError:
                if name not in self.plan.hospital_names or not self.plan.exclusions_possible:
                    raise
                self._drop(name, "a traffic report")  # the run goes on without it
        delta = {
            party: {k: v - self.last_traffic.get(party, {}).get(k, 0) for k, v in counts.items()}
            for party, counts in now.items()
        }
        self.last_traffic = now
        return delta

    # -- the run ---------------------------------------------------------
    def connect_all(self, listener: Listener) -> Strategy:
        expected = set(self.plan.hospital_names) | set(self.plan.aggregator_names)
        channels = listener.accept(expected, traffic=self.traffic, timeout_s=self.plan.timeout_s)
        self.channels = {n: channels[n] for n in self.plan.hospital_names + self.plan.aggregator_names}
        if not self.plan.secure:
            return PlainFedAvg()
        return SecureFedAvg(
            {a: self.channels[a] for a in self.plan.aggregator_names},
            self.plan.fractional_bits,
            deferred=self.plan.exclusions_possible,
        )

    def stop_all(self) -> None:
        for ch in self.channels.values():
            try:
                messages.send(ch, Stop())
            except PeerError:
                pass  # a dead party needs no goodbye

    def run(self, listener: Listener) -> dict[str, Any]:
        p = self.plan
        self.out.mkdir(parents=True, exist_ok=True)
        strategy = self.connect_all(listener)
        report: dict[str, Any] = {
            "plan": json.loads(p.to_json()),
            "mode": "secure" if p.secure else "plaintext",
            "transport": p.transport,
        }
        try:
            self._train(strategy, report)
        except BudgetExhausted as err:
            report["stopped"] = str(err)
            print(f"stopped cleanly, keeping the model of round {len(report.get('rounds', []))}: {err}", flush=True)
            self._finish(report)
        except RoundAborted as err:
            report["error"] = str(err)
            write_json(report, self.out / "report.json")
            raise
        finally:
            self.stop_all()
        return report

    def _statistics(self, strategy: Strategy, report: dict[str, Any], classes: tuple[str, ...]) -> torch.Tensor:
        """Normalisation statistics and class counts, aggregated like updates: no hospital reveals its
        own; with stats_noise the aggregators add Gaussian noise to each of them inside MPC."""
        p = self.plan
        noise_std, divisor = p.aggregation("stats")
        job = Aggregation(tag="stats", numel=3 + len(classes), round=0, divisor=divisor, noise_std=noise_std)
        sums, _ = self.aggregate(strategy, job, Stats(job.tag))
        report["aggregated_statistics"] = Statistics.from_sums(sums).to_dict(classes) | {
            "privacy": release_privacy(p.stats_release(), noise_std=p.stats_noise, delta=p.dp_delta),
        }
        return sums

    def _start(self, strategy: Strategy, report: dict[str, Any], classes: tuple[str, ...]) -> CoordinatorState:
        """Round 0: the statistics and the initial model, or the state of the run being resumed."""
        p = self.plan
        if not self.resume:
            sums = self._statistics(strategy, report, classes)
            vector = to_vector(build_model(p.model, p.num_classes, seed=p.seed))
            return CoordinatorState(round=0, global_vector=vector, stat_sums=sums, central_dp=None, report=report)
        state = CoordinatorState.load(self.out, p)
        resumed = state.report.get("resumed", []) + [{"after_round": state.round}]
        report.update({k: v for k, v in state.report.items() if k not in report} | {"resumed": resumed})
        print(f"resuming after round {state.round} of {p.rounds} from {self.out}", flush=True)
        return state

    def _train(self, strategy: Strategy, report: dict[str, Any]) -> None:
        p = self.plan
        _, val = plan_data(p)  # the held-out split, which no hospital trains on
        classes = val.classes
        origin = self._start(strategy, report, classes)
        stats = Statistics.from_sums(origin.stat_sums)
        mean, std, n_total = stats.pixel_mean, stats.pixel_std, stats.n_images
        prep = Preprocessing(p.image_size, mean, std)
        weight = class_weights(stats.class_counts)
        report["dataset"] = {"source": val.source, "synthetic": val.is_synthetic, "val": val.class_counts()}

        model = build_model(p.model, p.num_classes, seed=p.seed)
        global_vec = origin.global_vector
        load_vector(model, global_vec)
        central = _CentralDP(p, origin.central_dp) if p.central_dp_noise is not None else None

        def save_state(completed: int) -> None:
            accountant = central.accountant.to_dict() if central else None
            CoordinatorState(
                round=completed,
                global_vector=global_vec,
                stat_sums=origin.stat_sums,
                central_dp=accountant,
                report=report,
            ).save(self.out, p)

        if not self.resume:
            # saved before anything else can fail: the statistics are released once, and a resumed run reuses them
            save_state(0)
            report["aggregated_statistics"]["traffic"] = self.traffic_since_last()
        rounds: list[dict[str, Any]] = report.setdefault("rounds", [])
        best = Selection()
        for done in rounds:  # a resumed run's model.pt holds the best of the rounds before
            if "validation" in done:
                best.offer(done["round"], done["validation"])

        def conclude(record: dict[str, Any]) -> None:
            """Evaluate round ``record['round']``'s model; keep it, the report and the state on disk."""
            r, timings = record["round"], record
            logits = predict(model, val.images, prep)
            if not bool(torch.isfinite(logits).all()):
                # a poisoned or broken update the average cannot attribute: stop, keeping round r-1's model
                raise RoundAborted(
                    f"round{r}: the revealed average makes the global model's outputs NaN/Inf on the validation "
                    f"split (an update far out of scale; secure aggregation cannot say whose); model.pt keeps round "
                    f"{r - 1}, and the run cannot continue from this average"
                )
            m = record["validation"] = classification_metrics(logits, val.labels, classes)
            eps = _epsilons(timings)
            tqdm.write(
                f"round {r}/{p.rounds}: val accuracy {m['accuracy']:.3f}  MCC {m['mcc']:.3f}  "
                f"pneumonia AUC {m['pneumonia_roc_auc'] or float('nan'):.3f}  "
                f"(train {timings['local_training_s']:.1f}s, share {timings['sharing_s']:.2f}s, "
                f"aggregate {timings['aggregation_s']:.2f}s, reveal {timings['reveal_s']:.2f}s)"
                + (f"  epsilon {max(eps.values()):.2f} (max over hospitals, delta {p.dp_delta:g})" if eps else "")
                + (f"  central-DP epsilon {timings['central_dp']['epsilon'] or float('inf'):.2f}" if central else "")
                + (f"  left out: {_listed(timings['excluded'])}" if "excluded" in timings else "")
            )
            if best.offer(r, m):  # on disk at once: an aborted later round loses nothing
                Checkpoint(
                    p.model,
                    classes,
                    prep,
                    model.state_dict(),
                    info={
                        "federated": report["mode"],
                        "round": r,
                        "selected": best.summary("round"),
                        "recipe": p.recipe(),
                        "validation": m,
                        "dataset": report["dataset"],
                        "privacy": timings.get("privacy"),
                        "central_dp": timings.get("central_dp"),
                    },
                ).save(self.out / "model.pt")
            report["selected"] = best.summary("round")
            write_json(report, self.out / "report.json")
            save_state(r)

        if rounds and "validation" not in rounds[-1]:  # revealed, then interrupted before its evaluation
            rounds[-1]["traffic"] = {}
            conclude(rounds[-1])
        bar = tqdm(range(origin.round + 1, p.rounds + 1), desc="federated rounds", unit="round")
        for r in bar:
            start = time.perf_counter()
            # central DP averages clipped updates with equal weights; otherwise weight by sample count
            noise_std, divisor = p.aggregation(f"round{r}", n_samples=n_total, n_hospitals=p.hospitals)
            previous = rounds[-1].get("average_norm") if rounds else None
            job = Aggregation(
                tag=f"round{r}",
                numel=global_vec.numel(),
                round=r,
                divisor=divisor,
                noise_std=noise_std,
                norm_bound=p.norm_bound(r, previous),
            )
            request = Train(job.tag, round=r, mean=mean, std=std, class_weight=weight.tolist())
            avg, timings = self.aggregate(strategy, job, request, tensor=global_vec)
            average_norm = float(avg.double().norm())
            _check_average(job, average_norm)
            if central:
                timings["central_dp"] = central.spend_round()
            global_vec = global_vec + avg
            load_vector(model, global_vec)
            record = {"round": r, **timings, "average_norm": average_norm}
            if job.norm_bound is not None:
                record["norm_bound"] = job.norm_bound
            rounds.append(record)
            # saved at once: a run resumed after any later failure must not reveal this round again
            save_state(r)
            record |= {"wall_s": time.perf_counter() - start, "traffic": self.traffic_since_last()}
            conclude(record)
        self._finish(report)

    def _finish(self, report: dict[str, Any]) -> None:
        rounds = report.get("rounds", [])
        if rounds:
            chosen = report["selected"]["round"] or rounds[-1]["round"]
            report["validation"] = next(r["validation"] for r in rounds if r["round"] == chosen)
            _plots(report, self.out)
        if self.plan.shift_data and (self.out / "model.pt").exists():
            ckpt = Checkpoint.load(self.out / "model.pt")
            report["shift_check"] = shift_check(ckpt.build(), ckpt.preprocessing, plan_shift_data(self.plan))
        report["hospitals"] = per_hospital(rounds, self.plan.hospital_names)
        write_json(report, self.out / "report.json")


def per_hospital(rounds: list[dict[str, Any]], hospitals: list[str]) -> dict[str, dict[str, Any]]:
    """Each hospital's part in the run: the rounds its update went into, the rounds it was left out
    of and why, what it sent, and the privacy budget it spent (never its data or update: secure
    aggregation reveals only sums)."""
    view: dict[str, dict[str, Any]] = {}
    for h in hospitals:
        spent = [r["privacy"][h] for r in rounds if h in r.get("privacy", {})]
        view[h] = {
            "contributed": [r["round"] for r in rounds if h in r["contributors"]],
            "excluded": {str(r["round"]): r["excluded"][h] for r in rounds if h in r.get("excluded", {})},
            "bytes_sent": sum(r["traffic"].get(h, {}).get("bytes_sent", 0) for r in rounds),
        } | ({"epsilon": spent[-1]["epsilon"]} if spent else {})
    return view


def _listed(reasons: dict[str, str]) -> str:
    return "; ".join(f"{h}: {why}" for h, why in reasons.items()) or "none"


def _check_average(job: Aggregation, norm: float) -> None:
    """Under the norm check, refuse an average (of L2 norm ``norm``) no accepted updates could make:
    every accepted update has norm below about the bound (twice it, but for a chance below 1e-7),
    and so has their mean. Only an update that wrapped the ring past the check could (mpc.sketch);
    nothing is applied."""
    if job.norm_bound is not None and not norm <= 2 * job.norm_bound:
        raise RoundAborted(
            f"{job.tag}: the revealed average update has norm {norm:.6g}, above twice the bound {job.norm_bound:.6g}, "
            "which no average of accepted updates reaches: an update passed the check by wrapping around the ring "
            "(secure aggregation cannot say whose); the model keeps the previous round"
        )


def _check_reply(hospital: str, tag: str, reply: Update | Submitted | Refused | OutOfBudget) -> None:
    """A reply about this aggregation, in the sender's own name."""
    if reply.tag != tag:
        raise PeerError(hospital, f"answered {tag!r} with a {reply.KIND!r} for {reply.tag!r}")
    if isinstance(reply, Refused | OutOfBudget) and reply.hospital != hospital:
        raise PeerError(hospital, f"sent a {reply.KIND!r} in the name of {reply.hospital!r}")


class _CentralDP:
    """Accounting for distributed central DP: a Gaussian mechanism per round on the sum of
    updates clipped to ``update_clip`` (hospital-level sensitivity), composed over rounds.

    In a secure run each of K aggregators adds a part of the noise and knows its own,
    so only (K-1)/K of the variance is counted; in a plaintext run the coordinator adds
    all of it itself, and the guarantee holds against everyone but the coordinator.
    """

    def __init__(self, plan: Plan, history: dict[str, list[list[float]]] | None = None) -> None:
        """``history``: the accountant of the rounds before a resumption."""
        z = float(plan.central_dp_noise or 0.0)
        self.plan = plan
        k = plan.aggregators
        self.effective = z * ((k - 1) / k) ** 0.5 if plan.secure else z
        self.accountant = PrivacyAccountant.from_dict(history) if history else PrivacyAccountant()

    def spend_round(self) -> dict[str, float | None]:
        eps = None  # no noise, no guarantee
        if self.effective > 0:
            self.accountant.step(self.effective, 1.0, 1)
            eps = self.accountant.epsilon(self.plan.dp_delta)
        return {
            "epsilon": eps,
            "delta": self.plan.dp_delta,
            "noise_multiplier": self.plan.central_dp_noise,
            "effective_noise_multiplier": self.effective,
            "update_clip": self.plan.update_clip,
        }


def _epsilons(info: dict[str, Any]) -> dict[str, float]:
    return {h: s["epsilon"] for h, s in info.get("privacy", {}).items()}


def _plots(report: dict[str, Any], out: Path) -> None:
    from medmpc.training import plots

    rounds = report["rounds"]
    title = f"{report['plan']['model']} {report['mode']} federated, {report['plan']['hospitals']} hospitals"
    plots.curves_png(
        {k: [r["validation"][k] for r in rounds] for k in _CURVE_KEYS},
        out / "learning_curves.png",
        xlabel="round",
        title=title,
    )
    parties = sorted(rounds[0]["traffic"])
    plots.stacked_bars_png(
        # a party left out of a run's later rounds sent nothing in them
        {party: [r["traffic"].get(party, {}).get("bytes_sent", 0) / 1e6 for r in rounds] for party in parties},
        out / "communication.png",
        xlabel="round",
        ylabel="MB sent",
        title=title,
    )
