"""``medmpc tune``: hyper-parameter search over the training recipe with Optuna.

Each trial trains one model with the plan's fixed settings (data, model, image size, epochs or
rounds, DP budget) and the recipe's searched ones (``suggest``), centralised as ``train`` or
federated as ``simulate``, and scores it by the validation MCC of its selected model (the best
epoch or round) on the split held out of the training folder. The study lives in SQLite
(``study.db`` in the out folder): the same command run again resumes it until ``trials`` trials
have finished; a trial that did not finish (Ctrl-C, a dead party, a killed process) is marked
failed and not counted, and a resumption with other fixed settings is refused. Every trial
keeps its run folder (``trials/NNNN``); ``study.json`` and ``trials.png`` sum the study up.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from medmpc.imaging.dataset import load_dataset
from medmpc.protocols.plan import Plan
from medmpc.protocols.simulate import simulate
from medmpc.training import plots
from medmpc.training.centralised import train_centralised
from medmpc.training.local import TrainConfig
from medmpc.training.reports import write_json

MODES = ("centralised", "federated")
STUDY = "medmpc"
INTERRUPTED = "interrupted"  # the study attribute listing the trials a crash left running


def suggest(trial: optuna.Trial, *, private: bool) -> dict[str, Any]:
    """The recipe's searched settings, as plan fields. With DP, MixUp is off (it mixes patients) and
    the levers are the batch size (larger batches, less noise per step at the same epsilon) and the
    clipping norm."""
    params: dict[str, Any] = {
        "lr": trial.suggest_float("lr", 3e-4, 1e-2, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-5, 1e-2, log=True),
        "augment": trial.suggest_categorical("augment", ["affine", "shift"]),
    }
    if private:
        params["batch_size"] = trial.suggest_categorical("batch_size", [64, 128, 256, 512])
        params["dp_clip"] = trial.suggest_float("dp_clip", 0.1, 5.0, log=True)
    else:
        params["batch_size"] = trial.suggest_categorical("batch_size", [32, 64, 128])
        params["mixup"] = trial.suggest_float("mixup", 0.0, 0.4)
    return params


def tune(
    plan: Plan,
    out: Path,
    *,
    mode: str,
    trials: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) the study in ``out`` until ``trials`` trials have finished; returns the
    summary also written to ``out/study.json``.

    ``plan``: the fixed settings, ``plan.rounds * plan.local_epochs`` epochs in centralised mode;
    ``mode``: one of ``MODES``."""
    if mode not in MODES:
        raise ValueError(f"unknown tuning mode {mode!r}; choose one of {', '.join(MODES)}")
    if trials < 1:
        raise ValueError(f"a study needs at least one trial, got {trials}")
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}", direction="maximize", load_if_exists=True
    )
    _check_same_study(study, _fixed(plan, mode), out)
    _fail_interrupted(study, [t.number for t in study.get_trials(states=(TrialState.RUNNING,))], log)
    # a resumed study draws afresh: the same seed would repeat the first trials' settings
    study.sampler = optuna.samplers.TPESampler(seed=plan.seed + len(study.trials))
    run = _trial_runner(plan, out, mode=mode)
    while (done := len(_finished(study))) < trials:
        trial = study.ask()
        log(f"trial {trial.number} ({done + 1} of {trials}) ...")
        try:
            score = run(trial)
        except ValueError as err:  # a setting the plan refuses (e.g. a budget one epoch exceeds)
            trial.set_user_attr("error", str(err))
            study.tell(trial, state=TrialState.FAIL)
            log(f"trial {trial.number} failed: {err}")
            continue
        except BaseException:  # Ctrl-C, or a party that died: the trial did not finish, and is run again
            _fail_interrupted(study, [trial.number], log)
            raise
        study.tell(trial, score)
        log(f"trial {trial.number}: validation MCC {score:.4f} (best {study.best_value:.4f}) {trial.params}")
    summary = _summary(study, plan, mode=mode, trials=trials)
    write_json(summary, out / "study.json")
    _plot(study, out / "trials.png", title=f"{plan.model} {mode}, {plan.image_size} px: validation MCC per trial")
    return summary


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that count towards the study's size: completed, or failed on their own."""
    interrupted = set(study.user_attrs.get(INTERRUPTED, []))
    return [
        t
        for t in study.trials
        if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and t.number not in interrupted)
    ]


def _fail_interrupted(study: optuna.Study, numbers: list[int], log: Callable[[str], None]) -> None:
    """Trials that did not finish (stopped, or left running by a process that died): failed, and
    not counted, so the study runs as many again."""
    if not numbers:
        return
    study.set_user_attr(INTERRUPTED, sorted(set(study.user_attrs.get(INTERRUPTED, [])) | set(numbers)))
    for number in numbers:
        study.tell(number, state=TrialState.FAIL)
        log(f"trial {number} did not finish: marked failed, and run again when the study resumes")


