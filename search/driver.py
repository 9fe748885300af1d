"""The search driver: Ray start, the Tuner (OptunaSearch TPE + ASHA), MLflow parent run, summary and champion."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from search.config import ExperimentConfig, dump_config
from search.space import Space, to_tune
from search import progress, resilience, tracking
from trainables import metrics as M
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
    path = ensure_tiny_model(cache, cfg.trial, progress=_say)
    trial = cfg.trial.with_values({"model.name_or_path": str(path)})
    return cfg.model_copy(update={"trial": trial})


def prepare_data_cache(cfg: ExperimentConfig) -> ExperimentConfig:
    """Encode the search's data once, into the preprocessing cache its trials read (trainables/cache.py).

    `trial.cache_dir` None means <model_cache>/data; '' turns the cache off (every trial tokenizes)."""
    trial = cfg.trial
    if trial.cache_dir is None:
        trial = trial.with_values({"cache_dir": str(Path(cfg.model_cache).expanduser().resolve() / "data")})
    if trial.cache_dir:
        from trainables.tasks import prepare_data

        info = prepare_data(trial)
        what = f"encoded {info['inputs']} inputs" if info["encoded"] else f"{info['inputs']} inputs already encoded"
        _say(f"data: {what} in {info['seconds']:.1f} s; trials read them from {info['cache_dir']}")
    return cfg.model_copy(update={"trial": trial})


def _start_ray(cfg: ExperimentConfig, plan: dict, verbose: bool) -> None:
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Tune saves the experiment's state (trials, searcher, scheduler, callbacks) at most every 10 s by default. A
    # SIGKILL inside that window loses the trials started since the last save, with whatever they reported: the
    # resumed search cannot continue them (seen: a trial at its first checkpoint, lost and sampled anew). Every 3 s
    # keeps the window shorter than any trial's start-up (tests/test_reliability.py's 200-trial search measures the
    # cost). Trials lost anyway are retired in MLflow on resume (tracking.retire_lost_runs).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "3")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy output is silent at verbose=0; the new
        # one still prints its experiment boxes. search.progress.ProgressTable prints the trial table instead.
    env = {"TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "warning"),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore" if not verbose else "default",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", **({"QLORA_VERBOSE": "1"} if verbose else {}),
           # Ray Train gives a worker group 60 s to start, then fails the attempt. A worker that imports torch and
           # transformers on a busy machine, or waits for the autoscaler to add a GPU node, can need minutes; plan
           # resources already refuses a trial that can never fit, so waiting longer only costs time when busy.
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600"),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")}
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, runtime_env={"env_vars": env}, log_to_driver=verbose)
    else:
        start_local_ray(int(plan["cluster"]["CPU"]), int(plan["cluster"].get("GPU", 0)), env,
                        log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)


def start_local_ray(num_cpus: int, num_gpus: int = 0, env: dict[str, str] | None = None,
                    runtime_env: dict[str, Any] | None = None, **init_kwargs) -> None:
    """`ray.init` a local Ray on this machine, with its dashboard on a port of its own (`env`: the workers'
    environment variables, given the dashboard's address too; `runtime_env`: the job's other runtime-environment
    fields).

    The dashboard must run: Ray Train's placement-group cleaner asks the state API (served by the dashboard) whether
    a trial's Train controller is dead before it frees the trial's workers' resources. Without it, every trial that
    Tune stops (ASHA) leaks its CPUs and later trials wait forever for workers. The cleaner finds the state API by
    address. With another Ray instance on this machine (a second search, a test's cluster) an address-less lookup
    fails ("Found multiple active Ray instances") and stopped trials' resources are never freed: the dashboard gets
    a port of its own, and this process, the processes it starts and Ray's workers are told where it is
    (RAY_API_SERVER_ADDRESS). Ray Train's preemption watcher is off (RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0): no node
    of a local Ray is ever drained."""
    import ray

    port = _free_port()
    env = dict(env or {})
    # Ray Train's preemption watcher (an actor per Train run, started beside the training) reports the draining of a
    # node, which only an autoscaler's spot nodes do: on this one machine it is a process that cost each Train run
    # 1.4 CPU-seconds (bench/README.md). Set in this process's environment, which Ray's daemons and so every job's
    # workers inherit: a second search joining this Ray (ray_address) gets it too.
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    env["RAY_API_SERVER_ADDRESS"] = os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, runtime_env={**(runtime_env or {}), "env_vars": env}, **init_kwargs)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def build_tuner(cfg: ExperimentConfig, space: Space, plan: dict, callbacks: list, resume: bool,
                verbose: bool = False):
    from optuna.samplers import RandomSampler, TPESampler
    from ray import tune

    from search.cluster import storage_root, tune_name, tune_path
    from search.resilience import ASHA, FIFO, SearchState, TieBreakingOptunaSearch, restored_callbacks
    from trainables.ray_trainable import TRIAL_RESOURCES, TrialResources

    root = storage_root(cfg)  # trial results and checkpoints: output_dir, or shared storage on a cluster
    resources = TrialResources(cfg.resources.num_workers, cfg.resources.cpus_per_worker,
                               cfg.resources.gpus_per_worker, tuple(cfg.resources.custom_per_worker.items()),
                               cfg.resources.torch_process_group, cfg.resources.warm_workers,
                               cfg.resources.allocator)
    trainable = tune.with_resources(
        tune.with_parameters(load_trainable(cfg.trainable), base=cfg.trial_for_trials().model_dump(),
                             resources=resources, storage_path=f"{root}/train", max_failures=cfg.max_failures,
                             objective=(cfg.objective.metric, cfg.objective.mode)),
        TRIAL_RESOURCES,
    )
    # Ray Tune's own status tables only with --verbose: search.progress.ProgressTable prints the compact one.
    run_config = tune.RunConfig(name=tune_name(cfg), storage_path=root, callbacks=callbacks,
                                verbose=1 if verbose else 0, failure_config=tune.FailureConfig(max_failures=0))
    if resume:
        # The searcher (Optuna study) and the callbacks' state come back from the experiment directory; unfinished
        # trials restart and their trainable continues from its last checkpoint.
        tuner = tune.Tuner.restore(tune_path(cfg), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, restart_errored=False)
        restored_callbacks(tuner, callbacks)
        return tuner
    sampler = (TPESampler(seed=cfg.searcher.seed, n_startup_trials=cfg.searcher.n_startup_trials)
               if cfg.searcher.algorithm == "tpe" else RandomSampler(seed=cfg.searcher.seed))
    searcher = TieBreakingOptunaSearch(metric=cfg.objective.metric, mode=cfg.objective.mode, sampler=sampler,
                                       points_to_evaluate=space.points_to_evaluate or None,
                                       tie_break=cfg.searcher.tie_break)
    # ASHA counts optimizer steps (the reported `step`), which stay right when a trial restarts from a checkpoint;
    # Tune's training_iteration starts again at 1 in a restarted trial.
    scheduler = (ASHA(time_attr="step", max_t=cfg.asha_max_t(),
                      grace_period=cfg.asha_grace_steps(),
                      reduction_factor=cfg.scheduler.reduction_factor, tie_break=cfg.scheduler.tie_break)
                 if cfg.scheduler.type == "asha" else FIFO())
    for cb in callbacks:
        if isinstance(cb, SearchState):
            cb.attach(scheduler)
    return tune.Tuner(
        trainable,
        param_space=to_tune(space),
        tune_config=tune.TuneConfig(metric=cfg.objective.metric, mode=cfg.objective.mode, search_alg=searcher,
                                    scheduler=scheduler, num_samples=cfg.num_trials,
                                    max_concurrent_trials=plan["concurrency"]),
        run_config=run_config,
    )


def load_trainable(spec: str):
    """`module:function` -> the function (the Tune trainable each trial runs)."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise SettingsError(f"trainable: cannot load {spec!r} ({err}); use module:function, e.g. "
                            f"trainables.ray_trainable:run_trial") from None


