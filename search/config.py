"""The experiment config: what a search runs. YAML files and `--set KEY=VALUE` only fill this schema."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainables import metrics as M
from trainables.settings import SettingsError, TrialSettings, merge_dotted, validate


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Objective(_Strict):
    metric: str = M.F1
    mode: Literal["max", "min"] = "max"


class SchedulerSettings(_Strict):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, gt=0, description="Evaluation rounds every trial gets before ASHA may stop it.")
    reduction_factor: float = Field(2.0, gt=1)
    tie_break: Optional[Literal["eval_loss", "val_ap"]] = Field(
        M.EVAL_LOSS, description="Order trials whose objective ties at a rung by this metric (eval_loss: lower is "
        "better; val_ap, classification only: the minority label's average precision, higher is better), so ASHA "
        "can stop some of them; null: Ray's ASHA as is, which keeps every trial tied at the rung's cutoff.")
    eval_at_rungs: bool = Field(
        False, description="Evaluate only at ASHA's rungs (grace_period x trial.eval.every_steps x "
        "reduction_factor^k) and at the end, not every trial.eval.every_steps: an early first rung without paying "
        "for an evaluation every few steps. The learning curves and the checkpoints the best adapter is picked from "
        "are then only those steps.")


class SearcherSettings(_Strict):
    algorithm: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    n_startup_trials: int = Field(3, ge=1, description="Random trials before TPE starts modelling (Optuna).")
    tie_break: Optional[Literal["eval_loss", "val_ap"]] = Field(
        M.EVAL_LOSS, description="Tell TPE each trial's objective with ties ordered by this metric (as "
        "scheduler.tie_break; a nudge below 1e-6), so that while every trial scores the same (F1 0 early in a wide "
        "search) TPE models the one closest to the answers as best, not whichever it sorts first; null: the "
        "objective as is.")


class ResourceSettings(_Strict):
    num_workers: int = Field(1, gt=0, description="Ray Train workers per trial (DDP when > 1).")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    custom_per_worker: dict[str, float] = Field({}, description="Extra Ray resources per worker, e.g. {A10G: 1}.")
    torch_process_group: Literal["auto", "always"] = Field(
        "auto", description="auto: Ray Train's TorchTrainer (a torch process group) only for several workers, the "
        "base DataParallelTrainer for one (several seconds less per trial); always: TorchTrainer for one worker too, "
        "for a custom trainable that needs torch.distributed.")
    warm_workers: bool = Field(
        True, description="Run each trial's SFT loop in a warm process per node and trial slot that imported the "
        "training stack once (trainables/warm.py), rather than in the new Train worker process, which would import it "
        "again (~10 s a trial on 2 CPUs). One worker per trial only; several workers always train in Train's own.")
    allocator: Literal["jemalloc", "system"] = Field(
        "jemalloc", description="The memory allocator of the processes that train (warm hosts, and Train workers "
        "where they train themselves). jemalloc: the one Ray ships and runs its own daemons with, preloaded, large "
        "blocks kept for reuse between steps; system: the C library's "
        "malloc, whose per-thread arena for the host's training thread mapped and unmapped memory hundreds of times "
        "a second on 2 CPUs, faulting pages back in at every step and interrupting the other CPU (bench/README.md). "
        "A Ray build without jemalloc (not Linux) uses the system's.")

    def per_worker_str(self) -> str:
        parts = [f"CPU={self.cpus_per_worker:g}"] + ([f"GPU={self.gpus_per_worker:g}"] if self.gpus_per_worker else [])
        return "{" + ", ".join(parts + [f"{k}={v:g}" for k, v in self.custom_per_worker.items()]) + "}"


class MlflowSettings(_Strict):
    tracking_uri: str = Field(default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db",
                              description="sqlite/file for one machine; http(s) (an `mlflow server`) for clusters. "
                              "Default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.")
    experiment: str = "qlora-search"
    registered_model: str = Field("qlora-search-{name}", description="Registry name; {name} is the search name.")


class ExperimentConfig(_Strict):
    name: str = Field("sms-spam", pattern=r"^[A-Za-z0-9_.-]+$")
    trial: TrialSettings = TrialSettings()
    space: str = Field("spaces/classification.yaml", description="Search space file.")
    objective: Objective = Objective()
    searcher: SearcherSettings = SearcherSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    num_trials: int = Field(8, gt=0)
    max_concurrent_trials: int = Field(2, gt=0)
    resources: ResourceSettings = ResourceSettings()
    max_failures: int = Field(2, ge=0, description="Retries of a trial's Train workers from their last checkpoint. "
                              "Running out of GPU memory is not retried: the trial fails at once, naming what to change.")
    test_evaluation: bool = Field(True, description="Evaluate the best adapter on the held-out test split when the "
                                  "search ends (the whole split: minutes on a CPU). false: skip it, e.g. to compare "
                                  "search strategies by their validation objective alone (bench/run.py).")
    trainable: str = Field("trainables.ray_trainable:run_trial", pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                           description="module:function of the Tune trainable each trial runs; "
                           "trainables.standin:run_trial is a fast stand-in for rehearsing the machinery.")
    output_dir: str = Field("runs", description="Search results go to <output_dir>/<name>/.")
    model_cache: str = Field(".cache", description="Where the built-in tiny model is built and kept.")
    ray_address: str | None = Field(None, description="None: start a local Ray; 'auto' or host:port to join one.")
    storage_path: str | None = Field(
        default_factory=lambda: os.environ.get("QLORA_STORAGE_PATH") or None,
        description="Where Ray Tune/Train write trial results and checkpoints: <storage_path>/<name>/. None: "
        "output_dir. On a multi-node cluster it must be shared: s3://BUCKET/PREFIX, gs://..., or a directory mounted "
        "on every node (NFS) with storage_shared: true. Default: $QLORA_STORAGE_PATH, else None.")
    storage_shared: bool = Field(False, description="Declare storage_path (or output_dir) a directory every node "
                                 "mounts (NFS, EFS, ...); s3:// and gs:// URIs are shared anyway.")
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)  # reads $MLFLOW_TRACKING_URI at load time

    @model_validator(mode="after")
    def _check(self) -> "ExperimentConfig":
        from trainables.tasks import objective_metrics

        task, metric = self.trial.task, self.objective.metric
        allowed = objective_metrics(task)
        if metric not in allowed:
            raise ValueError(f"objective.metric {metric!r} is not reported by task {task!r}; use one of "
                             f"{', '.join(allowed)}")
        tie_breaks = [k for k in M.TIE_BREAKS if k == M.EVAL_LOSS or k in allowed]  # every task has an eval loss
        for field, key in (("scheduler.tie_break", self.scheduler.tie_break),
                           ("searcher.tie_break", self.searcher.tie_break)):
            if key is not None and key not in tie_breaks:
                raise ValueError(f"{field} {key!r} is not reported by task {task!r}; use one of "
                                 f"{', '.join(tie_breaks)}, or null")
        if metric == M.SEPARATION_AT_FLOOR and self.trial.style.terse_f1_floor is None:
            raise ValueError(f"objective.metric {metric} needs a floor: set trial.style.terse_f1_floor (e.g. 0.2) "
                             f"or use objective.metric={M.SEPARATION}")
        return self

    def search_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.name

    def asha_max_t(self) -> int:
        return asha_max_t(self.trial.optim.max_steps, self.trial.eval.every_steps)

    def asha_grace_steps(self) -> int:
        """ASHA's grace period in optimizer steps: scheduler.grace_period evaluation rounds."""
        return self.scheduler.grace_period * self.trial.eval.every_steps

    def asha_rungs(self) -> list[int]:
        """The steps at which ASHA decides (its milestones below max_t, as Ray's ASHA lays them out for one
        bracket: grace x rf^k), rounded up to whole steps, those a trial reaches."""
        grace, rf = self.asha_grace_steps(), self.scheduler.reduction_factor
        count = int(math.log(self.asha_max_t() / grace) / math.log(rf) + 1)
        rungs = sorted({math.ceil(grace * rf ** k) for k in range(count)})
        return [r for r in rungs if r <= self.trial.optim.max_steps]

    def trial_for_trials(self) -> TrialSettings:
        """The trial settings every trial starts from: `trial`, evaluated at ASHA's rungs with
        scheduler.eval_at_rungs."""
        rungs = self.asha_rungs() if self.scheduler.type == "asha" and self.scheduler.eval_at_rungs else []
        # no rung a trial reaches (a grace period past max_steps): ASHA never decides; evaluate as usual
        return self.trial.with_values({"eval.at_steps": rungs}) if rungs else self.trial


def asha_max_t(max_steps: int, every_steps: int) -> int:
    """ASHA's max_t: one evaluation round past the last step, so a trial that trains to the end returns from fit() by
    itself (and releases its workers cleanly) instead of being stopped by the scheduler at its last report."""
    return max_steps + every_steps


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set a.b=VALUE` pairs; VALUE is parsed as YAML (numbers, booleans, lists, null)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SettingsError(f"--set {item!r}: expected KEY=VALUE, e.g. --set trial.optim.max_steps=200")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None, name: str | None = None) -> ExperimentConfig:
    """Defaults, then the YAML file, then `--set` overrides, then `--name`; validated with one-line errors."""
    data: dict[str, Any] = {}
    source = "config"
    if path:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise SettingsError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise SettingsError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(data, dict):
            raise SettingsError(f"{path}: expected a mapping of settings at the top level")
    sets = parse_set(overrides or [])
    if name:
        sets["name"] = name
    if sets:
        source = f"{source} (with --set/--name)"
    return validate(ExperimentConfig, merge_dotted(data, sets), source=source)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
