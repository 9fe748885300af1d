"""The performance benchmark: the search against its plain alternatives, in one run (see bench/README.md).

    python -m bench.run                      # under 40 minutes on 2 CPUs; writes bench/results/<time>/
    python -m bench.run --only p1 --out /tmp/b

Every part runs the real path: `python -m search.run` in its own process (local Ray, a Ray Train run per trial, the tiny
Qwen3-architecture model in 4-bit + LoRA, the bundled SMS Spam data, MLflow in a sqlite store of the benchmark's own),
and the bare loop (`bench.bare`) in its own process.

  P1  trial overhead   a 1-trial search's trial wall time / the identical SFT loop run bare, and where it goes
  P2  search speed     TPE + ASHA vs random search without early stopping, same trials and concurrency, per seed:
                       time to reach within 1% of the best objective either found, and the ratio
  P3  early stopping   steps run / steps had every trial run to the end; was the best trial ever stopped early
  P4  data preparation what a trial spends getting its tokenized data / the one-time preparation
  P5  tracking         time in MLflow calls / search wall time

report.json holds every figure, report.md the tables and the plots (PNG) beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/sms_spam.yaml"
SPACE = "spaces/classification.yaml"  # `--p2-space cold`: this without its warm-start point (`cold_space`)
WIDE_SPACE = "bench/space-wide.yaml"  # P2's default: the space a user writes before knowing the model
STYLE_CONFIG = "configs/style_squad.yaml"  # `--p2-task style`: the style-control search ...
STYLE_SPACE = "bench/space-style-wide.yaml"  # ... on its wide space, as for classification
P2_TASKS = {"classification": (CONFIG, WIDE_SPACE), "style": (STYLE_CONFIG, STYLE_SPACE)}  # (config, default space)
TARGETS = {"p1": ("<=", 1.3), "p2": (">=", 3.0), "p3": ("<=", 0.35), "p4": ("<=", 0.05), "p5": ("<=", 0.01)}


def cpu_times() -> tuple[float, float] | None:
    """(steal, total) CPU jiffies since boot from /proc/stat (Linux), or None elsewhere."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0.0), sum(fields[:8])


def steal_since(start: tuple[float, float] | None) -> float | None:
    """The share of CPU time the hypervisor gave to other guests since `start` (top's "st"). A shared virtual
    machine can lose a third of its CPU this way, and unevenly over time: the benchmark reports it beside each
    timing, since it moves the figures more than anything measured here."""
    end = cpu_times()
    if start is None or end is None or end[1] <= start[1]:
        return None
    return round((end[0] - start[0]) / (end[1] - start[1]), 3)


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Running searches and the bare loop.


class Bench:
    def __init__(self, out: Path, args: argparse.Namespace):
        self.out = out
        self.args = args

    def sets(self, name: str, steps: int, every: int, eval_examples: int) -> list[str]:
        # every search its own sqlite store (out/mlflow/<name>.db, adapters in out/mlflow/mlruns): P2 runs two
        # searches at once, and two processes writing one sqlite file wait on each other's locks
        return ["--set", f"trial.optim.max_steps={steps}", "--set", f"trial.eval.every_steps={every}",
                "--set", f"trial.eval.max_examples={eval_examples}",
                "--set", f"output_dir={self.out / 'runs'}",
                "--set", f"mlflow.tracking_uri=sqlite:///{self.out / 'mlflow' / name}.db",
                "--set", f"model_cache={ROOT / '.cache'}"]

    @staticmethod
    def run(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[int, float, float, float | None]:
        """Run `cmd` from the repository root with its output in `log`: (exit code, start time, wall seconds, CPU
        steal meanwhile)."""
        return Bench.run_together([(cmd, log, env)])[0]

    @staticmethod
    def run_together(jobs: list[tuple[list[str], Path, dict[str, str]]]) -> list[tuple[int, float, float,
                                                                                       float | None]]:
        """Start every (command, log, env) at once from the repository root; for each, when it has ended: (exit
        code, start time, wall seconds, CPU steal meanwhile). Ctrl-C stops them all."""
        started = []
        try:
            for cmd, log, env in jobs:
                fh = open(log, "w")
                t, cpu = time.time(), cpu_times()
                started.append((subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                                 env={**os.environ, **env}), fh, t, cpu))
            done: dict[int, tuple[int, float, float, float | None]] = {}
            while len(done) < len(started):
                for i, (proc, _fh, t, cpu) in enumerate(started):
                    if i not in done and proc.poll() is not None:
                        done[i] = (proc.returncode, t, time.time() - t, steal_since(cpu))
                time.sleep(0.1)
            return [done[i] for i in range(len(started))]
        finally:
            for proc, fh, _t, _cpu in started:
                if proc.poll() is None:  # interrupted: a search takes SIGTERM as its graceful stop
                    proc.terminate()
                    proc.wait()
                fh.close()

    def search(self, name: str, extra: list[str], steps: int, every: int, env: dict[str, str] | None = None,
               eval_examples: int | None = None) -> dict[str, Any]:
        """Run `python -m search.run` in its own process; its summary.json plus the command's wall time."""
        return self.searches([(name, extra, env)], steps, every, eval_examples)[0]

    def searches(self, jobs: list[tuple[str, list[str], dict[str, str] | None]], steps: int, every: int,
                 eval_examples: int | None = None, config: str = CONFIG) -> list[dict[str, Any]]:
        """Run a `python -m search.run` for each (name, extra --set arguments, env), all at once, each in its own
        process (and its own local Ray, unless `extra` sets `ray_address`); each one's summary.json plus its
        command's wall time and CPU steal."""
        cmds = []
        for name, extra, env in jobs:
            cmd = [sys.executable, "-m", "search.run", "--config", config, "--name", name,
                   *self.sets(name, steps, every, eval_examples or self.args.eval_examples),
                   "--set", "test_evaluation=false", *extra]
            log = self.out / "logs" / f"{name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            (self.out / "mlflow").mkdir(parents=True, exist_ok=True)
            cmds.append((cmd, log, env or {}))
        out = []
        for (name, _extra, _env), (_cmd, log, _e), (rc, t, wall, steal) in zip(jobs, cmds, self.run_together(cmds)):
            summary_path = self.out / "runs" / name / "summary.json"
            if rc != 0 or not summary_path.is_file():
                raise RuntimeError(f"search {name} failed (exit {rc}); see {log}")
            summary = json.loads(summary_path.read_text())
            summary["command_seconds"] = round(wall, 2)
            summary["cpu_steal"] = steal
            summary["started_at"] = t
            out.append(summary)
        return out

    def bare(self, settings: dict[str, Any], name: str) -> dict[str, Any]:
        path = self.out / "logs" / f"{name}.settings.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
        result = self.out / "logs" / f"{name}.json"
        rc, _t, wall, steal = self.run([sys.executable, "-m", "bench.bare", str(path), str(result)],
                                       self.out / "logs" / f"{name}.log",
                                       {"TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"})
        if rc != 0:
            raise RuntimeError(f"bare loop failed (exit {rc}); see {self.out / 'logs' / (name + '.log')}")
        out = json.loads(result.read_text())
        out["wall_seconds"] = round(wall, 2)
        out["cpu_steal"] = steal
        return out


def trial_settings(steps: int, every: int, eval_examples: int, config: str = CONFIG) -> dict[str, Any]:
    """The settings of the search's first trial (the space's warm-start point) with the tiny model resolved."""
    from search.config import load_config
    from search.driver import resolve_model
    from search.space import load_space
    from trainables.data import resolve_path

    cfg = load_config(config, [f"trial.optim.max_steps={steps}", f"trial.eval.every_steps={every}",
                               f"trial.eval.max_examples={eval_examples}", f"model_cache={ROOT / '.cache'}"])
    cfg = resolve_model(cfg)
    point = load_space(resolve_path(cfg.space)).points_to_evaluate[0]
    return cfg.trial.with_values(point).model_dump()


