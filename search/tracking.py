"""MLflow tracking, all in the driver: one parent run per search, one nested child run per trial.

Trials never talk to MLflow themselves; a Tune callback turns each reported result into one `log_batch` call on the
trial's child run, so workers need no tracking credentials and nothing is logged twice. Child runs are found again
by their `qlora.trial_id` tag, so a resumed search continues the same runs instead of duplicating them.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

log = logging.getLogger(__name__)

TRIAL_TAG = "qlora.trial_id"
SEARCH_TAG = "qlora.search"
ADAPTER_ARTIFACT = "adapter"
# files of a trial checkpoint that make up the adapter as users load it (optimizer state stays out of MLflow)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "special_tokens_map.json", "trial_settings.json", "metrics.json", "dtypes.json")


_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL", re.I)
_URI_CREDENTIALS = re.compile(r"([a-z][a-z0-9+.-]*://)[^/\s@:]+(?::[^/\s@]*)?@", re.I)


def redact(text: str) -> str:
    """Text as it may be written to MLflow or the results folder: no `user:password@` in URIs, and no value of an
    environment variable whose name says it is a secret (HF_TOKEN, AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD...)."""
    import os

    text = _URI_CREDENTIALS.sub(r"\1***@", text)
    for name, value in os.environ.items():
        if len(value) >= 6 and _SECRET_NAME.search(name) and value in text:
            text = text.replace(value, "***")
    return text


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(c, name: str, tracking_uri: str | None = None) -> str:
    exp = c.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=artifact_location(tracking_uri or ""))


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts (adapters): for a sqlite store, `mlruns/` beside the database file,
    so the store and its adapters stay together wherever the store is. MLflow's own default is `./mlruns` of the
    working directory, the same place for the default `sqlite:///mlflow.db` but not for a store elsewhere. None
    (the store's default) for other stores: a tracking server has its own artifact root."""
    if not tracking_uri.lower().startswith("sqlite:///"):
        return None
    db = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return (Path(db).expanduser().resolve().parent / "mlruns").as_uri()


def find_or_create_parent(c, exp_id: str, search_name: str, resume: bool) -> str:
    """The search's parent run; with `resume`, the existing one is reopened rather than duplicated."""
    if resume:
        runs = c.search_runs([exp_id], filter_string=f"tags.`{SEARCH_TAG}` = '{search_name}' "
                             f"and tags.`qlora.role` = 'parent'", max_results=1)
        if runs:
            c.update_run(runs[0].info.run_id, status="RUNNING")
            return runs[0].info.run_id
    run = c.create_run(exp_id, run_name=search_name, tags={SEARCH_TAG: search_name, "qlora.role": "parent"})
    return run.info.run_id


def log_parent_info(c, run_id: str, params: dict[str, Any], tags: dict[str, str], files: dict[str, str]) -> None:
    from mlflow.entities import Param, RunTag

    c.log_batch(run_id, params=[Param(k, redact(_param_str(v))) for k, v in params.items()],
                tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])
    for name, text in files.items():
        c.log_text(run_id, redact(text), name)


