"""The search report: plots that explain a finished search at a glance, written next to its summary and logged to
its parent MLflow run.

    python -m search.report sms-spam                       # regenerate runs/sms-spam/report/ from a finished search
    python -m search.report sms-spam --output-dir /data/runs --no-mlflow

Plots (PNG, in <output_dir>/<name>/report/):
  best_so_far.png          best objective so far vs wall time, every evaluation of every trial as a dot
  parallel_coordinate.png  sampled parameters vs objective, one line per trial (Optuna)
  param_importances.png    which parameters mattered for the objective (Optuna, PED-ANOVA)
  learning_curves.png      objective at each evaluation step per trial; short curves were stopped by ASHA (Optuna)
and trials.csv, one row per trial.

The Optuna plots come from an Optuna study rebuilt from summary.json (params, final value, state) with the space's
distributions, and from Ray Tune's per-trial results (<name>/tune-<name>/*/result.json) for the per-step values and
times.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import yaml

from trainables.settings import SettingsError

PLOTS = ("best_so_far.png", "parallel_coordinate.png", "param_importances.png", "learning_curves.png")


def load_summary(search_dir: Path) -> dict[str, Any]:
    path = search_dir / "summary.json"
    if not path.is_file():
        raise SettingsError(f"{path}: no finished search here; check the name and --output-dir "
                            f"(a search writes summary.json when it ends)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SettingsError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def tune_dir(search_dir: Path) -> str | None:
    """Ray Tune's experiment directory of the search: <storage_path or output_dir>/<name>/tune-<name>
    (search/cluster.py; `tune` for a search from before that name); a local path or a URI (s3://...)."""
    names = ["tune"]
    try:
        from search import cluster
        from search.config import ExperimentConfig

        cfg = ExperimentConfig.model_validate(yaml.safe_load((search_dir / "config.yaml").read_text()))
        if cfg.storage_path:
            return cluster.tune_path(cfg)
        names.insert(0, cluster.tune_name(cfg))
    except Exception:  # no or an older config.yaml: Tune wrote next to summary.json
        pass
    local = next((search_dir / n for n in names if (search_dir / n).is_dir()), None)
    return str(local.resolve()) if local else None  # Ray reads a relative path as a URI


def trial_histories(search_dir: Path, metric: str, also: Sequence[str] = ()) -> dict[str, list[dict[str, float]]]:
    """Per trial id, its reported results in order: wall-clock `timestamp`, `time_total_s`, `step`, the metric
    (`value`) and each metric in `also` (under its own name; None where not reported).

    Read from Ray Tune's experiment directory (no Ray cluster needed); {} if it cannot be read."""
    where = tune_dir(search_dir)
    if where is None:
        return {}
    from ray.tune import ExperimentAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            analysis = ExperimentAnalysis(where)
        except Exception:  # an experiment dir from another Ray version, or half-written: plots from summary only
            return {}
        out: dict[str, list[dict[str, float]]] = {}
        for trial in analysis.trials:
            df = analysis.trial_dataframes.get(trial.path) if hasattr(trial, "path") else None
            if df is None:
                df = next((d for d in analysis.trial_dataframes.values()
                           if "trial_id" in d and len(d) and str(d["trial_id"].iloc[0]) == trial.trial_id), None)
            if df is None or not len(df):
                continue
            rows = []
            for _, r in df.iterrows():
                v = r.get(metric)
                rows.append({"timestamp": float(r.get("timestamp", math.nan)),
                             "time_total_s": float(r.get("time_total_s", math.nan)),
                             "step": int(r.get("step", r.get("training_iteration", 0)) or 0),
                             "value": _number(v),
                             **{k: _number(r.get(k)) for k in also}})
            out[trial.trial_id] = rows
    return out


def _number(v: Any) -> float | None:
    return float(v) if v is not None and not _isnan(v) else None


def _isnan(v: Any) -> bool:
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return True


def distributions(search_dir: Path, trials: list[dict]) -> dict[str, Any]:
    """Optuna distributions of the searched parameters: from the search's space file where it can be read, else
    inferred from the sampled values (numbers -> float/int ranges, anything else -> categorical)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    try:
        from search.space import load_space
        from trainables.data import resolve_path

        cfg = yaml.safe_load((search_dir / "config.yaml").read_text())
        space = load_space(resolve_path(cfg["space"]))
        for key, p in space.params.items():
            if p.type == "choice":
                out[key] = CategoricalDistribution(list(p.values))
            elif p.type == "uniform":
                out[key] = FloatDistribution(p.low, p.high)
            elif p.type == "loguniform":
                out[key] = FloatDistribution(p.low, p.high, log=True)
            elif p.type == "randint":
                out[key] = IntDistribution(int(p.low), int(p.high))
            elif p.type == "quniform":
                out[key] = FloatDistribution(p.low, p.high)
    except Exception:  # the space file moved or changed: infer from what was sampled
        out = {}
    keys = {k for t in trials for k in t.get("params", {})}
    for key in keys - set(out):
        vals = [t["params"][key] for t in trials if key in t.get("params", {})]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            out[key] = IntDistribution(min(vals), max(vals)) if min(vals) < max(vals) else CategoricalDistribution(
                sorted(set(vals)))
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals) and min(vals) < max(vals):
            out[key] = FloatDistribution(float(min(vals)), float(max(vals)))
        else:
            out[key] = CategoricalDistribution(sorted(set(vals), key=str))
    return out


def build_study(summary: dict[str, Any], dists: dict[str, Any], histories: dict[str, list[dict]]):
    """An in-memory Optuna study holding the search's trials: COMPLETE with their last objective value (as Ray's
    OptunaSearch told its sampler, stopped-early trials included), FAIL for trials that errored."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    mode = summary["objective"]["mode"]
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize",
                                study_name=summary["name"])
    for t in summary["trials"]:
        params = {k: v for k, v in t.get("params", {}).items() if k in dists}
        params = {k: v for k, v in params.items() if _fits(dists[k], v)}
        inter = {h["step"]: h["value"] for h in histories.get(t["trial_id"], []) if h["value"] is not None}
        attrs = {"trial_id": t["trial_id"], "steps": t.get("steps"), "stopped_early": t.get("stopped_early")}
        if t.get("value") is not None:
            ft = create_trial(state=TrialState.COMPLETE, value=float(t["value"]), params=params,
                              distributions={k: dists[k] for k in params}, user_attrs=attrs,
                              intermediate_values=inter)
        else:  # an error, or cut short by Ctrl-C / SIGTERM (resumable): no objective value
            state = TrialState.FAIL if t.get("status") == "ERROR" else TrialState.PRUNED
            ft = create_trial(state=state, params=params, distributions={k: dists[k] for k in params},
                              user_attrs=attrs, intermediate_values=inter)
        study.add_trial(ft)
    return study


