"""The search driver: Ray start, the Tuner (OptunaSearch TPE + ASHA), MLflow parent run, summary and champion."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from search.config import ExperimentConfig, dump_config
from search.space import Space, to_tune
from search import tracking
from trainables.settings import TINY_MODEL, SettingsError

log = logging.getLogger("search")


def _say(msg: str) -> None:
    print(msg, flush=True)


def resolve_model(cfg: ExperimentConfig) -> ExperimentConfig:
    """Replace the built-in tiny model reference with its directory, building it on first use."""
    if cfg.trial.model.name_or_path != TINY_MODEL:
        return cfg
    from trainables.tiny import ensure_tiny_model

    cache = Path(cfg.model_cache).expanduser().resolve()
    path = ensure_tiny_model(cache, cfg.trial.data, progress=_say)
    trial = cfg.trial.with_values({"model.name_or_path": str(path)})
    return cfg.model_copy(update={"trial": trial})


def _start_ray(cfg: ExperimentConfig, plan: dict, verbose: bool) -> None:
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    env = {"TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "warning"),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore" if not verbose else "default",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, runtime_env={"env_vars": env}, log_to_driver=verbose)
    else:
        # The dashboard must run: Ray Train's placement-group cleaner asks the state API (served by the dashboard)
        # whether a trial's Train controller is dead before it frees the trial's workers' resources. Without it,
        # every trial that Tune stops (ASHA) leaks its CPUs and later trials wait forever for workers.
        ray.init(num_cpus=int(plan["cluster"]["CPU"]), num_gpus=int(plan["cluster"].get("GPU", 0)),
                 include_dashboard=True, dashboard_host="127.0.0.1", runtime_env={"env_vars": env}, log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.WARNING)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "ray", "transformers", "peft", "trl", "bitsandbytes", "datasets", "optuna", "mlflow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def build_tuner(cfg: ExperimentConfig, space: Space, plan: dict, callbacks: list, resume: bool):
    from optuna.samplers import RandomSampler, TPESampler
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from trainables.ray_trainable import TRIAL_RESOURCES, TrialResources, run_trial

    out = cfg.search_dir()
    resources = TrialResources(cfg.resources.num_workers, cfg.resources.cpus_per_worker,
                               cfg.resources.gpus_per_worker, tuple(cfg.resources.custom_per_worker.items()))
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.trial.model_dump(), resources=resources,
                             storage_path=str(out / "train"), max_failures=cfg.max_failures),
        TRIAL_RESOURCES,
    )
    run_config = tune.RunConfig(name="tune", storage_path=str(out), callbacks=callbacks, verbose=1,
                                failure_config=tune.FailureConfig(max_failures=0))
    if resume:
        return tune.Tuner.restore(str(out / "tune"), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True, restart_errored=False)
    sampler = (TPESampler(seed=cfg.searcher.seed, n_startup_trials=cfg.searcher.n_startup_trials)
               if cfg.searcher.algorithm == "tpe" else RandomSampler(seed=cfg.searcher.seed))
    searcher = OptunaSearch(metric=cfg.objective.metric, mode=cfg.objective.mode, sampler=sampler,
                            points_to_evaluate=space.points_to_evaluate or None)
    rounds = math.ceil(cfg.trial.optim.max_steps / cfg.trial.eval.every_steps)
    # max_t one round past the last evaluation: a trial that trains to the end returns from fit() by itself (and
    # releases its workers cleanly) instead of being stopped by the scheduler at its last report.
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=rounds + 1, grace_period=cfg.scheduler.grace_period,
                               reduction_factor=cfg.scheduler.reduction_factor)
                 if cfg.scheduler.type == "asha" else FIFOScheduler())
    return tune.Tuner(
        trainable,
        param_space=to_tune(space),
        tune_config=tune.TuneConfig(metric=cfg.objective.metric, mode=cfg.objective.mode, search_alg=searcher,
                                    scheduler=scheduler, num_samples=cfg.num_trials,
                                    max_concurrent_trials=plan["concurrency"]),
        run_config=run_config,
    )


def collect_trials(results, cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """One record per trial from Tune's ResultGrid: status, params, last objective value, steps, checkpoint."""
    metric = cfg.objective.metric
    trials = []
    for r in results:
        m = r.metrics or {}
        tid = m.get("trial_id") or (r.path and Path(r.path).name)
        value = m.get(metric)
        status = "ERROR" if r.error else "TERMINATED"
        steps = int(m.get("step", 0) or 0)
        trials.append({
            "trial_id": tid,
            "status": status,
            "params": dict(r.config or {}),
            "value": float(value) if value is not None and not r.error else None,
            "steps": steps,
            "stopped_early": bool(not r.error and steps < cfg.trial.optim.max_steps),
            "error": str(r.error).splitlines()[0][:500] if r.error else None,
            "checkpoint": m.get("checkpoint_path"),
        })
    return sorted(trials, key=lambda t: str(t["trial_id"]))