def _fixed(plan: Plan, mode: str) -> dict[str, Any]:
    return {"mode": mode} | {k: v for k, v in asdict(plan).items() if k in _FIXED}


def _check_same_study(study: optuna.Study, fixed: dict[str, Any], out: Path) -> None:
    """A study resumes only with the settings it holds fixed: trials of two set-ups do not compare."""
    if "fixed" not in study.user_attrs:
        study.set_user_attr("fixed", fixed)
        return
    # a setting added to _FIXED after the study began: it ran with the plan's default
    before = _fixed(Plan(), fixed["mode"]) | study.user_attrs["fixed"]
    differ = sorted(k for k in fixed.keys() | before.keys() if fixed.get(k) != before.get(k))
    if differ:
        changes = ", ".join(f"{k} {before.get(k)!r} -> {fixed.get(k)!r}" for k in differ)
        raise ValueError(
            f"the study in {out} was run with other fixed settings ({changes}): resume it with its own, or "
            "start a new study in another --out"
        )


def _trial_runner(plan: Plan, out: Path, *, mode: str) -> Callable[[optuna.Trial], float]:
    """One trial: the plan with the trial's settings, trained in its own folder; its selected model's MCC."""
    private = plan.dp_epsilon is not None
    data = None
    if mode == "centralised":  # read once; every trial holds out the same validation split
        data = load_dataset(plan.data, image_size=plan.image_size, num_classes=plan.num_classes, seed=plan.seed)

    def run(trial: optuna.Trial) -> float:
        settings = json.loads(plan.to_json()) | suggest(trial, private=private)
        trial_plan = Plan(**settings)
        folder = out / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("folder", str(folder.relative_to(out)))
        start = time.perf_counter()
        if data is None:
            report = simulate(trial_plan, folder)
            if "validation" not in report:
                raise ValueError(f"the federated run stopped before a round was evaluated: {report.get('error')}")
        else:
            report = train_centralised(
                data,
                model_name=trial_plan.model,
                cfg=_train_config(trial_plan),
                out=folder,
                val_fraction=trial_plan.val_fraction,
                dp=trial_plan.dp_config(),
                log=lambda line: None,
            )
        trial.set_user_attr("seconds", time.perf_counter() - start)
        trial.set_user_attr("accuracy", report["validation"]["accuracy"])
        return float(report["validation"]["mcc"])

    return run


def _train_config(plan: Plan) -> TrainConfig:
    """Centralised training with the plan's recipe, for as many epochs as its rounds of local epochs."""
    return TrainConfig(
        epochs=plan.rounds * plan.local_epochs,
        batch_size=plan.batch_size,
        lr=plan.lr,
        weight_decay=plan.weight_decay,
        augment=plan.augment,
        mixup=plan.mixup,
        precision=plan.precision,
        seed=plan.seed,
    )


def _summary(study: optuna.Study, plan: Plan, *, mode: str, trials: int) -> dict[str, Any]:
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    return {
        "mode": mode,
        "objective": "validation MCC of the selected model (best epoch or round)",
        "trials_requested": trials,
        "fixed": _fixed(plan, mode),
        "best": None
        if best is None
        else {"trial": best.number, "mcc": best.value, "params": best.params, **best.user_attrs},
        "trials": [
            {"trial": t.number, "state": t.state.name, "mcc": t.value, "params": t.params, **t.user_attrs}
            for t in study.trials
        ],
        "interrupted": study.user_attrs.get(INTERRUPTED, []),
    }


# the plan settings `medmpc tune` takes as flags (besides DP's)
FLAGS = (
    "data",
    "model",
    "image_size",
    "num_classes",
    "rounds",
    "local_epochs",
    "hospitals",
    "partition",
    "precision",
    "seed",
)
# the plan settings a study holds fixed, as its summary reports them
_FIXED = (*FLAGS, "val_fraction", "dp_epsilon", "dp_delta")


def _plot(study: optuna.Study, path: Path, *, title: str) -> None:
    """Each completed trial's MCC, and the best so far."""
    done = [t for t in study.trials if t.state == TrialState.COMPLETE and t.value is not None]
    numbers = [t.number for t in done]
    values = [float(t.value) for t in done if t.value is not None]
    best = [max(values[: i + 1]) for i in range(len(values))]
    plots.lines_png(
        {"validation MCC": {"trial": (numbers, values), "best so far": (numbers, best)}},
        path,
        xlabel="trial",
        title=title,
    )