# Where a trial's time went, as its worker reported it (cumulative, in its last result); see trainables/sft.py.
WORKER_TIMING = ("trial_entered_at", "fit_at", "worker_started_at", "imports_seconds", "data_seconds",
                 "tokenize_seconds", "model_load_seconds", "eval_seconds_total", "checkpoint_seconds_total",
                 "elapsed_seconds", "warm_host_seconds", "warm_host_imports_seconds", "warm_host_trials_before")


def collect_trials(results, cfg: ExperimentConfig, interrupted: dict[str, tuple[str, dict]] | None = None,
                   clock: "tracking.MlflowTrialCallback | None" = None) -> list[dict[str, Any]]:
    """One record per trial from Tune's ResultGrid: status, params, last objective value, steps, checkpoint.

    `interrupted`: after a stop, Tune's trial statuses from just before it ({trial_id: (status, config)}); a trial
    that was RUNNING or PENDING then is INTERRUPTED (resumable), not done.
    `clock`: the MLflow callback, which saw when each trial started and ended and its time in MLflow calls."""
    from trainables.ray_trainable import error_line

    metric = cfg.objective.metric
    trials = []
    tune_trials = list(getattr(getattr(results, "_experiment_analysis", None), "trials", None) or [])
    for i, r in enumerate(results):
        last = r.metrics or {}
        m = best_result(r, metric, cfg.objective.mode) or last  # the trial's best evaluation with a checkpoint
        trial = tune_trials[i] if len(tune_trials) == len(results) else None  # same order as the ResultGrid
        tid = (trial.trial_id if trial else None) or m.get("trial_id") or (r.path and Path(r.path).name)
        value = m.get(metric)
        status = "ERROR" if r.error else "TERMINATED"
        before, config = (interrupted or {}).get(tid, ("TERMINATED", {}))
        if status == "TERMINATED" and before not in ("TERMINATED", "ERROR"):
            status = "INTERRUPTED"
        steps = int(last.get("step", 0) or 0)
        # a trial whose last result fails the objective's constraint (the style task's TERSE F1 floor) keeps its
        # (negative) score for the searcher, but is marked and can never be the best
        below_floor = m.get(M.MEETS_FLOOR) == 0.0
        note = (f"below the TERSE F1 floor ({M.TERSE_F1}={m.get(M.TERSE_F1, float('nan')):.3f} < "
                f"{cfg.trial.style.terse_f1_floor})" if below_floor else None)
        trials.append({
            "trial_id": tid,
            "status": status,
            "params": dict(r.config or (trial.config if trial else None) or config),
            "value": float(value) if value is not None and not r.error else None,
            "steps": steps,
            "best_step": int(m.get("step", 0) or 0),
            "stopped_early": bool(status == "TERMINATED" and steps < cfg.trial.optim.max_steps),
            "error": error_line(r.error)[:500] if r.error else None,
            "checkpoint": m.get("checkpoint_path"),
            "note": note,
            "timing": {**{k: last[k] for k in WORKER_TIMING if isinstance(last.get(k), (int, float))},
                       **(clock.timing(tid) if clock else {})},
        })
    return sorted(trials, key=lambda t: str(t["trial_id"]))


