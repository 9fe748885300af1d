"""Run a hyperparameter search for QLoRA adapters.

    python -m search.run                                   # embedded default: tiny Qwen3, SMS Spam, local Ray
    python -m search.run --config configs/sms_spam.yaml --set num_trials=4 --dry-run
    python -m search.run --name my-search --resume         # continue a search that was interrupted

Order of work: parse -> load + validate config, space and data -> plan resources -> build tuner -> fit ->
summarize (summary.json, MLflow champion).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from search.config import ExperimentConfig, dump_config, load_config
from search.space import Space, describe, load_space
from trainables.settings import TINY_MODEL, SettingsError

log = logging.getLogger("search")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m search.run",
        description="Ray Tune + Optuna TPE + ASHA search over QLoRA SFT trials, tracked in MLflow.",
    )
    p.add_argument("--config", metavar="FILE", help="Experiment config YAML (default: built-in defaults, "
                   "equal to configs/sms_spam.yaml).")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="Override any config field by dotted path, e.g. --set trial.optim.max_steps=200 "
                   "--set num_trials=4. VALUE is parsed as YAML. Repeatable.")
    p.add_argument("--name", help="Search name: results go to <output_dir>/<name>/ (default: config's name).")
    p.add_argument("--resume", action="store_true", help="Continue the search <output_dir>/<name>/ that was "
                   "interrupted: finished trials are kept, unfinished ones restart from their last checkpoint.")
    p.add_argument("--dry-run", action="store_true", help="Validate config, space, data and resources; print the "
                   "resolved config, the space and the resource plan; exit without training.")
    p.add_argument("--verbose", action="store_true", help="Show library logs and per-step output from workers.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from search.progress import quiet_libraries

    quiet_libraries(args.verbose)
    try:
        cfg = load_config(args.config, args.set, args.name)
        space = load_space(_resolve(cfg.space), cfg.trial)
        plan = preflight(cfg, space, resume=args.resume)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("# resolved config\n" + dump_config(cfg))
        print(f"# search space ({space.source})\n" + "\n".join(describe(space)))
        print("\n# resource plan\n" + "\n".join(f"  {line}" for line in plan["lines"]))
        return 0
    from search.driver import run_search

    try:
        summary = run_search(cfg, space, plan, resume=args.resume, verbose=args.verbose)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; partial results are in " + str(cfg.search_dir()), file=sys.stderr)
        return 130
    if summary.get("interrupted"):
        return 130
    return 0 if summary.get("best") else 1


def _resolve(path: str) -> Path:
    from trainables.data import resolve_path

    return resolve_path(path)


def check_classification_data(cfg: ExperimentConfig, space: Space) -> None:
    """The data loads and splits, and every oversampling ratio the search may try is above the natural one."""
    from trainables.data import load_splits

    splits = load_splits(cfg.trial.data.model_copy(update={"oversample_minority": None}))
    natural = splits.counts["oversampling"]["before"]["fraction"]
    over = space.params.get("data.oversample_minority")
    lows = [v for v in (over.extremes() if over else []) if v is not None]
    if cfg.trial.data.oversample_minority is not None and not over:
        lows.append(cfg.trial.data.oversample_minority)
    for v in lows:
        if v < natural:
            where = f"{space.source}: params.data.oversample_minority" if over else "trial.data.oversample_minority"
            raise SettingsError(f"{where}: {v} is below the natural minority fraction {natural:.4f} of the training "
                                f"split; use values in ({natural:.4f}, 1)")


def preflight(cfg: ExperimentConfig, space: Space, resume: bool = False) -> dict:
    """Every check that can fail before Ray starts: data, model, oversampling range, output dir, MLflow, resources.

    Returns the resource plan. Raises SettingsError with one line on the first problem."""
    from trainables.model import check_model_source

    if cfg.trial.task == "style":
        from trainables.style import load_style_splits

        load_style_splits(cfg.trial.style)
    else:
        check_classification_data(cfg, space)
    if cfg.trial.model.name_or_path != TINY_MODEL:
        check_model_source(cfg.trial.model)
    from search.driver import load_trainable

    load_trainable(cfg.trainable)
    if cfg.trial.model.quantization == "4bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SettingsError("trial.model.quantization: 4bit needs bitsandbytes; pip install bitsandbytes, "
                                "or set trial.model.quantization=none") from None
    try:
        import aiohttp_cors  # noqa: F401  (part of ray[default]: the dashboard and state API)
    except ImportError:
        raise SettingsError("Ray's dashboard dependencies are missing; pip install 'ray[default,tune,train]' "
                            "(Ray Train needs the state API to free the resources of stopped trials)") from None
    from search import cluster

    cluster.check_storage_path(cfg)
    root = cluster.storage_root(cfg)  # trial results: <output_dir or storage_path>/<name>
    exists = cluster.search_exists(cfg)
    if resume and not exists:
        raise SettingsError(f"--resume: no search to resume at {root}; check --name, output_dir and storage_path")
    if not resume and exists:
        raise SettingsError(f"{root} already holds a search named {cfg.name!r}; use --resume to continue it "
                            f"or --name NEW to start another")
    _check_writable(Path(cfg.output_dir))
    if cfg.storage_path and not cluster.is_uri(cfg.storage_path):
        try:
            _check_writable(Path(cluster.storage_base(cfg)))
        except SettingsError as err:
            raise SettingsError(str(err).replace("output_dir", "storage_path", 2)) from None
    _check_tracking_uri(cfg.mlflow.tracking_uri)
    plan = plan_resources(cfg)
    if cfg.ray_address:  # a cluster: multi-node needs shared storage and a tracking server (search/cluster.py)
        seen = cluster.probe(cfg)
        plan["lines"].append(f"cluster: {seen['nodes']} node(s) alive with {seen['resources']}; trial results go to "
                             f"{root}")
    return plan


def _check_writable(path: Path) -> None:
    """Really write a file where the output would go (the nearest existing folder): permission bits alone do not
    tell (root, read-only mounts, a file where a folder should be)."""
    import tempfile

    p = path.expanduser().resolve()
    probe = p
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is a file")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        why = err.strerror or str(err)
        raise SettingsError(f"output_dir: {path} is not writable ({why}); set --set output_dir=DIR to a writable "
                            f"directory") from None


def _check_tracking_uri(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except Exception as err:
            raise SettingsError(f"mlflow.tracking_uri: {uri} does not answer ({err.__class__.__name__}); start the "
                                f"server or set --set mlflow.tracking_uri=sqlite:///mlflow.db") from None


def plan_resources(cfg: ExperimentConfig, cluster: dict | None = None) -> dict:
    """How many trials fit at once. The Tune trial itself holds no CPU; its Train workers hold the resources.

    Concurrency is capped to what fits, because a trial started without room for its workers waits forever."""
    r = cfg.resources
    per_trial = {"CPU": r.num_workers * r.cpus_per_worker}
    if r.gpus_per_worker:
        per_trial["GPU"] = r.num_workers * r.gpus_per_worker
    for k, v in r.custom_per_worker.items():
        per_trial[k] = r.num_workers * v
    if cluster is None:
        if cfg.ray_address:
            return {"per_trial": per_trial, "concurrency": cfg.max_concurrent_trials, "cluster": None,
                    "lines": [f"cluster at {cfg.ray_address}; checked when Ray connects",
                              f"per trial: {per_trial}"]}
        cluster = {"CPU": float(os.cpu_count() or 1)}
        try:
            import torch

            if torch.cuda.is_available():
                cluster["GPU"] = float(torch.cuda.device_count())
        except ImportError:
            pass
    fits = min((int(cluster.get(k, 0.0) // v) if v else 10**6) for k, v in per_trial.items())
    if fits < 1:
        have = ", ".join(f"{k}={cluster.get(k, 0):g}" for k in per_trial)
        hint = ("set resources.gpus_per_worker=0 (CPU)" if r.gpus_per_worker and not cluster.get("GPU")
                else f"lower resources.num_workers or cpus_per_worker to fit {have}")
        raise SettingsError(f"resources: one trial needs {per_trial} but the cluster has {have}; {hint}")
    concurrency = min(cfg.max_concurrent_trials, fits, cfg.num_trials)
    ev = cfg.trial_for_trials().eval
    lines = [f"cluster: {cluster}", f"per trial: {r.num_workers} worker(s) x {r.per_worker_str()} "
             "+ the trial's own process (no CPU: it only waits on its workers)",
             f"concurrent trials: {concurrency} (asked {cfg.max_concurrent_trials}, {fits} fit)",
             f"trials: {cfg.num_trials}, {cfg.trial.optim.max_steps} steps each, evaluated "
             + (f"at steps {', '.join(map(str, ev.steps(cfg.trial.optim.max_steps)))}" if ev.at_steps
                else f"every {ev.every_steps}")]
    return {"per_trial": per_trial, "concurrency": concurrency, "cluster": cluster, "lines": lines}


if __name__ == "__main__":
    sys.exit(main())