def _param_str(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s[:6000]


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def find_child_run(c, exp_id: str, parent: str, trial_id: str) -> str | None:
    runs = c.search_runs([exp_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and "
                         f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1)
    return runs[0].info.run_id if runs else None


LOST_NOTE = ("started just before the driver was killed, after Tune's last experiment checkpoint: the resumed search "
             "could not continue it and sampled a new trial in its place")


def retire_lost_runs(c, exp_id: str, parent: str, trial_ids: set[str]) -> list[str]:
    """After a resume: end and delete (MLflow's trash, restorable) the child runs of trials Tune does not know.

    A SIGKILL can land between Tune starting a trial (its child run is created then) and Tune's next experiment
    checkpoint; the restored experiment has no such trial, so its run would stay RUNNING forever beside the trial that
    replaced it. Returns the retired run ids."""
    lost, token = [], None
    while True:
        page = c.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000,
                             page_token=token)
        lost += [r for r in page if r.data.tags.get(TRIAL_TAG) not in trial_ids]
        token = page.token
        if not token:
            break
    for r in lost:
        c.set_tag(r.info.run_id, "qlora.lost", LOST_NOTE)
        if r.info.status == "RUNNING":
            c.set_terminated(r.info.run_id, "KILLED")
        c.delete_run(r.info.run_id)
    return [r.info.run_id for r in lost]


class MlflowTrialCallback(Callback):
    """Tune callback: child run per trial, a batch of metrics per result, the adapter as an artifact at the end."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, search_name: str,
                 metric: str | None = None, mode: str = "max"):
        self.uri = tracking_uri
        self.metric, self.mode = metric, mode  # the objective: the adapter logged is the trial's best checkpoint
        self.exp_id = experiment_id
        self.parent = parent_run_id
        self.search = search_name
        self.runs: dict[str, str] = {}
        self.open: set[str] = set()  # child runs this callback set RUNNING and has not ended yet
        self.last_step: dict[str, int] = {}  # per trial: the last step logged, also by an earlier driver
        self.last_checkpoint: dict[str, str] = {}  # per trial: its best checkpoint so far (the last without metric)
        self.best_value: dict[str, float] = {}
        self.seconds = 0.0  # time spent in MLflow calls, for the overhead report
        self.trial_seconds: dict[str, float] = {}  # the same, per trial
        self.started: dict[str, float] = {}  # per trial: when Tune started it (wall clock), and when it ended
        self.ended: dict[str, float] = {}
        self._c = None

    def _spent(self, tid: str, since: float) -> None:
        dt = time.time() - since
        self.seconds += dt
        self.trial_seconds[tid] = self.trial_seconds.get(tid, 0.0) + dt

    def timing(self, tid: str) -> dict[str, float]:
        """What the driver saw of one trial: start and end (epoch seconds) and its time in MLflow calls."""
        out = {"started_at": self.started.get(tid), "ended_at": self.ended.get(tid),
               "mlflow_seconds": round(self.trial_seconds.get(tid, 0.0), 3)}
        return {k: v for k, v in out.items() if v is not None}

    @property
    def c(self):
        if self._c is None:
            self._c = client(self.uri)
        return self._c

    def child_run(self, trial) -> str:
        tid = trial.trial_id
        if tid in self.runs:
            return self.runs[tid]
        t = time.time()
        from mlflow.entities import Param

        run_id = find_child_run(self.c, self.exp_id, self.parent, tid)
        if run_id:
            self.c.update_run(run_id, status="RUNNING")
            logged = [m.step for m in self.c.get_metric_history(run_id, "step")]
            if logged:
                self.last_step[tid] = max(logged)
        else:
            run = self.c.create_run(self.exp_id, run_name=f"trial-{tid}",
                                    tags={"mlflow.parentRunId": self.parent, TRIAL_TAG: tid, SEARCH_TAG: self.search,
                                          "qlora.role": "trial"})
            run_id = run.info.run_id
            self.c.log_batch(run_id, params=[Param(k, _param_str(v)) for k, v in trial.config.items()])
        self.runs[tid] = run_id
        self.open.add(run_id)
        self._spent(tid, t)
        return run_id

    def end_open_runs(self, status: str) -> None:
        """End the child runs of trials that were still running when the search stopped (e.g. KILLED on Ctrl-C)."""
        for run_id in sorted(self.open):
            self.c.set_terminated(run_id, status)
        self.open.clear()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, time.time())
        self.child_run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        run_id = self.child_run(trial)
        t = time.time()
        step = int(result.get("step", result.get("training_iteration", 0)))
        ts = int(time.time() * 1000)
        metrics = [Metric(k, v, ts, step) for k, v in numeric_metrics(result).items()]
        # A trial restarted from a checkpoint (worker retry, --resume) may report a step its run already holds, e.g.
        # its last one again; keep one point per step so the curve continues instead of doubling back.
        if step > self.last_step.get(trial.trial_id, -1):
            self.c.log_batch(run_id, metrics=metrics)
            self.last_step[trial.trial_id] = step
        if result.get("checkpoint_path") and self._improves(trial.trial_id, result):
            self.last_checkpoint[trial.trial_id] = result["checkpoint_path"]
        self._spent(trial.trial_id, t)

    def _improves(self, tid: str, result: dict) -> bool:
        """Whether this result is the trial's best evaluation so far (always, with no objective metric set)."""
        value = result.get(self.metric) if self.metric else None
        if not isinstance(value, (int, float)) or value != value:
            return self.metric is None or tid not in self.last_checkpoint
        best = self.best_value.get(tid)
        if best is None or (value > best if self.mode == "max" else value < best):
            self.best_value[tid] = value
            return True
        return False

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = time.time()
        run_id = self.child_run(trial)
        t = time.time()
        ckpt = self.last_checkpoint.get(trial.trial_id)
        if ckpt:
            log_adapter(self.c, run_id, ckpt)
        self.c.set_terminated(run_id, "FINISHED")
        self.open.discard(run_id)
        self._spent(trial.trial_id, t)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = time.time()
        run_id = self.child_run(trial)
        err = str(getattr(trial, "error_msg", None) or "") or _error_text(trial)
        self.c.set_tag(run_id, "qlora.error", redact(err)[:4000])
        self.c.set_terminated(run_id, "FAILED")
        self.open.discard(run_id)


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        return Path(path).read_text()[-4000:] if path else "trial failed"
    except OSError:
        return "trial failed"


def log_adapter(c, run_id: str, checkpoint_path: str) -> None:
    """Copy the adapter files of a checkpoint (local or on a pyarrow filesystem such as S3) into the run."""
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / ADAPTER_ARTIFACT
        copy_adapter(checkpoint_path, dst)
        c.log_artifacts(run_id, str(dst), ADAPTER_ARTIFACT)


def copy_adapter(checkpoint_path: str, dst: Path) -> None:
    """Copy the adapter files (not the optimizer state) of a checkpoint, local or on S3/NFS, into `dst`."""
    from ray.train import Checkpoint

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    with Checkpoint(checkpoint_path).as_directory() as src:
        for name in ADAPTER_FILES:
            if (Path(src) / name).exists():
                shutil.copy2(Path(src) / name, dst / name)


def register_champion(c, model_name: str, run_id: str) -> str:
    """Register the run's adapter artifact as a new version of `model_name` and point alias `champion` at it."""
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(model_name)
    except MlflowException:
        c.create_registered_model(model_name, description="QLoRA adapters found by qlora-search")
    source = f"{c.get_run(run_id).info.artifact_uri}/{ADAPTER_ARTIFACT}"
    version = c.create_model_version(model_name, source=source, run_id=run_id)
    c.set_registered_model_alias(model_name, "champion", version.version)
    return version.version