def best_result(result, metric: str, mode: str) -> dict[str, Any] | None:
    """The trial's best reported evaluation that came with a checkpoint (Train keeps the best ones: see
    trainables/ray_trainable.py), as a metrics dict; None if its history cannot be read.

    A trial is judged by, and exports, the best adapter it produced, not the one it ended with: an objective can peak
    mid-trial and fall (the style task's separation does), as `load_best_model_at_end` does in HF's Trainer."""
    df = getattr(result, "metrics_dataframe", None)
    if df is None or metric not in df or "checkpoint_path" not in df:
        return None
    rows = df[df["checkpoint_path"].notna() & df[metric].notna()]
    if not len(rows):
        return None
    row = rows.loc[rows[metric].idxmax() if mode == "max" else rows[metric].idxmin()].to_dict()
    path = str(row["checkpoint_path"])
    if "://" not in path and not Path(path).exists():  # deleted (a search from before best checkpoints were kept)
        return None
    return row


def pick_best(trials: list[dict], mode: str) -> dict | None:
    scored = [t for t in trials if t["value"] is not None and t["checkpoint"] and t["status"] == "TERMINATED"
              and not t.get("note")]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda t: t["value"])


def evaluate_on_test(adapter_dir: str, resources: dict, metrics_fn=None) -> dict[str, float]:
    """Test-split F1 of an adapter, run as a Ray task with one trial worker's resources (a GPU where trials had one).

    `metrics_fn`: the trainable module's own `test_metrics` where it has one (the stand-in does)."""
    import ray

    import tempfile

    # The task may run on another node than the driver (on a cluster: a GPU worker), where `adapter_dir` does not
    # exist: the adapter's files travel with the task (a LoRA adapter is megabytes) and land in a local temp dir.
    files = {p.name: p.read_bytes() for p in Path(adapter_dir).iterdir() if p.is_file()}
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}

    @ray.remote(num_cpus=resources.get("CPU", 1), num_gpus=resources.get("GPU", 0), resources=custom or None)
    def _eval(files: dict[str, bytes]) -> dict[str, float]:
        with tempfile.TemporaryDirectory(prefix="qlora-test-") as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            return (metrics_fn or test_metrics)(tmp)

    return ray.get(_eval.remote(files))