def pick_best(trials: list[dict], mode: str) -> dict | None:
    scored = [t for t in trials if t["value"] is not None and t["checkpoint"]]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda t: t["value"])


def evaluate_on_test(adapter_dir: str, resources: dict) -> dict[str, float]:
    """Test-split F1 of an adapter, run as a Ray task with one trial worker's resources (a GPU where trials had one)."""
    import ray

    @ray.remote(num_cpus=resources.get("CPU", 1), num_gpus=resources.get("GPU", 0))
    def _eval(path: str) -> dict[str, float]:
        return test_metrics(path)

    return ray.get(_eval.remote(adapter_dir))


def test_metrics(adapter_dir: str) -> dict[str, float]:
    from trainables.data import load_splits
    from trainables.predict import load_classifier

    clf = load_classifier(adapter_dir)
    s = json.loads((Path(adapter_dir) / "trial_settings.json").read_text())
    from trainables.settings import TrialSettings

    settings = TrialSettings.model_validate(s)
    splits = load_splits(settings.data, seed=settings.seed)
    r = clf.evaluate(splits.test, settings.data.minority_label)
    return {"test_f1": r["f1"], "test_precision": r["precision"], "test_recall": r["recall"],
            "test_examples": len(splits.test)}


def run_search(cfg: ExperimentConfig, space: Space, plan: dict, resume: bool = False,
               verbose: bool = False) -> dict[str, Any]:
    import ray

    t0 = time.time()
    out = cfg.search_dir()
    out.mkdir(parents=True, exist_ok=True)
    cfg = resolve_model(cfg)
    c = tracking.client(cfg.mlflow.tracking_uri)
    exp_id = tracking.experiment_id(c, cfg.mlflow.experiment)
    parent = tracking.find_or_create_parent(c, exp_id, cfg.name, resume)
    if not resume:
        tracking.log_parent_info(
            c, parent,
            params={"num_trials": cfg.num_trials, "objective": f"{cfg.objective.metric}:{cfg.objective.mode}",
                    "searcher": cfg.searcher.algorithm, "scheduler": cfg.scheduler.type,
                    "max_steps": cfg.trial.optim.max_steps, "model": cfg.trial.model.name_or_path,
                    "data": cfg.trial.data.path, "space": cfg.space, "concurrency": plan["concurrency"]},
            tags={"git_commit": git_commit(), **{f"version.{k}": v for k, v in library_versions().items()}},
            files={"experiment_config.yaml": dump_config(cfg), "space.yaml": Path(space.source).read_text()},
        )
    (out / "config.yaml").write_text(dump_config(cfg))
    cb = tracking.MlflowTrialCallback(cfg.mlflow.tracking_uri, exp_id, parent, cfg.name)
    status = "FAILED"
    _say(f"search {cfg.name!r}: {cfg.num_trials} trials, {plan['concurrency']} at a time; results in {out}")
    try:
        _start_ray(cfg, plan, verbose)
        tuner = build_tuner(cfg, space, plan, [cb], resume)
        results = tuner.fit()
        trials = collect_trials(results, cfg)
        best = pick_best(trials, cfg.objective.mode)
        summary = finalize(cfg, c, exp_id, parent, trials, best, plan, time.time() - t0, cb.seconds)
        status = "FINISHED"
        return summary
    finally:
        c.set_terminated(parent, status if status == "FINISHED" else "KILLED")
        ray.shutdown()