# ---------------------------------------------------------------------------------------------------------------
# P1: trial overhead.


# What P1's "before" undoes: Ray Train's default 2 s controller poll (a finished trial waited up to 2 s, and its
# worker group's shutdown more, before Tune saw it end), the preprocessing cache (every trial tokenized its data) and
# the single-worker trainer (TorchTrainer: the controller imports torch, the worker sets up a 1-rank process group)
# and warm hosts (each trial's new Train worker imported the training stack itself).
BEFORE = {"env": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0"},
          "sets": ["--set", "trial.cache_dir=''", "--set", "resources.torch_process_group=always",
                   "--set", "resources.warm_workers=false"]}


def calibrate_p1(b: Bench, seconds: float, probe_steps: int = 16) -> int:
    """Steps for a bare loop of about `seconds` on this machine, from a short bare run of the same trial settings with
    two evaluations. The CPUs this benchmark meets differ several times over in speed (bench/README.md).

    The rate is taken between the two evaluations: the first steps are slower (warm-up), and a rate over the whole
    short run overestimated a step by 1.9x on a 2-core AMX machine (a loop planned for 120 s lasted 71 s)."""
    probe = b.bare(trial_settings(probe_steps, probe_steps // 2, b.args.eval_examples), "p1-calibration")
    steps, per_step, per_eval = steps_for(probe, seconds, probe_steps)
    _say(f"P1: calibration: {per_step:.2f} s per step, {per_eval:.1f} s per evaluation, a {probe_steps}-step loop "
         f"{probe['wall_seconds']:.1f} s -> {steps} steps for a bare loop of about {seconds:.0f} s")
    return steps


def steps_for(probe: dict[str, Any], seconds: float, probe_steps: int) -> tuple[int, float, float]:
    """(steps, seconds per step, seconds per evaluation) for a 3-evaluation bare loop of about `seconds`, from a
    `probe_steps` bare run evaluated at its half and its end (`curve`: elapsed seconds at each report)."""
    half = probe_steps // 2
    at = {c["step"]: c["elapsed_seconds"] for c in probe["curve"]}
    per_eval = probe["eval_seconds_total"] / 2
    per_step = (at[probe_steps] - at[half] - per_eval) / half
    # P1 evaluates 3 times, the probe twice: one evaluation more, and the steps beyond the probe's at the steady rate
    steps = probe_steps + (seconds - probe["wall_seconds"] - per_eval) / per_step
    return max(30, 3 * round(steps / 3)), per_step, per_eval


def p1(b: Bench) -> dict[str, Any]:
    steps = b.args.p1_steps or calibrate_p1(b, b.args.p1_seconds)
    every = steps // 3
    _say(f"P1: bare loop, {steps} steps")
    bare = b.bare(trial_settings(steps, every, b.args.eval_examples), "p1-bare")
    bare_breakdown = {
        "python start": bare["started_at"] - (bare["ended_at"] - bare["wall_seconds"]),
        "imports": bare["imports_seconds"], "data preparation": bare["data_seconds"],
        "model load + 4-bit": bare["model_load_seconds"], "evaluation": bare["eval_seconds_total"],
        "training": bare["elapsed_seconds"] - bare["data_seconds"] - bare["model_load_seconds"]
        - bare["eval_seconds_total"],
    }
    bare_breakdown["exit"] = bare["wall_seconds"] - sum(bare_breakdown.values())
    out = {"steps": steps, "bare_seconds": bare["wall_seconds"], "bare_objective": bare["objective"].get("val_f1"),
           "bare_cpu_steal": bare["cpu_steal"],
           "bare_breakdown": {k: round(v, 2) for k, v in bare_breakdown.items()},
           "bare_fixed_seconds": round(bare["wall_seconds"] - sum(bare_breakdown[k] for k in WORK), 2)}
    _say(f"P1: bare loop took {bare['wall_seconds']:.1f} s; now the same trial through search.run")
    # the one trial gets the machine's CPUs, as the bare loop does (a trial's worker runs torch on as many threads
    # as it has CPUs): the ratio then measures the search path, not a smaller share of the machine
    extra = ["--set", "searcher.algorithm=random", "--set", "max_concurrent_trials=1",
             "--set", f"resources.cpus_per_worker={os.cpu_count()}"]
    # "before": one trial as trials ran before the per-trial cuts. "after": two trials of the same point one after
    # the other; the first starts this node's warm host (trainables/warm.py), the second finds it warm, as every
    # later trial of a search does. P1's ratio is the second's; the first's is reported beside it.
    runs = [("before", "p1-search-before", BEFORE["env"], BEFORE["sets"] + ["--set", "num_trials=1"])] \
        if b.args.p1_before else []
    runs.append(("after", "p1-search", None, ["--set", "num_trials=2", "--set", f"space={p1_space(b.out)}"]
                 + [a for kv in b.args.p1_set or [] for a in ("--set", kv)]))
    for key, name, env, sets in runs:
        s = b.search(name, extra + sets, steps, every, env=env)
        trials = sorted(s["trials"], key=lambda t: (t.get("timing") or {}).get("started_at", 0.0))
        for k, t in zip(("first", "after") if len(trials) == 2 else (key,), trials):
            timing = t.get("timing") or {}
            trial_wall = timing["ended_at"] - timing["started_at"]
            breakdown = trial_breakdown(timing, trial_wall)
            out[k] = {
                "trial_seconds": round(trial_wall, 2),
                "fixed_seconds": round(trial_wall - sum(breakdown[w] for w in WORK), 2),
                "search_command_seconds": s["command_seconds"], "search_wall_seconds": s["wall_seconds"],
                "search_trials": len(trials), "ray_start_seconds": s.get("ray_start_seconds"), "objective": t["value"],
                "trial_breakdown": {w: round(v, 2) for w, v in breakdown.items()},
                "data": {w: timing.get(w, 0.0) for w in ("data_seconds", "tokenize_seconds")},
                "cpu_steal": s.get("cpu_steal"),
            }
            _say(f"P1 {k}: trial {trial_wall:.1f} s")
    # The bare loop once more: on a shared virtual machine the CPU the hypervisor gives can change by half within
    # minutes (cpu_steal), and a ratio of two runs far apart in time would measure that. The ratios use the mean.
    again = b.bare(trial_settings(steps, every, b.args.eval_examples), "p1-bare-again")
    out["bare_again_seconds"], out["bare_again_cpu_steal"] = again["wall_seconds"], again["cpu_steal"]
    out["bare_seconds_mean"] = round((bare["wall_seconds"] + again["wall_seconds"]) / 2, 2)
    for key in [k for k in P1_RUNS if k in out]:
        out[key]["ratio"] = round(out[key]["trial_seconds"] / out["bare_seconds_mean"], 3)
        out[key]["ratio_whole_command"] = round(out[key]["search_command_seconds"] / out["bare_seconds_mean"]
                                                / out[key].get("search_trials", 1), 3)
    _say(f"P1: bare loop again {again['wall_seconds']:.1f} s; ratio "
         + ", ".join(f"{k} {out[k]['ratio']}" for k in P1_RUNS if k in out) + " (to the mean bare loop)")
    out["ratio"] = out["after"]["ratio"]
    return out


WORK = ("data preparation", "model load + 4-bit", "evaluation", "training")  # the loop itself; the rest is fixed
P1_RUNS = ("before", "first", "after")  # P1's search trials, as the report names them


def p1_space(out: Path) -> Path:
    """The default space with its warm-start point twice: P1's two trials run the point the bare loop runs."""
    return space_variant(out, "space-p1.yaml", "with its first point twice",
                         lambda points: points[:1] * 2)


def space_variant(out: Path, name: str, what: str, points) -> Path:
    """The default space with its points_to_evaluate replaced by `points(old points)` (dropped if None), written
    into the report directory as `name`."""
    import yaml

    space = yaml.safe_load((ROOT / SPACE).read_text())
    new = points(space.pop("points_to_evaluate", []))
    if new is not None:
        space["points_to_evaluate"] = new
    path = out / name
    path.write_text(f"# {SPACE} {what} (bench/run.py)\n" + yaml.safe_dump(space, sort_keys=False))
    return path


def trial_breakdown(timing: dict[str, float], trial_wall: float) -> dict[str, float]:
    """A trial's wall time (Tune start to end) split into the phases its worker and the driver timed."""
    data, model = timing["data_seconds"], timing["model_load_seconds"]
    ev, ck = timing["eval_seconds_total"], timing["checkpoint_seconds_total"]
    training = timing["elapsed_seconds"] - data - model - ev - ck
    out = {"trial process start": timing["trial_entered_at"] - timing["started_at"],
           "trainer setup": timing["fit_at"] - timing["trial_entered_at"],
           "worker group start": timing["worker_started_at"] - timing["fit_at"],
           "imports": timing["imports_seconds"],
           # handing the loop to this node's warm host (trainables/warm.py); its imports, if it was new, are above
           "warm host": timing.get("warm_host_seconds", 0.0) - timing.get("warm_host_imports_seconds", 0.0),
           "data preparation": data,
           "model load + 4-bit": model, "evaluation": ev, "checkpointing": ck, "training": training}
    out["shutdown + result"] = trial_wall - sum(out.values())
    out["mlflow (driver, in parallel)"] = timing.get("mlflow_seconds", 0.0)
    return out


# ---------------------------------------------------------------------------------------------------------------
# P2, P3, P5: the two strategies over seeds.


def best_so_far_curve(histories: dict[str, list[dict]], origin: float, mode: str) -> list[tuple[float, float]]:
    """(seconds since `origin`, best so far) after every evaluation, judging each trial by its best evaluation so
    far (as the search picks its best adapter: each trial's best checkpoint)."""
    events = sorted((r["timestamp"], tid, r["value"]) for tid, rows in histories.items() for r in rows
                    if r["value"] is not None)
    pick = max if mode == "max" else min
    curve, best = [], None
    for ts, _tid, value in events:
        best = value if best is None else pick(best, value)
        curve.append((ts - origin, best))
    return curve


def reaches(value: float, target: float, mode: str) -> bool:
    """Whether `value` is at `target` or beyond it, in the objective's direction."""
    return value >= target if mode == "max" else value <= target


def time_to_reach(curve: list[tuple[float, float]], target: float, mode: str) -> float | None:
    return next((t for t, v in curve if reaches(v, target, mode)), None)


def within(best: float, mode: str, tol: float = 0.01) -> float:
    """The value within `tol` (relative) of `best`."""
    return best - tol * abs(best) if mode == "max" else best + tol * abs(best)


def compare(runs: dict[str, dict[str, Any]], mode: str) -> dict[str, Any]:
    """One seed: each strategy's time to within 1% of the best final objective either strategy found."""
    best = [r["best_value"] for r in runs.values() if r["best_value"] is not None]
    ref = (max if mode == "max" else min)(best)
    target = within(ref, mode)
    out = {"reference_best": ref, "target": target}
    unreadable = [r["curve_error"] for r in runs.values() if r.get("curve_error")]
    if unreadable:  # no time to compare: left out of the median (median_ratio skips a ratio of None)
        return {**out, **{key: None for key in runs}, "ratio": None, "bound": None, "excluded": unreadable[0]}
    for key, r in runs.items():
        t = time_to_reach(r["curve"], target, mode)
        out[key] = {"seconds": t if t is not None else r["wall_seconds"], "reached": t is not None}
    a, b = out["random_fifo"]["seconds"], out["tpe_asha"]["seconds"]
    out["ratio"] = round(a / b, 3) if b else None
    # A strategy that never got within 1% took longer than its whole run, which is what it is charged: the ratio is
    # then a bound, not a value. Random never there: the true ratio is above it; TPE+ASHA never there: below.
    out["bound"] = ratio_bound(out)
    out["best_config_stopped"] = best_config_stopped(runs, target, mode)
    return out


def trial_outcomes(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What `best_config_stopped` needs of a search's trials (from its summary.json)."""
    return [{"params": t.get("params"), "value": t.get("value"), "steps": t.get("steps"),
             "stopped_early": bool(t.get("stopped_early"))} for t in trials]


def best_config_stopped(runs: dict[str, dict[str, Any]], target: float, mode: str) -> list[dict[str, Any]]:
    """Configurations TPE + ASHA stopped early that random search ran to the end to within 1% of the seed's best.

    The two searches of a seed draw the same first configurations (Optuna's start-up trials and random search share
    the seed), so for those the question "was the eventual best configuration stopped early?" has a direct answer,
    not only the TPE + ASHA search's own best trial's (`best_stopped_early`)."""
    full = [u for u in (runs.get("random_fifo") or {}).get("trials") or [] if u["value"] is not None]
    found = []
    for t in (runs.get("tpe_asha") or {}).get("trials") or []:
        if not t["stopped_early"]:
            continue
        match = next((u for u in full if u["params"] == t["params"] and reaches(u["value"], target, mode)), None)
        if match:
            found.append({"params": t["params"], "stopped_at_step": t["steps"], "value_when_stopped": t["value"],
                          "value_run_to_the_end": match["value"]})
    return found


def best_config_stopped_seeds(seeds: list[dict[str, Any]]) -> list[int]:
    """The seeds in which `best_config_stopped` found one (P3's summary of the per-seed check)."""
    return [c["seed"] for c in seeds if c.get("best_config_stopped")]


def ratio_bound(c: dict[str, Any]) -> str | None:
    reached = (c["random_fifo"]["reached"], c["tpe_asha"]["reached"])
    return {(True, True): None, (False, True): "lower", (True, False): "upper"}.get(reached, "neither")


def median_ratio(seeds: list[dict[str, Any]]) -> tuple[float | None, str | None]:
    """The median P2 ratio over seeds and whether it is a bound ("lower", "upper") or a value (None).

    A seed whose ratio is a bound is ordered beyond every value on its side (a search that never got there counts as
    infinitely slow), so it moves the median only as far as that side allows. If the median lands on bounds of one
    side, it is that kind of bound; on bounds of both sides, it is unknown (None, "unknown")."""
    keyed = []
    for c in seeds:
        if c.get("ratio") is None or c.get("bound") == "neither":
            continue
        side = c.get("bound")
        keyed.append((math.inf if side == "lower" else -math.inf if side == "upper" else c["ratio"], c["ratio"], side))
    if not keyed:
        return None, None
    keyed.sort(key=lambda k: (k[0], k[1]))  # bounds of one side: the least extreme nearest the middle
    mid = len(keyed) // 2
    picks = keyed[mid:mid + 1] if len(keyed) % 2 else keyed[mid - 1:mid + 1]
    sides = {side for _, _, side in picks if side}
    if len(sides) > 1:
        return None, "unknown"
    return round(statistics.mean(v for _, v, _ in picks), 3), (sides.pop() if sides else None)


def cold_space(out: Path) -> Path:
    """The default space without its warm-start point (points_to_evaluate), written into the report directory."""
    return space_variant(out, "space-cold.yaml", "without points_to_evaluate", lambda points: None)


def trial_split(t: dict[str, Any]) -> tuple[float | None, float | None]:
    """A search trial's (fixed seconds, work seconds): work is the loop itself (data, model load, evaluation,
    training), fixed everything else from Tune starting the trial to Tune seeing it end."""
    timing = t.get("timing") or {}
    try:
        wall = timing["ended_at"] - timing["started_at"]
        phases = trial_breakdown(timing, wall)
    except KeyError:
        return None, None
    work = sum(phases[k] for k in WORK)
    return wall - work, work


def ceiling(fixed: float, work: float, fraction: float) -> float:
    """The P2 ratio if both strategies found the best in their last trial: random runs every trial in full
    (fixed + work), TPE+ASHA pays the fixed cost of every trial and `fraction` of the work (P3)."""
    return (fixed + work) / (fixed + fraction * work)


def p2_cpus(machine_cpus: int | None, concurrency: int, together: bool) -> int:
    """CPUs per P2 trial: the machine's, shared by the trials that run at once (`concurrency` per search, and both
    searches of a seed when they run `together`)."""
    return max(1, (machine_cpus or 1) // (concurrency * (2 if together else 1)))


def p2_task(settings: dict[str, Any]) -> tuple[str, str]:
    """(config, default space) of P2's task (reports from before `--p2-task` were all classification)."""
    return P2_TASKS[settings.get("p2_task") or "classification"]


def p2_config(settings: dict[str, Any]) -> str:
    """The search config P2's searches start from: the classification search's, or with `--p2-task style` the
    style-control search's."""
    return p2_task(settings)[0]


def p2_objective(settings: dict[str, Any]) -> tuple[str, str]:
    """(metric, mode) of P2's searches: what their config optimizes."""
    from search.config import load_config

    objective = load_config(p2_config(settings), []).objective
    return objective.metric, objective.mode


def p2_space_name(settings: dict[str, Any]) -> str:
    """`--p2-space` as given, else the wide space of P2's task."""
    return settings.get("p2_space") or p2_task(settings)[1]


def p2_space(b: Bench) -> Path:
    name = p2_space_name(vars(b.args))
    return cold_space(b.out) if name == "cold" else (ROOT / name).resolve()


STRATEGIES = (("tpe_asha", True), ("random_fifo", False))
TIE_BREAK_WORDS = {"eval_loss": "eval loss", "val_ap": "the minority label's average precision (`val_ap`)"}


def tie_break(settings: dict[str, Any]) -> str:
    """What ordered TPE + ASHA's tied trials in a run with these settings (eval loss in runs from before it could
    be chosen)."""
    return settings.get("scheduler_tie_break") or settings.get("tie_break") or "eval_loss"


def strategy_sets(b: Bench, seed: int, tpe_asha: bool) -> list[str]:
    """The `--set` arguments of one P2 search: the same budget, concurrency and CPUs for both strategies."""
    cpus = p2_cpus(os.cpu_count(), b.args.p2_concurrency, not b.args.p2_apart)
    extra = ["--set", f"num_trials={b.args.p2_trials}", "--set", f"max_concurrent_trials={b.args.p2_concurrency}",
             "--set", f"resources.cpus_per_worker={cpus}",
             "--set", f"searcher.seed={seed}", "--set", f"space={p2_space(b)}",
             "--set", f"searcher.algorithm={'tpe' if tpe_asha else 'random'}",
             "--set", f"scheduler.type={'asha' if tpe_asha else 'none'}"]
    if batch := getattr(b.args, "p2_batch_size", None):  # reports from before --p2-batch-size lack it
        extra += ["--set", f"trial.optim.batch_size={batch}"]
    if tpe_asha:
        extra += ["--set", f"scheduler.reduction_factor={b.args.reduction_factor}"]
        if key := getattr(b.args, "tie_break", None):  # the settings of reports from before --tie-break lack it
            extra += ["--set", f"scheduler.tie_break={key}", "--set", f"searcher.tie_break={key}"]
        if b.args.p2_startup_trials:
            extra += ["--set", f"searcher.n_startup_trials={b.args.p2_startup_trials}"]
    if vars(b.args).get("p2_task") == "style":  # the style task evaluates on its own held-out questions (trial.style)
        extra += ["--set", f"trial.style.eval_questions={b.args.p2_eval_examples}"]
    if b.args.p2_eval_at_rungs:  # both evaluate at the rungs TPE + ASHA's trials evaluate at (scheduler.eval_at_rungs)
        extra += ["--set", f"trial.eval.at_steps={p2_rungs(b.args)}"]
    return extra + [a for kv in getattr(b.args, "p2_set", None) or [] for a in ("--set", kv)]


def p2_batch(settings: dict[str, Any]) -> int:
    """The batch size of a run's P2 trials: `--p2-batch-size`, else a `--p2-set` of it, else the search's default."""
    from trainables.settings import OptimSettings

    sets = dict(kv.split("=", 1) for kv in settings.get("p2_set") or [])
    return int(settings.get("p2_batch_size") or sets.get("trial.optim.batch_size")
               or OptimSettings.model_fields["batch_size"].default)


def p2_rungs(args: argparse.Namespace) -> list[int]:
    """ASHA's rungs in P2's TPE + ASHA searches (search.config.ExperimentConfig.asha_rungs)."""
    from search.config import load_config

    return load_config(p2_config(vars(args)), [f"trial.optim.max_steps={args.p2_steps}",
                                f"trial.eval.every_steps={args.p2_steps // args.p2_evals}",
                                f"scheduler.reduction_factor={args.reduction_factor}"]).asha_rungs()


class SharedRay:
    """A local Ray cluster on this machine for P2's searches to share (`ray_address`): the searches that run side by
    side then share one raylet, dashboard and worker pool, as they would on a cluster, instead of each starting its
    own local Ray (a trial took 66-78 s with a Ray each against 50-57 s with one shared, bench/README.md). Started
    in this process with `ray.init`; `close` stops it."""

    def __init__(self, cpus: int):
        import ray

        from search.driver import start_local_ray
        from search.progress import hide_token_auth_notice

        hide_token_auth_notice()
        # the searches started from this process inherit the dashboard's address it sets (RAY_API_SERVER_ADDRESS)
        start_local_ray(cpus, log_to_driver=False, logging_level="WARNING", configure_logging=False)
        self.address = ray.get_runtime_context().gcs_address

    def close(self) -> None:
        import ray

        ray.shutdown()
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)


def seed_runs(b: Bench, seed: int) -> dict[str, dict[str, Any]]:
    """Both strategies' searches of one seed: side by side by default (started together, each on its share of the
    CPUs, so the CPU the hypervisor hands out meanwhile is the same for both), or one after the other (`--p2-apart`)."""
    steps, every = b.args.p2_steps, b.args.p2_steps // b.args.p2_evals
    jobs = {key: (f"p2-{key}-seed{seed}", strategy_sets(b, seed, tpe_asha), None) for key, tpe_asha in STRATEGIES}
    what = f"{b.args.p2_trials} trials of {steps} steps"
    if b.args.p2_apart:
        summaries = {}
        for key, job in jobs.items():
            _say(f"P2: seed {seed}, {key.replace('_', ' + ')}: {what}")
            summaries[key] = b.searches([job], steps, every, b.args.p2_eval_examples, p2_config(vars(b.args)))[0]
    else:
        _say(f"P2: seed {seed}, TPE + ASHA and random search side by side: {what} each")
        ray = SharedRay(os.cpu_count() or 1)
        try:
            jobs = {k: (name, extra + ["--set", f"ray_address={ray.address}"], env)
                    for k, (name, extra, env) in jobs.items()}
            summaries = dict(zip(jobs, b.searches(list(jobs.values()), steps, every, b.args.p2_eval_examples,
                                                  p2_config(vars(b.args)))))
        finally:
            ray.close()
    pair = {key: strategy_result(b, jobs[key][0], seed, s) for key, s in summaries.items()}
    for key, r in pair.items():
        _say(f"P2: {key} seed {seed}: best {r['best_value']} in {r['wall_seconds']:.0f} s, "
             f"{r['stopped_early']} stopped early")
    return pair


def strategy_result(b: Bench, name: str, seed: int, s: dict[str, Any]) -> dict[str, Any]:
    """One P2 search's figures from its summary and its trials' results."""
    from search.report import trial_histories

    steps = b.args.p2_steps
    mode = s["objective"]["mode"]
    hist = trial_histories(b.out / "runs" / name, s["objective"]["metric"])
    trials = s["trials"]
    # The curve must be this search's own: in one 2026-12-04 run (seed 1 of six) the random search's curve came out
    # as the TPE + ASHA search's, event for event, though its summary and its workers' reports were its own (two
    # searches named their Tune experiments alike and shared Ray's staging directory; fixed in search/cluster.py,
    # `tune_name`). A curve whose trials are not the summary's is left out, and the seed with it.
    curve_error = mismatched_trials(hist, trials)
    if curve_error:
        _say(f"P2: {name}: {curve_error}; its seed is left out of the ratio")
    curve = [] if curve_error else best_so_far_curve(hist, s["started_at"], mode)
    split = [(t, trial_split(t)) for t in trials]
    best = s.get("best") or {}
    return {
        "name": name, "seed": seed, "wall_seconds": s["command_seconds"], "best_value": best.get("value"),
        "best_trial": best.get("trial_id"), "best_stopped_early": best_stopped_early(trials, best.get("trial_id")),
        "curve": [(round(t, 2), v) for t, v in curve], "curve_error": curve_error,
        "steps_run": sum(t["steps"] for t in trials), "steps_full": len(trials) * steps,
        "stopped_early": sum(bool(t["stopped_early"]) for t in trials), "failed": sum(t["status"] == "ERROR"
                                                                                     for t in trials),
        "mlflow_seconds": s["mlflow_seconds"], "search_wall_seconds": s["wall_seconds"],
        "cpu_steal": s.get("cpu_steal"),
        "fixed_seconds": [f for _, (f, _w) in split if f is not None],
        "work_seconds_full": [w for t, (_f, w) in split if w is not None and t["steps"] >= steps],
        "data": [{k: t["timing"][k] for k in ("data_seconds", "tokenize_seconds")} for t in trials
                 if {"data_seconds", "tokenize_seconds"} <= (t.get("timing") or {}).keys()],
        "trials": trial_outcomes(trials),
    }


def mismatched_trials(histories: dict[str, list[dict]], trials: list[dict[str, Any]]) -> str | None:
    """None when Tune's experiment directory holds exactly the search summary's trials; else what differs."""
    read, listed = set(histories), {t["trial_id"] for t in trials}
    if read == listed:
        return None
    return (f"Tune's experiment directory gave the curves of trials {sorted(read)}, the search's summary lists "
            f"{sorted(listed)}")


def best_stopped_early(trials: list[dict[str, Any]], best_id: str | None) -> bool | None:
    """Whether the search's best trial was stopped early; None when there is no best to speak of: every trial
    ended with the same value (e.g. all F1 0.0), and the "best" is whichever Tune listed first."""
    values = {t.get("value") for t in trials if t.get("value") is not None}
    best = next((t for t in trials if t["trial_id"] == best_id), None)
    if best is None or len(values) < 2:
        return None
    return bool(best["stopped_early"])


def p2_replay(b: Bench, cost: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Random search + ASHA on the random searches' recorded curves, at larger budgets too (bench/replay.py). An
    analysis of what P2 measured: if it fails, the report is written without it."""
    from bench.replay import replay_for

    try:
        return replay_for(b.out, vars(b.args), cost, [r["name"] for r in runs
                                                      if "random_fifo" in r["name"] and not r.get("curve_error")])
    except Exception as err:
        _say(f"P2: replay left out ({type(err).__name__}: {err}); `python -m bench.replay {b.out}` retries it")
        return None


def p2(b: Bench) -> dict[str, Any]:
    from search.config import load_config
    from search.driver import resolve_model

    # The built-in model, once, before any search: on a new checkout (`--only p2`) both searches of seed 0 would
    # otherwise build it at once, inside the wall time their time-to-best counts from (2026-12-04: 381 s each).
    cfg = load_config(p2_config(vars(b.args)), [f"model_cache={ROOT / '.cache'}"])
    resolve_model(cfg)
    metric, mode = cfg.objective.metric, cfg.objective.mode
    seeds = list(range(b.args.p2_first_seed, b.args.p2_first_seed + b.args.p2_seeds))
    per_seed, runs = [], []
    for seed in seeds:
        pair = seed_runs(b, seed)
        c = compare(pair, mode)
        c["seed"] = seed
        per_seed.append(c)
        runs.extend(pair.values())
    median, bound = median_ratio(per_seed)
    asha = [r for r in runs if r["name"].startswith("p2-tpe_asha")]
    fraction = sum(r["steps_run"] for r in asha) / sum(r["steps_full"] for r in asha)
    fixed = [f for r in runs for f in r["fixed_seconds"]]
    work = [w for r in runs if not r["name"].startswith("p2-tpe_asha") for w in r["work_seconds_full"]]
    cost = {"fixed_seconds_median": round(statistics.median(fixed), 2) if fixed else None,
            "work_seconds_full_median": round(statistics.median(work), 2) if work else None}
    if fixed and work:
        cost["ceiling"] = round(ceiling(cost["fixed_seconds_median"], cost["work_seconds_full_median"], fraction), 3)
        cost["ceiling_without_fixed"] = round(1 / fraction, 3)
    return {
        "objective": {"metric": metric, "mode": mode}, "trial_cost": cost,
        "replay": p2_replay(b, cost, runs) if fixed and work else None,
        "seeds": per_seed, "runs": runs, "ratio_median": median, "ratio_median_bound": bound,
        "p3": {"steps_fraction": round(fraction, 3),
               "per_seed": [round(r["steps_run"] / r["steps_full"], 3) for r in asha],
               "best_ever_stopped_early": any(r["best_stopped_early"] for r in asha),
               "best_config_stopped_seeds": best_config_stopped_seeds(per_seed),
               "best_undecided_seeds": [r["seed"] for r in asha if r["best_stopped_early"] is None]},
        "p5": {"mlflow_seconds": round(sum(r["mlflow_seconds"] for r in runs), 2),
               "wall_seconds": round(sum(r["search_wall_seconds"] for r in runs), 1)},
        "data_per_trial": [x for r in runs for x in r["data"]],
    }


# ---------------------------------------------------------------------------------------------------------------
# P4: data preparation, one-time vs per trial.


def p4(b: Bench, trials: list[dict[str, float]], config: str = CONFIG) -> dict[str, Any]:
    """The one-time preparation (read, split, tokenize; measured here, without the cache) against what each trial
    spent on its data: tokenizing (`tokenize_seconds`) and in all (`data_seconds`, reading the cache included)."""
    from trainables.model import load_tokenizer
    from trainables.settings import TrialSettings
    from trainables.tasks import build_task

    every = b.args.p2_steps // b.args.p2_evals
    s = TrialSettings.model_validate(trial_settings(b.args.p2_steps, every, b.args.p2_eval_examples, config))
    tok = load_tokenizer(s.model)
    t = time.time()
    task = build_task(s, tok, cache=False)
    once = time.time() - t
    tok_once = task.stats["encoding"]["tokenize_seconds"]
    tok_med = statistics.median(t["tokenize_seconds"] for t in trials) if trials else None
    data_med = statistics.median(t["data_seconds"] for t in trials) if trials else None
    return {"one_time_seconds": round(once, 3), "one_time_tokenize_seconds": tok_once, "trials": len(trials),
            "per_trial_tokenize_seconds_median": tok_med, "per_trial_data_seconds_median": data_med,
            "ratio": round(tok_med / tok_once, 4) if tok_med is not None else None,
            "ratio_all_data": round(data_med / once, 4) if data_med is not None else None}


# ---------------------------------------------------------------------------------------------------------------
# The report.


def p2_metric(report: dict[str, Any]) -> str:
    """The objective P2's searches optimized (val_f1 in reports from before `--p2-task`)."""
    return (report.get("p2", {}).get("objective") or {}).get("metric", "val_f1")


def verdict(key: str, value: float | None) -> str:
    if value is None:
        return "not measured"
    op, goal = TARGETS[key]
    ok = value <= goal if op == "<=" else value >= goal
    return f"{'met' if ok else 'NOT met'} (target {op} {goal:g})"


def plots(out: Path, report: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if "p2" in report:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for r in report["p2"]["runs"]:
            xs = [0.0] + [t for t, _ in r["curve"]] + [r["wall_seconds"]]
            ys = [None] + [v for _, v in r["curve"]] + [r["curve"][-1][1] if r["curve"] else None]
            style = "-" if r["name"].startswith("p2-tpe") else "--"
            color = f"C{r['seed']}"
            ax.step(xs, ys, style, where="post", color=color,
                    label=f"{'TPE+ASHA' if style == '-' else 'random, no ES'} seed {r['seed']}")
        ax.set_xlabel("wall time since the search command started (s)")
        ax.set_ylabel(f"best {p2_metric(report)} so far (best evaluation per trial)")
        ax.set_title("P2: best so far vs wall time (solid: TPE + ASHA, dashed: random without early stopping)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "p2_best_so_far.png", dpi=110)
        plt.close(fig)
        made.append("p2_best_so_far.png")
    if "p1" in report:
        fig, ax = plt.subplots(figsize=(8, 3.8))
        p = report["p1"]
        bars = [("bare loop", p["bare_breakdown"])] + [(f"trial, {k}", p[k]["trial_breakdown"])
                                                       for k in P1_RUNS if k in p]
        colors: dict[str, Any] = {}
        for row, (label, parts) in enumerate(bars):
            left = 0.0
            for i, (k, v) in enumerate(parts.items()):
                if k.startswith("mlflow"):
                    continue
                new = k not in colors
                colors.setdefault(k, plt.get_cmap("tab20")(len(colors) % 20))
                ax.barh(row, v, left=left, color=colors[k], label=k if new else None, edgecolor="white")
                left += v
        ax.set_yticks(range(len(bars)), [label for label, _ in bars])
        ax.set_xlabel("seconds")
        ax.set_title(f"P1: one trial, {p['steps']} steps (ratio "
                     + ", ".join(f"{k} {p[k]['ratio']}" for k in P1_RUNS if k in p) + ")")
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
        fig.tight_layout()
        fig.savefig(out / "p1_breakdown.png", dpi=110)
        plt.close(fig)
        made.append("p1_breakdown.png")
    return made


def fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def seed_list(numbers: list[int]) -> str:
    return f"seed{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}"


def p3_verdict(p3: dict[str, Any]) -> str:
    """P3's target is the fraction with the best configuration never stopped early: both, in one verdict. Stopped
    early counts either way it is seen: TPE + ASHA's own best trial, or a configuration it stopped that random search
    ran to within 1% of the best (`best_config_stopped`; reports from before it lack the key)."""
    fraction, stopped = p3["steps_fraction"], p3.get("best_config_stopped_seeds") or []
    ok = fraction <= TARGETS["p3"][1] and not p3["best_ever_stopped_early"] and not stopped
    return (f"{'met' if ok else 'NOT met'} (target <= {TARGETS['p3'][1]:g}, the best never stopped early); "
            f"TPE+ASHA's best trial stopped early: {'yes' if p3['best_ever_stopped_early'] else 'no'}"
            + (f" (seeds {p3['best_undecided_seeds']}: every trial scored the same, no best)"
               if p3.get("best_undecided_seeds") else "")
            + ("" if "best_config_stopped_seeds" not in p3 else
               "; a configuration it stopped early reached within 1% of the best when random search ran it to the "
               f"end: {seed_list(stopped) + ' (P2 below)' if stopped else 'none'}"))


def p2_verdict(value: float | None, bound: str | None) -> str:
    if not bound:
        return verdict("p2", value)
    if bound == "upper" and value is not None and value < 3:
        return "NOT met (target >= 3); the median is an upper bound"
    if bound == "lower" and value is not None and value >= 3:
        return "met (target >= 3); the median is a lower bound"
    return "not decided: the median is a bound on the wrong side of the target (see P2)"


def _bounded(x: float | None, bound: str | None) -> str:
    if x is None:
        return "unknown" if bound == "unknown" else "-"
    return {"lower": "> ", "upper": "< "}.get(bound or "", "") + f"{x:g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# qlora-search benchmark, {report['started']}", "",
             f"Machine: {m['cpus']} CPUs"
             + (f" ({m['cpu']}, {m['cpu_capability']}; compute dtype {m['compute_dtype']})" if "cpu" in m else "")
             + f", {m['platform']}; {('GPU ' + m['gpu']) if m.get('gpu') else 'no GPU'}. Versions: "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
             f"Command: `{report['command']}`, {report['wall_seconds']:.0f} s in all"
             + (f"; the hypervisor gave {_pct(report['cpu_steal'])} of this machine's CPU time to other guests "
                f"meanwhile (steal)" if report.get("cpu_steal") is not None else "") + ".", "",
             "| figure | value | target |", "|---|---|---|"]
    if "p1" in report:
        lines.append(f"| P1 trial overhead (search trial / bare loop) | {report['p1']['ratio']} | "
                     f"{verdict('p1', report['p1']['ratio'])} |")
    if "p2" in report:
        p = report["p2"]
        counted = sum(not c.get("excluded") for c in p["seeds"])
        lines.append(f"| P2 time to within 1% of best, random no-ES / TPE+ASHA (median of {counted} seeds) "
                     f"| {_bounded(p['ratio_median'], p.get('ratio_median_bound'))} | "
                     f"{p2_verdict(p['ratio_median'], p.get('ratio_median_bound'))} |")
        lines.append(f"| P3 steps run / steps with no early stopping (TPE+ASHA) | {p['p3']['steps_fraction']} | "
                     f"{p3_verdict(p['p3'])} |")
        p5 = p["p5"]["mlflow_seconds"] / p["p5"]["wall_seconds"]
        lines.append(f"| P5 MLflow time / search wall time | {p5:.4f} | {verdict('p5', p5)} |")
    if "p4" in report:
        lines.append(f"| P4 per-trial tokenization time / one-time tokenization | {report['p4']['ratio']} | "
                     f"{verdict('p4', report['p4']['ratio'])} |")
        lines.append(f"| P4' per-trial data time in all (reading the cache included) / one-time preparation | "
                     f"{report['p4']['ratio_all_data']} | for information |")
    if "p1" in report:
        p = report["p1"]
        a = p["after"]
        runs = [(k, p[k]) for k in P1_RUNS if k in p]  # "before" with --p1-before; "first" since warm hosts

        def each(fmt) -> str:
            return ", ".join(f"{k} {fmt(r)}" for k, r in runs)

        lines += ["", f"## P1: one trial of {p['steps']} steps", "",
                  f"Bare loop {p['bare_seconds']} s (process start to exit, val_f1 {p['bare_objective']})"
                  + (f", and {p['bare_again_seconds']} s run again after the trials; the ratios divide by the mean, "
                     f"{p['bare_seconds_mean']} s" if "bare_seconds_mean" in p else "") + ". The same "
                  "trial through `search.run`, from Tune starting it to Tune seeing it end"
                  + (" (first: the search's first trial, which starts the node's warm host; after: the second, "
                     "the same point again, which finds it warm, as every later trial of a search does; P1 is "
                     "after's ratio)" if "first" in p else "") + ": "
                  + each(lambda r: f"{r['trial_seconds']} s (ratio {r['ratio']})")
                  + f"; val_f1 {a['objective']}. Fixed cost (everything but data, model load, evaluation and "
                  f"training): bare {p['bare_fixed_seconds']} s, trial " + each(lambda r: f"{r['fixed_seconds']} s")
                  + ".",
                  f"The whole `search.run` command (Ray start {a['ray_start_seconds']} s, data encoded once, the "
                  f"trials, report; the benchmark turns the test evaluation off): "
                  + ", ".join(f"{k} {r['search_command_seconds']} s for {r.get('search_trials', 1)} trial(s)"
                              for k, r in runs if k != "first")
                  + f" (after: per trial, ratio to the bare loop {a['ratio_whole_command']}).",
                  *([f"CPU time the hypervisor gave to other guests (steal) while each ran: bare "
                     f"{_pct(p['bare_cpu_steal'])}, " + each(lambda r: _pct(r.get("cpu_steal")))
                     + f", bare again {_pct(p.get('bare_again_cpu_steal'))}."]
                    if p.get("bare_cpu_steal") is not None else []),
                  ""]
        keys = list(dict.fromkeys(list(p["bare_breakdown"]) + list(a["trial_breakdown"])))
        lines += md_table(["phase", "bare loop (s)"] + [f"trial {k} (s)" for k, _ in runs],
                          [[k, p["bare_breakdown"].get(k, "")] + [r["trial_breakdown"].get(k, "") for _, r in runs]
                           for k in keys])
        lines += ["", "![P1](p1_breakdown.png)"]
    if "p2" in report:
        p = report["p2"]
        def cell(x):
            if x is None:
                return "left out (curve unreadable)"
            return f"{x['seconds']:.0f}" + ("" if x["reached"] else " (never; its wall time)")

        lines += ["", "## P2, P3, P5: TPE + ASHA vs random search without early stopping", ""]
        st = report.get("settings") or {}
        if st.get("p2_steps"):
            every = st["p2_steps"] // st["p2_evals"]
            apart = st.get("p2_apart", True)  # reports from before side by side ran the searches apart
            cpus = p2_cpus(report["machine"].get("cpus"), st.get("p2_concurrency", 2), not apart)
            rungs = [str(r) for r in p2_rungs(argparse.Namespace(**st))]
            lines += [f"Each search: {st['p2_trials']} trials, {st.get('p2_concurrency', 2)} at a time ({cpus} CPU "
                      f"each), of {st['p2_steps']} steps of batch {p2_batch(st)} with an evaluation of "
                      f"{st['p2_eval_examples']} validation "
                      + ("questions" if st.get("p2_task") == "style" else "messages")
                      + (" at ASHA's rungs and the last step (both strategies, `--p2-eval-at-rungs`), on "
                         if st.get("p2_eval_at_rungs") else f" every {every} steps, on ")
                      + f"`{p2_space_name(st)}`. TPE starts with "
                      + (f"{st['p2_startup_trials']} random start-up trial(s) (`--p2-startup-trials`)"
                         if st.get("p2_startup_trials")
                         else "Optuna's random start-up trials (searcher.n_startup_trials)")
                      + f"; ASHA: grace period {every} steps (one evaluation round), reduction factor "
                      f"{st['reduction_factor']:g} (rungs at steps {', '.join(rungs)}), ties at a rung ordered by "
                      + TIE_BREAK_WORDS[tie_break(st)]
                      + (", as are the values TPE is told (`searcher.tie_break`)" if st.get("searcher_tie_break")
                         else "")
                      + ". Random search runs every "
                      "trial to the end. Same seed, trial budget and concurrency for both"
                      + (", one after the other." if apart else
                         ": the two searches of a seed run side by side, started together, each in its own process, "
                         "both on one local Ray the benchmark starts, so both meet the same CPU steal. The one that "
                         "ends first leaves the other the machine's spare CPU (its start-ups no longer overlap "
                         "another's): that favours whichever runs longer, random search as a rule."), ""]
        lines += md_table(["seed", "best either found", "TPE+ASHA: s to within 1%", "random no-ES: s to within 1%",
                           "ratio"],
                          [[c["seed"], f"{c['reference_best']:.4f}", cell(c["tpe_asha"]), cell(c["random_fifo"]),
                            _bounded(c["ratio"], c.get("bound"))] for c in p["seeds"]])
        lines += ["", "A ratio marked > or < is a bound: one search never got within 1% of the best and is charged "
                  "its whole run (random never: the true ratio is larger; TPE+ASHA never: smaller). The median "
                  "orders such a seed beyond every value on its side."]
        lines += [f"Seed {c['seed']} is left out of the median: {c['excluded']}." for c in p["seeds"]
                  if c.get("excluded")]
        lines += [f"\nSeed {c['seed']}: TPE+ASHA stopped at step {x['stopped_at_step']}"
                  + (f" (at {x['value_when_stopped']:.4g})" if x["value_when_stopped"] is not None else "")
                  + f" a configuration that random search ran to the end to {x['value_run_to_the_end']:.4f}, within 1%"
                  f" of the best: {fmt_params(x['params'])}."
                  for c in p["seeds"] for x in c.get("best_config_stopped") or []]
        lines.append("")
        lines += md_table(["search", "wall (s)", f"best {p2_metric(report)}", "steps run / full", "stopped early",
                           "failed", "CPU stolen"],
                          [[r["name"], f"{r['wall_seconds']:.0f}", r["best_value"],
                            f"{r['steps_run']}/{r['steps_full']}", r["stopped_early"], r["failed"],
                            _pct(r.get("cpu_steal"))] for r in p["runs"]])
        c = p.get("trial_cost") or {}
        if c.get("ceiling"):
            lines += ["", f"What bounds the ratio: a trial's fixed cost (Tune start to end, less data, model load, "
                      f"evaluation and training) was {c['fixed_seconds_median']} s (median over all P2 trials); a "
                      f"full trial's work {c['work_seconds_full_median']} s. Early stopping cuts the work to "
                      f"{p['p3']['steps_fraction']} (P3) but not the fixed cost, so if both strategies found the best "
                      f"in their last trial the ratio would be (fixed + work) / (fixed + P3 x work) = "
                      f"**{c['ceiling']}** ({c['ceiling_without_fixed']} with no fixed cost). Beyond it, only "
                      f"TPE finding the best sooner than random search counts."]
        lines += ["", "![P2](p2_best_so_far.png)"]
        if p.get("replay"):
            from bench.replay import markdown as replay_markdown

            lines += ["", "### P3 and P2 at larger budgets: ASHA replayed on the recorded curves (`bench/replay.py`)",
                      ""] + replay_markdown(p["replay"], st.get("reduction_factor"))
    if "p4" in report:
        p = report["p4"]
        lines += ["", "## P4: data preparation", "",
                  f"One-time preparation without the cache (read, deduplicate, split, tokenize): "
                  f"{p['one_time_seconds']} s, "
                  f"of which tokenizing {p['one_time_tokenize_seconds']} s. Median per trial over {p['trials']} trials "
                  f"(the search encodes once into the preprocessing cache; trials read it): tokenizing "
                  f"{p['per_trial_tokenize_seconds_median']} s, data in all {p['per_trial_data_seconds_median']} s "
                  f"(reading the data file, splitting, looking the token ids up in the cache)."]
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    """What decides this machine's speed here: CPUs, the CPU's vector extensions, and the compute dtype that
    `model.dtype: auto` resolves to on it (bf16 only where the CPU has native bf16 kernels)."""
    import torch

    from trainables.model import auto_dtype

    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (info.read_text().splitlines() if info.exists() else [])
             if line.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu": cpu,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "compute_dtype": auto_dtype(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def versions() -> dict[str, str]:
    from search.driver import library_versions

    return library_versions()


def backfill_best_config_stopped(out: Path, p2: dict[str, Any]) -> None:
    """`best_config_stopped` for a report from before it, from the searches' summaries its runs/ kept."""
    mode = (p2.get("objective") or {}).get("mode", "max")
    for c in p2["seeds"]:
        if c.get("excluded"):
            continue
        runs = {key: {"trials": trial_outcomes(json.loads((out / "runs" / f"p2-{key}-seed{c['seed']}" /
                                                             "summary.json").read_text())["trials"])}
                for key, _ in STRATEGIES}
        c["best_config_stopped"] = best_config_stopped(runs, c["target"], mode)
    p2["p3"]["best_config_stopped_seeds"] = best_config_stopped_seeds(p2["seeds"])


def redraw(out: Path) -> None:
    """Plots and report.md again from an existing report.json (`--redraw DIR`)."""
    report = json.loads((out / "report.json").read_text())
    if "p2" in report:  # reports from before the ratio's bounds were kept
        for c in report["p2"]["seeds"]:
            c["bound"] = None if c.get("excluded") else ratio_bound(c)
        report["p2"]["ratio_median"], report["p2"]["ratio_median_bound"] = median_ratio(report["p2"]["seeds"])
        # reports from before bench/replay.py, or before its searcher bound (the replay is seeded: same rows again)
        if "searcher_bound" not in (report["p2"].get("replay") or {}) and (out / "runs").is_dir():
            from bench.replay import from_report

            report["p2"]["replay"] = from_report(out)
        if (out / "runs").is_dir() and any("best_config_stopped" not in c for c in report["p2"]["seeds"]):
            backfill_best_config_stopped(out, report["p2"])
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    report["plots"] = plots(out, report)
    (out / "report.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="Report directory (default: bench/results/<time>).")
    ap.add_argument("--only", nargs="+", choices=("p1", "p2", "p4"), help="Run only these parts (P3 and P5 come "
                    "with P2).")
    ap.add_argument("--p1-steps", type=int, help="Steps of the P1 trial (default: as many as make the bare loop "
                    "last --p1-seconds on this machine, from a short calibration run).")
    ap.add_argument("--p1-set", action="append", metavar="KEY=VALUE", help="A search setting for P1's two trials "
                    "(repeatable), e.g. resources.allocator=system to A/B one change against the same bare loop.")
    ap.add_argument("--p1-seconds", type=float, default=120.0, help="Bare-loop length P1 calibrates to.")
    ap.add_argument("--p1-before", action="store_true", help="Also time P1's trial as it was before the per-trial "
                    "cost was cut (bench/README.md; about 4 minutes more).")
    # P2's defaults are sized for the whole benchmark to take under 40 minutes on 2 cores with native bf16 (an Intel
    # Xeon with AMX, bench/README.md): per seed, the two searches side by side, each 12 trials of 192 steps of batch 4
    # one at a time on 1 CPU, evaluated on the whole validation split at ASHA's rungs (steps 16, 48 and 144) and the
    # end; a seed then takes about 8 minutes. Batch 4 rather than the search's 16: the tiny model learns from 4 times
    # fewer messages in as many steps (bench/README.md, "Session of 2026-12-05, 05:39-08:39"). 192 steps rather than
    # 96: with one trial at a time the first trial always runs to the end and the first rung costs every trial 16
    # steps; at 96 steps those alone were 0.31 of P3's 0.35, room for one more trial past the first rung
    # (bench/README.md, "Session of 2026-12-05, 15:37").
    # On a 2-core AVX2 machine a step is several times slower (bench/README.md): give P2 longer there.
    ap.add_argument("--p2-steps", type=int, default=192)
    ap.add_argument("--p2-batch-size", type=int, default=4, help="Per-worker batch size of every P2 trial (both "
                    "strategies).")
    ap.add_argument("--p2-task", choices=("classification", "style"), default="classification", help=f"P2's "
                    f"searches: the SMS spam classification search ({CONFIG}, F1) or the style-control search "
                    f"({STYLE_CONFIG}, token separation).")
    ap.add_argument("--p2-space", help=f"P2's search space (default {WIDE_SPACE}, or {STYLE_SPACE} with --p2-task "
                    f"style); 'cold': {SPACE} without its warm-start point.")
    ap.add_argument("--p2-trials", type=int, default=12)
    ap.add_argument("--p2-seeds", type=int, default=3)
    ap.add_argument("--p2-first-seed", type=int, default=0, help="P2's seeds are this one and the next "
                    "--p2-seeds - 1 (e.g. one more seed for an earlier run's seeds 0 and 1: --p2-first-seed 2 "
                    "--p2-seeds 1).")
    ap.add_argument("--p2-evals", type=int, default=12, help="Evaluations per P2 trial (ASHA's rungs are at the "
                    "first, then every reduction-factor times as many steps).")
    ap.add_argument("--p2-eval-examples", type=int, help="Validation examples per P2 evaluation (default 516: the "
                    "bundled data's whole validation split; on its first 128 one configuration's F1 varied twice as "
                    "much between seeds. With --p2-task style: held-out questions, default 32).")
    ap.add_argument("--p2-eval-at-rungs", action=argparse.BooleanOptionalAction, default=True, help="Both P2 "
                    "strategies evaluate only at ASHA's rungs and at the end (scheduler.eval_at_rungs), not every "
                    "--p2-steps / --p2-evals steps.")
    ap.add_argument("--p2-set", action="append", metavar="KEY=VALUE", help="A search setting for both strategies' "
                    "P2 searches (repeatable), e.g. trial.optim.lr_scheduler=constant.")
    ap.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA's reduction factor in P2.")
    ap.add_argument("--tie-break", choices=("eval_loss", "val_ap"), help="What orders TPE + ASHA's trials whose "
                    "F1 ties, at a rung and for TPE (scheduler.tie_break and searcher.tie_break; default: the "
                    "search's own).")
    ap.add_argument("--p2-startup-trials", type=int, help="TPE's random start-up trials in P2 (default: the "
                    "search's searcher.n_startup_trials). Random search draws the same first configurations for the "
                    "same seed, so only TPE's later trials can differ.")
    ap.add_argument("--p2-concurrency", type=int, default=1, help="Trials at once in each P2 search (both "
                    "strategies); a trial gets the machine's CPUs divided by the trials running at once (this, "
                    "times 2 when the searches run side by side).")
    ap.add_argument("--p2-apart", action="store_true", help="Run a seed's two P2 searches one after the other, "
                    "each with the whole machine, instead of side by side (the default).")
    ap.add_argument("--eval-examples", type=int, default=128, help="Validation examples per P1 evaluation.")
    ap.add_argument("--redraw", metavar="DIR", help="Only redraw the plots and report.md of an earlier run in DIR.")
    args = ap.parse_args(argv)
    if args.p2_task == "style" and (args.p2_space == "cold" or args.tie_break == "val_ap"):
        ap.error("--p2-task style: --p2-space cold and --tie-break val_ap are the classification search's (its "
                 "space without its warm-start point; the minority label's average precision)")
    if args.p2_eval_examples is None:
        args.p2_eval_examples = 32 if args.p2_task == "style" else 516
    if args.redraw:
        redraw(Path(args.redraw))
        return 0
    out = Path(args.out or ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    parts = set(args.only or ("p1", "p2", "p4"))
    t0, cpu0 = time.time(), cpu_times()
    from search.config import load_config

    defaults = load_config(CONFIG, [])
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python -m bench.run " + " ".join(argv or sys.argv[1:]),
        "machine": machine(), "versions": versions(),
        "settings": {**vars(args), "searcher_tie_break": args.tie_break or defaults.searcher.tie_break,
                     "scheduler_tie_break": args.tie_break or defaults.scheduler.tie_break},
        "targets": TARGETS,
    }
    b = Bench(out, args)
    _say(f"writing to {out}")
    if "p1" in parts:
        report["p1"] = p1(b)
        _say(f"P1: ratio {report['p1']['ratio']}")
    if "p2" in parts:
        report["p2"] = p2(b)
        _say(f"P2: median ratio {report['p2']['ratio_median']}; P3 {report['p2']['p3']}")
    if "p4" in parts:
        per_trial = report.get("p2", {}).get("data_per_trial") or (
            [report["p1"]["after"]["data"]] if "p1" in report else [])
        # the one-time preparation of the task whose trials it is compared with: P2's, or P1's (classification)
        report["p4"] = p4(b, per_trial, p2_config(vars(args)) if report.get("p2", {}).get("data_per_trial")
                          else CONFIG)
        _say(f"P4: ratio {report['p4']['ratio']}")
    report["wall_seconds"] = round(time.time() - t0, 1)
    report["cpu_steal"] = steal_since(cpu0)
    report["plots"] = plots(out, report)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(markdown(report))
    _say(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