def _fits(dist, value) -> bool:
    try:
        dist.to_internal_repr(value)
        return dist._contains(dist.to_internal_repr(value))
    except Exception:
        return False


def plot_best_so_far(summary: dict, histories: dict[str, list[dict]], path: Path) -> None:
    """Best objective so far against wall time since the first trial started; dots are single evaluations."""
    import matplotlib.pyplot as plt

    metric, mode = summary["objective"]["metric"], summary["objective"]["mode"]
    points = []
    for tid, rows in histories.items():
        for r in rows:
            if r["value"] is not None and not _isnan(r["timestamp"]):
                points.append((r["timestamp"], r["value"], tid, r.get("time_total_s")))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if points:
        t0 = min(ts - (tt if tt is not None and not _isnan(tt) else 0.0) for ts, _, _, tt in points)
        points.sort()
        xs = [(p[0] - t0) / 60 for p in points]
        ax.scatter(xs, [p[1] for p in points], s=18, color="0.6", label="an evaluation of a trial", zorder=2)
        best, bx, by = None, [], []
        for x, (_, v, _, _) in zip(xs, points):
            if best is None or (v > best if mode == "max" else v < best):
                best = v
            bx.append(x)
            by.append(best)
        ax.step(bx, by, where="post", color="C0", linewidth=2, label=f"best {metric} so far", zorder=3)
        ax.annotate(f"{best:.4f}", (bx[-1], by[-1]), textcoords="offset points", xytext=(4, 4), color="C0")
        ax.legend(loc="lower right" if mode == "max" else "upper right")
    else:
        ax.text(0.5, 0.5, "no trial reported a value", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(left=0)
    ax.set_xlabel("wall time since the first trial started (minutes)")
    ax.set_ylabel(metric)
    ax.set_title(f"search {summary['name']!r}: best {metric} ({mode}) vs wall time")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _save_optuna_plot(fn, path: Path, title: str, unavailable: str | None = None, labels: dict | None = None,
                      **kw) -> str | None:
    """Run an optuna.visualization.matplotlib function and save its figure. When it cannot be drawn (`unavailable`
    says why, or Optuna refuses), save a figure that says why instead, and return the reason."""
    import matplotlib.pyplot as plt

    reason = unavailable
    try:
        if reason:
            raise ValueError(reason)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ax = fn(**kw)
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        legend = ax.get_legend() if hasattr(ax, "get_legend") else None
        for text in (legend.get_texts() if legend and labels else []):  # Optuna's "Trial3" -> our trial id
            text.set_text(labels.get(text.get_text(), text.get_text()))
        fig.set_size_inches(9, 5)
        fig.suptitle(title)
    except Exception as err:  # optuna refuses e.g. importances with fewer than 2 complete trials
        reason = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        plt.close("all")
        fig, ax = plt.subplots(figsize=(8, 3), dpi=110)
        ax.axis("off")
        ax.text(0.5, 0.5, f"{title}\n\nnot available: {reason}", ha="center", va="center", wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close("all")
    return reason


def write_trials_csv(summary: dict, path: Path) -> None:
    keys = sorted({k for t in summary["trials"] for k in t.get("params", {})})
    metric = summary["objective"]["metric"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "status", metric, "steps", "stopped_early"] + keys)
        for t in summary["trials"]:
            w.writerow([t["trial_id"], t["status"], t.get("value"), t.get("steps"), t.get("stopped_early")]
                       + [t.get("params", {}).get(k) for k in keys])


def write_report(search_dir: str | Path, log_to_mlflow: bool = True) -> dict[str, Any]:
    """Write the report of the finished search in `search_dir`; returns {"dir", "files", "notes", "mlflow"}."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    search_dir = Path(search_dir)
    summary = load_summary(search_dir)
    metric = summary["objective"]["metric"]
    out = search_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    histories = trial_histories(search_dir, metric)
    study = build_study(summary, distributions(search_dir, summary["trials"]), histories)
    notes = {}
    plot_best_so_far(summary, histories, out / "best_so_far.png")
    notes["parallel_coordinate.png"] = _save_optuna_plot(
        ovm.plot_parallel_coordinate, out / "parallel_coordinate.png",
        f"search {summary['name']!r}: parameters vs {metric}", study=study, target_name=metric)
    values = [t["value"] for t in summary["trials"] if t.get("value") is not None]
    notes["param_importances.png"] = _save_optuna_plot(
        ovm.plot_param_importances, out / "param_importances.png",
        f"search {summary['name']!r}: parameter importances for {metric} from {len(values)} trials"
        + (" (few trials: indicative only)" if len(values) < 10 else ""), study=study, target_name=metric,
        unavailable=None if len(set(values)) >= 2 else
        "needs at least 2 finished trials with different objective values")
    notes["learning_curves.png"] = _save_optuna_plot(
        ovm.plot_intermediate_values, out / "learning_curves.png",
        f"search {summary['name']!r}: {metric} at each evaluation step", study=study,
        labels={f"Trial{t.number}": f"trial {t.user_attrs['trial_id']}" for t in study.trials},
        unavailable=None if any(t.intermediate_values for t in study.trials) else
        "no per-step results (Ray Tune's trial directories of this search are gone)")
    write_trials_csv(summary, out / "trials.csv")
    files = [out / name for name in PLOTS] + [out / "trials.csv"]
    logged = False
    ml = summary.get("mlflow") or {}
    if log_to_mlflow and ml.get("parent_run_id"):
        from search.tracking import client

        client(ml["tracking_uri"]).log_artifacts(ml["parent_run_id"], str(out), "report")
        logged = True
    return {"dir": out, "files": files, "notes": {k: v for k, v in notes.items() if v}, "mlflow": logged}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m search.report",
        description="Regenerate the plots of a finished search (best-so-far vs wall time, parallel coordinates, "
                    "parameter importances, learning curves) into <output-dir>/<name>/report/ and log them to the "
                    "search's parent MLflow run.")
    p.add_argument("name", help="Search name (the directory <output-dir>/<name>/ holding summary.json).")
    p.add_argument("--output-dir", default="runs", metavar="DIR",
                   help="Where searches live: the config's output_dir (default: runs).")
    p.add_argument("--no-mlflow", action="store_true",
                   help="Only write the files; do not log them to the parent MLflow run.")
    args = p.parse_args(argv)
    try:
        result = write_report(Path(args.output_dir).expanduser() / args.name, log_to_mlflow=not args.no_mlflow)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report written to {result['dir']}: " + ", ".join(f.name for f in result["files"]))
    for name, why in result["notes"].items():
        print(f"  {name}: not available ({why})")
    if result["mlflow"]:
        print("logged to the parent MLflow run under report/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