def finalize(cfg, c, exp_id, parent, trials, best, plan, wall, mlflow_seconds) -> dict[str, Any]:
    """Test-evaluate and register the best adapter, write summary.json and print the summary."""
    out = cfg.search_dir()
    best_rec = None
    if best:
        adapter_dir = out / "best_adapter"
        tracking.copy_adapter(best["checkpoint"], adapter_dir)
        test = evaluate_on_test(str(adapter_dir), plan["per_trial"])
        run_id = tracking.find_child_run(c, exp_id, parent, best["trial_id"])
        if run_id:
            c.log_batch(run_id, metrics=[_metric(k, v) for k, v in test.items()])
        version = tracking.register_champion(c, cfg.mlflow.registered_model.format(name=cfg.name), run_id)
        c.log_batch(parent, metrics=[_metric("best_" + cfg.objective.metric, best["value"])]
                    + [_metric("best_" + k, v) for k, v in test.items()])
        best_rec = {"trial_id": best["trial_id"], "value": best["value"], "params": best["params"],
                    "adapter_dir": str(adapter_dir), "mlflow_run_id": run_id, "steps": best["steps"],
                    "model_version": version, **test}
    summary = {
        "name": cfg.name,
        "objective": {"metric": cfg.objective.metric, "mode": cfg.objective.mode},
        "best": best_rec,
        "trials": [{k: t[k] for k in ("trial_id", "status", "params", "value", "steps", "stopped_early", "error")}
                   for t in trials],
        "mlflow": {"tracking_uri": cfg.mlflow.tracking_uri, "experiment_id": exp_id, "parent_run_id": parent},
        "wall_seconds": round(wall, 1),
        "mlflow_seconds": round(mlflow_seconds, 2),
    }
    path = out / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(path)
    c.log_artifact(parent, str(path))
    print_summary(summary, cfg, path)
    return summary


def _metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


def print_summary(summary: dict, cfg: ExperimentConfig, path: Path) -> None:
    metric = summary["objective"]["metric"]
    lines = ["", f"== search {summary['name']!r} done in {summary['wall_seconds']:.0f} s =="]
    ranked = sorted(summary["trials"], key=lambda t: (t["value"] is None, -(t["value"] or 0)
                                                       if cfg.objective.mode == "max" else (t["value"] or 0)))
    keys = sorted({k for t in summary["trials"] for k in t["params"]})
    header = f"{'trial':>18} {'status':>10} {metric:>8} {'steps':>5} {'early':>5}  " + "  ".join(keys)
    lines.append(header)
    for t in ranked[:10]:
        val = f"{t['value']:.4f}" if t["value"] is not None else "-"
        params = "  ".join(_fmt(t["params"].get(k)) for k in keys)
        lines.append(f"{str(t['trial_id']):>18} {t['status']:>10} {val:>8} {t['steps']:>5} "
                     f"{'yes' if t['stopped_early'] else 'no':>5}  {params}")
    b = summary["best"]
    if b:
        lines += ["", f"best: trial {b['trial_id']}  {metric}={b['value']:.4f}  test_f1={b['test_f1']:.4f}",
                  f"  params: {json.dumps(b['params'], default=str)}",
                  f"  adapter: {b['adapter_dir']}",
                  f"  MLflow UI: mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri}",
                  f"  export:    python -m search.export --summary {path} --out exports/{summary['name']}"]
    else:
        lines.append("no trial produced a result; see the errors above")
    lines.append(f"summary: {path}")
    print("\n".join(lines), flush=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