def test_metrics(adapter_dir: str) -> dict[str, float]:
    """The task's held-out test metrics (test F1, or test separation and TERSE F1) of a saved adapter."""
    from trainables.tasks import test_metrics as task_test_metrics

    return task_test_metrics(adapter_dir)


def release_leftover_placement_groups(grace_s: float = 10.0) -> int:
    """Remove this job's placement groups still held `grace_s` after Tuner.fit() returned; returns how many.

    Every trial has ended by then. The workers' group of a trial stopped just before the end is still CREATED for a
    few seconds, until Ray Train's cleaner (which checks every second) sees its controller gone and removes it:
    that is waited for, not counted. A group still CREATED after the grace is a leak (seen when worker groups timed
    out under heavy load, Train's cleaner not told of them), and the test evaluation that follows would wait
    forever for its CPU. Other jobs' groups are left alone."""
    import ray
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    job = ray.get_runtime_context().get_job_id()

    def held() -> list[str]:
        return [pid for pid, pg in placement_group_table().items()
                if pid.endswith(job) and pg.get("state") == "CREATED"]

    deadline = time.monotonic() + grace_s
    while (leftover := held()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in leftover:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pid))))
    if leftover:
        log.warning("freed %d placement group(s) that ended trials still held %g s after the search ended",
                    len(leftover), grace_s)
    return len(leftover)


def run_search(cfg: ExperimentConfig, space: Space, plan: dict, resume: bool = False,
               verbose: bool = False) -> dict[str, Any]:
    import ray

    t0 = time.time()
    out = cfg.search_dir()
    out.mkdir(parents=True, exist_ok=True)
    cfg = prepare_data_cache(resolve_model(cfg))
    c = tracking.client(cfg.mlflow.tracking_uri)
    exp_id = tracking.experiment_id(c, cfg.mlflow.experiment, cfg.mlflow.tracking_uri)
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
    (out / "config.yaml").write_text(tracking.redact(dump_config(cfg)))
    cb = tracking.MlflowTrialCallback(cfg.mlflow.tracking_uri, exp_id, parent, cfg.name,
                                      cfg.objective.metric, cfg.objective.mode)
    table = progress.ProgressTable(cfg.objective.metric, cfg.objective.mode, cfg.trial.optim.max_steps,
                                   cfg.num_trials, param_keys=list(space.params))
    status = "FAILED"
    _say(f"search {cfg.name!r}: {cfg.num_trials} trials, {plan['concurrency']} at a time; results in {out}")
    procs = resilience.RayProcesses(out)
    reaped = procs.reap_stale()
    if reaped:
        _say(f"ended {len(reaped)} Ray process(es) left running by an earlier, killed driver of this search")
    stop = resilience.Interrupt(on_hard_exit=lambda: _hard_exit(c, parent)).install()
    try:
        t_ray = time.time()
        _start_ray(cfg, plan, verbose)
        plan = {**plan, "ray_start_seconds": round(time.time() - t_ray, 3)}
        stop.install()  # again: ray.init replaced the SIGTERM handler
        procs.record()
        state = resilience.SearchState()  # keep last: Tune restores callback state by position
        tuner = build_tuner(cfg, space, plan, [cb, table, state], resume, verbose=verbose)
        stop.enter_tune()
        results = tuner.fit()
        stop.phase = "finish"
        release_leftover_placement_groups()
        trials = collect_trials(results, cfg, state.trials if stop.requested else None, clock=cb)
        if resume:
            lost = tracking.retire_lost_runs(c, exp_id, parent, {str(t["trial_id"]) for t in trials})
            if lost:
                _say(f"{len(lost)} trial(s) {tracking.LOST_NOTE}; their MLflow runs are marked lost and deleted "
                     f"(restorable): {', '.join(lost)}")
        if stop.requested:
            cb.end_open_runs("KILLED")
        best = pick_best(trials, cfg.objective.mode)
        summary = finalize(cfg, c, exp_id, parent, trials, best, plan, time.time() - t0, cb.seconds,
                           interrupted=stop.signal_name)
        if stop.requested:
            left = sum(t["status"] != "TERMINATED" and t["status"] != "ERROR" for t in trials)
            _say(f"stopped by {stop.signal_name}: {left} trial(s) unfinished; continue with "
                 f"python -m search.run --name {cfg.name} --resume (and the same --config/--set)")
        status = "KILLED" if stop.requested else "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        cb.end_open_runs("KILLED")
        raise
    finally:
        c.set_terminated(parent, status)
        ray.shutdown()
        procs.kill_descendants()  # whatever Ray left (its agents outlive the raylet)
        procs.clear()
        stop.uninstall()


