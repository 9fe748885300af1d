"""What a person sees while a search runs and when it ends: one compact trial table, and the final summary.

`ProgressTable` is a Ray Tune callback that prints a table of every trial (status, steps, current objective, the
trial's best, time, sampled parameters) plus the search's best so far. It prints when something happened: at once
(after a short settle, so that a trial ending and the next starting print once) when a trial starts, ends or fails,
and at most every `interval` seconds for new results. It fits a 100-column terminal for the default space; Ray
Tune's own status tables are turned off unless `--verbose` (search/driver.py).

`format_summary` renders a finished search's summary.json: the top trials, the best adapter, the report, and the
commands to compare runs in MLflow and to export. Both read the objective from the config (any metric, max or min).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ray.tune import Callback

# short column names for the settings a space usually samples; any other key shows its last dotted part
ABBREV = {"learning_rate": "lr", "oversample_minority": "oversample", "alpha_per_rank": "alpha/r",
          "use_rslora": "rslora", "weight_decay": "wd", "warmup_ratio": "warmup", "batch_size": "batch",
          "grad_accum": "accum", "lr_scheduler": "sched", "max_length": "max_len", "target_modules": "targets"}
WIDTH = 100
STATUS = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused", "ERROR": "error"}


def quiet_libraries(verbose: bool) -> None:
    """Library logs off by default (MLflow's database setup, Optuna's study notices, bitsandbytes' CPU kernel
    notices, which come through the `kernels` package's logger where that is installed: transformers 5.25 pulls it
    in; Ray's notice that token authentication is on; transformers' warnings and weight-loading bars; the
    libraries' deprecation warnings to one another, such as PEFT asking transformers for `is_gradient_checkpointing`),
    as the search's workers have them; `--verbose` leaves them as the libraries set them. Call before those
    libraries are imported."""
    if verbose:
        return
    import logging
    import warnings

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' own bars follow it
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in ("mlflow", "alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    hide_token_auth_notice()
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:
        pass


def _not_token_auth_notice(record) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled")


def hide_token_auth_notice() -> None:
    """Drop Ray's notice that a new local cluster has token authentication on (its default) from this process's logs.
    Its warning that a cluster runs *without* it (RAY_AUTH_MODE=disabled) stays."""
    import logging

    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_not_token_auth_notice)


def short_names(keys: Iterable[str]) -> dict[str, str]:
    """Column names for dotted parameter keys: `optim.learning_rate` -> `lr`; the full key where two would clash."""
    keys = list(keys)
    names = {}
    for k in keys:
        last = k.rsplit(".", 1)[-1]
        names[k] = ABBREV.get(last, last if len(last) <= 12 else last[:11] + "~")
    clashes = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {k: (k if n in clashes else n) for k, n in names.items()}


def legend(keys: Iterable[str], width: int = WIDTH) -> str:
    """The settings behind abbreviated columns, wrapped to `width` ('' when every column is its own key)."""
    import textwrap

    names = short_names(keys)
    parts = [f"{n}={k}" for k, n in names.items() if n != k]
    if not parts:
        return ""
    return textwrap.fill(", ".join(parts), width=width, initial_indent="columns: ", subsequent_indent=" " * 9,
                         break_on_hyphens=False)


def fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def fmt_metric(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def better(a: float | None, b: float | None, mode: str) -> bool:
    """True if `a` beats `b` under `mode` (None never beats anything)."""
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return False
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return True
    return a > b if mode == "max" else a < b


def render_table(header: list[str], rows: list[list[str]], align: str, width: int = WIDTH) -> list[str]:
    """Columns sized to their content; `align` has one 'l' or 'r' per column. Columns past `width` are dropped
    from the right, with a '…' marker, so a wide space still fits the terminal."""
    cols = list(zip(header, *rows)) if rows else [(h,) for h in header]
    widths = [max(len(str(c)) for c in col) for col in cols]
    keep, used = 0, 0
    for w in widths:
        if used + w + (1 if keep else 0) > width and keep >= 3:
            break
        used += w + (1 if keep else 0)
        keep += 1
    cut = keep < len(header)

    def line(cells: list[str]) -> str:
        out = []
        for i in range(keep):
            c = str(cells[i])
            out.append(c.ljust(widths[i]) if align[i] == "l" else c.rjust(widths[i]))
        return " ".join(out).rstrip() + (" …" if cut else "")

    return [line(header)] + [line(r) for r in rows]


class ProgressTable(Callback):
    """Tune callback printing one table of all trials with the search's best so far (see module docstring)."""

    def __init__(self, metric: str, mode: str, max_steps: int, num_trials: int, param_keys: Iterable[str] = (),
                 interval: float = 30.0, settle: float = 2.0, width: int | None = None, max_rows: int = 16,
                 out: Callable[[str], None] | None = None):
        self.metric, self.mode = metric, mode
        self.max_steps, self.num_trials = max_steps, num_trials
        self.param_keys = list(param_keys)
        self.interval, self.settle = interval, settle
        self.width, self.max_rows = width, max_rows
        self.out = out
        self.start: float | None = None
        self.info: dict[str, dict[str, Any]] = {}  # trial_id -> started, ended, best
        self.best: tuple[float, str] | None = None
        self._last_print = 0.0
        self._changed_at: float | None = None
        self._important = False
        self._printed_legend = False

    # -- Tune hooks -------------------------------------------------------------------------------------------
    def setup(self, **info):
        self.start = time.time()

    def _rec(self, trial) -> dict[str, Any]:
        return self.info.setdefault(trial.trial_id, {"started": None, "ended": None, "best": None})

    def _changed(self, important: bool) -> None:
        now = time.time()
        if self._changed_at is None:
            self._changed_at = now
        self._important = self._important or important

    def on_trial_start(self, iteration, trials, trial, **info):
        self._rec(trial)["started"] = time.time()
        self._changed(True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        rec = self._rec(trial)
        value = result.get(self.metric)
        value = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if better(value, rec["best"], self.mode):
            rec["best"] = value
        self._changed(False)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._rec(trial)["ended"] = time.time()
        self._changed(True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._rec(trial)["ended"] = time.time()
        self._changed(True)

    def on_step_end(self, iteration, trials, **info):
        if self._changed_at is None:
            return
        now = time.time()
        if (self._important and now - self._changed_at >= self.settle) or now - self._last_print >= self.interval:
            self.emit(trials)

    def on_experiment_end(self, trials, **info):
        if self._changed_at is not None:  # the last change is not on screen yet
            self.emit(trials)

    # -- rendering --------------------------------------------------------------------------------------------
    def emit(self, trials) -> None:
        rows = [self.row(t) for t in trials]
        text = self.render(rows, time.time() - (self.start or time.time()))
        (self.out or (lambda s: print(s, flush=True)))(text)
        self._last_print = time.time()
        self._changed_at = None
        self._important = False

    def row(self, trial) -> dict[str, Any]:
        """A plain record of one Tune trial (what `render` needs)."""
        rec = self.info.get(trial.trial_id, {})
        last = trial.last_result or {}
        steps = int(last.get("step", 0) or 0)
        status = trial.status
        if status == "TERMINATED":
            status = "stopped" if steps < self.max_steps else "done"
        else:
            status = STATUS.get(status, status.lower())
        value = last.get(self.metric)
        started, ended = rec.get("started"), rec.get("ended")
        seconds = ((ended or time.time()) - started) if started else None
        return {"trial_id": trial.trial_id, "status": status, "params": dict(trial.config or {}), "steps": steps,
                "value": float(value) if isinstance(value, (int, float)) else None, "best": rec.get("best"),
                "seconds": seconds}

    def render(self, rows: list[dict[str, Any]], elapsed: float) -> str:
        width = self.width or min(WIDTH, _terminal_width())
        keys = self.param_keys or sorted({k for r in rows for k in r["params"]})
        names = short_names(keys)
        counts = {s: sum(r["status"] == s for r in rows) for s in ("running", "done", "stopped", "error")}
        # The search's best is judged as the search picks its best adapter: by each trial's best evaluation so far
        # (the "best" column), whose checkpoint Train keeps, even where the trial has fallen from it since.
        self.best = None
        for r in rows:
            if r["status"] != "error" and better(r["best"], self.best[0] if self.best else None, self.mode):
                self.best = (r["best"], r["trial_id"])
        best = (f"best so far: {self.metric}={fmt_metric(self.best[0])} (trial {self.best[1]}, marked *)"
                if self.best else f"best so far: none yet ({self.metric}, {self.mode})")
        started = sum(r["status"] != "pending" for r in rows)
        head = (f"[{fmt_duration(elapsed)}] trials {started}/{self.num_trials} started: {counts['running']} running, "
                f"{counts['done']} done, {counts['stopped']} stopped early, {counts['error']} failed\n{best}")
        header = ["trial", "status", "steps", self.metric, "best", "time"] + [names[k] for k in keys]
        hidden = 0
        if len(rows) > self.max_rows:  # a long search: every active trial, then the best finished ones
            active = [r for r in rows if r["status"] in ("running", "pending", "paused")]
            ended = ranked([{**r, "value": r["best"]} for r in rows if r not in active], self.mode)
            keep = {r["trial_id"] for r in active + ended[:max(0, self.max_rows - len(active))]}
            hidden = len(rows) - len(keep)
            rows = [r for r in rows if r["trial_id"] in keep]
        table = []
        for r in rows:
            mark = "*" if self.best and r["trial_id"] == self.best[1] else ""
            table.append([f"{r['trial_id']}{mark}", r["status"], f"{r['steps']}/{self.max_steps}",
                          fmt_metric(r["value"]), fmt_metric(r["best"]),
                          fmt_duration(r["seconds"]) if r["seconds"] is not None else "-"]
                         + [fmt_value(r["params"].get(k)) for k in keys])
        lines = [head] + render_table(header, table, "llrrrr" + "r" * len(keys), width)
        if hidden:
            lines.append(f"({hidden} more finished trials not shown; all of them are in the summary at the end)")
        if not self._printed_legend:
            text = legend(keys, width)
            if text:
                lines.append(text)
            self._printed_legend = True
        return "\n".join(lines) + "\n"


def _terminal_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return WIDTH


def _rel(path: str | Path) -> str:
    """`path` relative to the working directory when it lies below it (shorter commands to copy)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def ranked(trials: list[dict], mode: str) -> list[dict]:
    """Trials best first; trials without a value (failed) last."""
    scored = [t for t in trials if t.get("value") is not None]
    rest = [t for t in trials if t.get("value") is None]
    return sorted(scored, key=lambda t: t["value"], reverse=(mode == "max")) + rest


def _wrap_pairs(prefix: str, params: dict[str, Any], width: int) -> list[str]:
    """`key=value` pairs (the spelling --set takes) wrapped under a prefix."""
    import textwrap

    text = " ".join(f"{k}={format(v, '.4g') if isinstance(v, float) else json.dumps(v, default=str)}"
                    for k, v in params.items())
    return textwrap.wrap(text, width=width, initial_indent=prefix, subsequent_indent=" " * len(prefix),
                         break_on_hyphens=False) or [prefix]


def runs_url(base: str, experiment_id: str | None, search_name: str | None = None) -> str:
    """The MLflow UI's runs table of the experiment, in its model-training view (MLflow 3 opens experiments in
    its GenAI view otherwise), filtered to one search's parent and trial runs."""
    from urllib.parse import quote

    if not experiment_id:
        return base
    url = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if search_name:
        url += "&searchFilter=" + quote(f"tags.`qlora.search` = '{search_name}'", safe="")
    return url


def mlflow_ui_command(tracking_uri: str) -> tuple[str, str]:
    """(command to start the MLflow UI, URL it serves) for a tracking URI."""
    if tracking_uri.startswith(("http://", "https://")):
        return "", tracking_uri.rstrip("/")
    return f"mlflow ui --backend-store-uri {tracking_uri} --port 5000", "http://127.0.0.1:5000"


def format_summary(summary: dict[str, Any], summary_path: str | Path, top: int = 10, width: int = WIDTH) -> str:
    """The end-of-search text: top trials, the best adapter, the report, and what to run next."""
    metric, mode = summary["objective"]["metric"], summary["objective"]["mode"]
    trials = summary["trials"]
    n_early = sum(bool(t.get("stopped_early")) for t in trials)
    n_err = sum(t.get("status") == "ERROR" for t in trials)
    n_cut = sum(t.get("status") == "INTERRUPTED" for t in trials)
    b = summary.get("best")
    stopped = summary.get("interrupted")
    title = (f"== search {summary['name']!r}: {len(trials)} trials in {fmt_duration(summary.get('wall_seconds', 0))}"
             f", {n_early} stopped early, {n_err} failed" + (f", {n_cut} unfinished (stopped by {stopped})"
                                                             if stopped else "")
             + f"; objective {metric} ({mode}) ==")
    keys = list(dict.fromkeys(k for t in trials for k in t.get("params", {})))  # the space's order
    names = short_names(keys)
    header = ["rank", "trial", metric, "steps", "early"] + [names[k] for k in keys]
    rows = []
    order = ranked(trials, mode)
    for i, t in enumerate(order[:top], 1):
        mark = "*" if b and t["trial_id"] == b["trial_id"] else ""
        status = {"ERROR": "error", "INTERRUPTED": "unfinished"}.get(
            t.get("status"), "yes" if t.get("stopped_early") else "no")
        if t.get("note"):
            status += " (!)"
        rows.append([str(i), f"{t['trial_id']}{mark}", fmt_metric(t.get("value")), str(t.get("steps", 0)), status]
                    + [fmt_value(t.get("params", {}).get(k)) for k in keys])
    lines = ["", title] + render_table(header, rows, "rlrrl" + "r" * len(keys), width)
    if len(order) > top:
        lines.append(f"({top} of {len(order)} trials shown; all are in summary.json)")
    text = legend(keys, width)
    if text:
        lines.append(text)
    for t in trials:
        if t.get("error"):
            lines.append(f"trial {t['trial_id']} failed: {t['error'][:width - 22]}")
        if t.get("note"):
            lines.append(f"(!) trial {t['trial_id']}: {t['note']}; it cannot be the best")
    lines.append("")
    path = Path(summary_path)
    name = summary["name"]
    if b:
        tests = ", ".join(f"{k}={fmt_metric(v) if isinstance(v, float) else v}" for k, v in b.items()
                          if k.startswith("test_"))
        at = b.get("best_step") or b.get("steps")
        trained = f" of {b.get('steps')} trained" if b.get("steps") not in (None, at) else ""
        lines.append(f"best:         trial {b['trial_id']}, {metric}={fmt_metric(b['value'])} at step {at}{trained} "
                     "(its best checkpoint)")
        if tests:
            lines.append(f"  test split: {tests}")
        elif stopped:
            lines.append(f"  not test-evaluated or registered: the search was stopped by {stopped}; "
                         f"--resume finishes it")
        lines += _wrap_pairs("  params:     ", b["params"], width)
        lines.append(f"  adapter:    {_rel(b['adapter_dir'])}")
        if b.get("model_version"):
            lines.append(f"  registered: MLflow model version {b['model_version']} (alias 'champion')")
    else:
        lines.append("no trial produced a result; see the errors above (run again with --verbose for worker logs)")
    report = path.parent / "report"
    if report.is_dir() and any(report.glob("*.png")):
        lines.append(f"report:       {_rel(report)}/")
        lines.append(f"              {' '.join(sorted(p.name for p in report.glob('*.png')))}")
    ml = summary.get("mlflow", {})
    cmd, url = mlflow_ui_command(ml.get("tracking_uri", "sqlite:///mlflow.db"))
    where = runs_url(url, ml.get("experiment_id"), name)
    if cmd:
        lines.append(f"compare runs: {cmd}")
        lines.append(f"              then open {where}")
    else:
        lines.append(f"compare runs: open {where}")
    if b:
        lines.append(f"export:       python -m search.export --summary {_rel(path)} --out exports/{name}")
    lines.append(f"plots again:  python -m search.report {name}"
                 + (f" --output-dir {_rel(path.parent.parent)}" if _rel(path.parent.parent) != "runs" else ""))
    lines.append(f"summary:      {_rel(path)}")
    return "\n".join(lines)