def _hard_exit(c, parent: str) -> None:
    """Second Ctrl-C / SIGTERM: kill this driver's Ray processes now; mark the parent run KILLED if MLflow answers
    within 2 s."""
    import threading

    resilience.RayProcesses.kill_descendants(timeout=2.0)
    t = threading.Thread(target=lambda: c.set_terminated(parent, "KILLED"), daemon=True)
    t.start()
    t.join(2.0)


def finalize(cfg, c, exp_id, parent, trials, best, plan, wall, mlflow_seconds,
             interrupted: str | None = None) -> dict[str, Any]:
    """Test-evaluate and register the best adapter, write summary.json and print the summary.

    `interrupted` (the signal's name): the search was stopped; the summary lists what finished, the best finished
    trial is named but neither test-evaluated nor registered, and `--resume` continues the rest."""
    out = cfg.search_dir()
    best_rec = None
    if best and interrupted:
        adapter_dir = out / "best_adapter"
        tracking.copy_adapter(best["checkpoint"], adapter_dir)
        best_rec = {"trial_id": best["trial_id"], "value": best["value"], "params": best["params"],
                    "adapter_dir": str(adapter_dir), "steps": best["steps"],
                    "best_step": best.get("best_step")}
    elif best:
        adapter_dir = out / "best_adapter"
        tracking.copy_adapter(best["checkpoint"], adapter_dir)
        module = load_trainable(cfg.trainable).__module__
        test = evaluate_on_test(str(adapter_dir), plan["per_trial"],
                                getattr(sys.modules[module], "test_metrics", None)) if cfg.test_evaluation else {}
        run_id = tracking.find_child_run(c, exp_id, parent, best["trial_id"])
        if run_id:
            c.log_batch(run_id, metrics=[_metric(k, v) for k, v in test.items()])
        version = tracking.register_champion(c, cfg.mlflow.registered_model.format(name=cfg.name), run_id)
        c.log_batch(parent, metrics=[_metric("best_" + cfg.objective.metric, best["value"])]
                    + [_metric("best_" + k, v) for k, v in test.items()])
        best_rec = {"trial_id": best["trial_id"], "value": best["value"], "params": best["params"],
                    "adapter_dir": str(adapter_dir), "mlflow_run_id": run_id, "steps": best["steps"],
                    "best_step": best.get("best_step"),
                    "model_version": version, **test}
    summary = {
        "name": cfg.name,
        "objective": {"metric": cfg.objective.metric, "mode": cfg.objective.mode},
        "best": best_rec,
        "trials": [{k: t.get(k) for k in ("trial_id", "status", "params", "value", "steps", "best_step",
                                          "stopped_early", "error", "note", "timing")}
                   for t in trials],
        "mlflow": {"tracking_uri": tracking.redact(cfg.mlflow.tracking_uri), "experiment_id": exp_id,
                   "parent_run_id": parent},
        "wall_seconds": round(wall, 1),
        "ray_start_seconds": plan.get("ray_start_seconds"),
        "mlflow_seconds": round(mlflow_seconds, 2),
        "interrupted": interrupted,
    }
    path = out / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(path)
    c.log_artifact(parent, str(path))
    try:  # plots for people; a failure here must not lose the search's result
        from search.report import write_report

        write_report(out)
    except Exception as err:
        _say(f"warning: the search report could not be written ({err.__class__.__name__}: {err}); "
             f"try: python -m search.report {cfg.name} --output-dir {cfg.output_dir}")
    print_summary(summary, cfg, path)
    return summary


def _metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


def print_summary(summary: dict, cfg: ExperimentConfig, path: Path) -> None:
    print(progress.format_summary(summary, path), flush=True)
