"""What keeps a day-long search alive and tidy: resumable state, clean shutdown on signals, no orphaned Ray processes.

- `SearchState` (a Tune callback) snapshots the experiment the moment a trial finishes, so a driver killed right
  after would not run that trial again on `--resume`, and carries the scheduler's (ASHA's) rungs through a restore:
  Tune saves and restores the searcher and callbacks, but not the scheduler.
- `Interrupt` routes the first Ctrl-C / SIGTERM to Tune's graceful stop (the experiment state is saved, running trials
  stay resumable) and makes a second one exit at once, after killing this driver's Ray processes.
- `RayProcesses` records the Ray processes this driver started, so the next run of the same search can end the ones
  that outlived a driver killed with SIGKILL (Ray's agents do), and so nothing is left after a normal exit.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from trainables.metrics import TIE_BREAKS

_NOT_STATE = ("_controller",)


class _ControllerAware:
    """Scheduler mixin: remembers the Tune controller it is handed, so `SearchState` can snapshot the experiment."""

    _controller = None

    def on_trial_add(self, tune_controller, trial):
        # Tune hands schedulers a wrapper that warns on every attribute outside a short list; keep the controller
        self._controller = getattr(tune_controller, "_tune_controller", tune_controller)
        return super().on_trial_add(tune_controller, trial)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in _NOT_STATE}


NUDGE = 1e-6


def tie_broken(result: dict, metric: str, sign: int, key: str | None) -> dict:
    """`result` with `metric` nudged by less than `NUDGE` against `result[key]`, so results whose objective is equal
    are ordered by `key` and no others are reordered; `sign` is 1 where the objective is maximised, -1 where
    minimised. `key` is one of `metrics.TIE_BREAKS`: eval_loss (lower is better) or val_ap (in [0, 1], higher is
    better). Unchanged where either value is missing or `key` is not finite."""
    second = result.get(key) if key and key != metric else None
    if metric not in result or not isinstance(result[metric], (int, float)) or not isinstance(second, (int, float)) \
            or not math.isfinite(second):
        return result
    if TIE_BREAKS.get(key, True):
        worse = math.atan(max(0.0, second)) * 2 / math.pi  # in [0, 1): higher loss, worse
    else:
        worse = (1.0 - min(1.0, max(0.0, second))) * 0.999  # in [0, 1): lower average precision, worse
    return {**result, metric: result[metric] - sign * NUDGE * worse}


class ASHA(_ControllerAware, ASHAScheduler):
    """Ray's ASHA, with ties in the objective at a rung ordered by a second metric (`tie_break`, lower is better).

    Ray's ASHA stops a trial only when it is strictly below its rung's cutoff (the 1 - 1/reduction_factor quantile).
    An F1 objective ties often early on: every trial that still answers only the majority label scores exactly 0.
    Once more than 1/reduction_factor of a rung scores 0, the cutoff is 0 and no such trial is ever stopped, however
    many better ones there are. With `tie_break="eval_loss"`, the value ASHA ranks is the objective nudged by less
    than 1e-6 in the direction of the trial's eval loss (`tie_broken`), so only equal objective values are reordered:
    among trials at F1 0, the ones closest to the gold answers are kept. The results Tune and MLflow see are
    unchanged; the searcher is told the same nudge where `searcher.tie_break` asks (`TieBreakingOptunaSearch`)."""

    def __init__(self, *args, tie_break: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._tie_break = tie_break

    def _ranked(self, result: dict) -> dict:
        return tie_broken(result, self._metric, self._metric_op, self._tie_break)

    def on_trial_result(self, tune_controller, trial, result):
        return super().on_trial_result(tune_controller, trial, self._ranked(result))

    def on_trial_complete(self, tune_controller, trial, result):
        return super().on_trial_complete(tune_controller, trial, self._ranked(result))


class TieBreakingOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch whose sampler is told each finished trial's objective nudged by `tie_break` (`tie_broken`).

    TPE splits the trials it has seen into a good group (the best ~10%: one trial while there are fewer than 11) and
    the rest, and samples near the good group. Where every trial so far scores F1 0 (a wide space, short trials: the
    common case early in a search), the good group is whichever zero Optuna sorts first, and TPE's modelled trials
    are no better aimed than random ones. Told the nudged values, TPE takes the trial closest to the gold answers as
    its good group. Values differ from the objective by less than 1e-6; the summary, the report and MLflow keep the
    objective as reported."""

    def __init__(self, *args, tie_break: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._tie_break = tie_break

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result and isinstance(self._metric, str):
            result = tie_broken(result, self._metric, 1 if self._mode == "max" else -1, self._tie_break)
        return super().on_trial_complete(trial_id, result=result, error=error)


class FIFO(_ControllerAware, FIFOScheduler):
    pass


class SearchState(Callback):
    """Snapshot the experiment when a trial ends; save and restore the scheduler's state with the experiment."""

    def __init__(self, scheduler=None):
        self.scheduler = scheduler
        self._dirty = False
        self.snapshots = 0
        # Tune's view of every trial at the end of the last step: {trial_id: (status, config)}. Tune marks running
        # trials TERMINATED while it cleans up after a stop, so this is where an interrupted trial still shows RUNNING.
        self.trials: dict[str, tuple[str, dict]] = {}

    def attach(self, scheduler) -> "SearchState":
        self.scheduler = scheduler
        return self

    def get_state(self) -> dict | None:
        return {"scheduler": {k: v for k, v in self.scheduler.__dict__.items() if k not in _NOT_STATE}}

    def set_state(self, state: dict) -> None:
        self.scheduler.__dict__.update(state.get("scheduler", {}))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._dirty = True

    def on_trial_error(self, iteration, trials, trial, **info):
        self._dirty = True

    def on_step_end(self, iteration, trials, **info):
        self.trials = {t.trial_id: (t.status, dict(t.config or {})) for t in trials}
        controller = getattr(self.scheduler, "_controller", None)
        if self._dirty and controller is not None:
            # Tune snapshots at most every 10 s by default; a trial that finished inside that window would be run
            # again after a crash, and the searcher would never learn its final value.
            controller.checkpoint(force=True, wait=True)
            self.snapshots += 1
        self._dirty = False


def restored_callbacks(tuner, callbacks: list) -> list:
    """Give a `Tuner.restore`d tuner this run's callbacks (live MLflow client, this run's counters).

    `Tuner.restore` brings back the callbacks pickled when the search began; these replace them, in the same order,
    so Tune hands each its saved state, and the `SearchState` among them is attached to the restored scheduler."""
    internal = tuner._local_tuner  # Ray 2.60: the restored run config and tune config live on the internal tuner
    for cb in callbacks:
        if isinstance(cb, SearchState):
            cb.attach(internal._tune_config.scheduler)
    internal._run_config.callbacks = callbacks
    return callbacks


class Interrupt:
    """Signal handler for SIGINT and SIGTERM during a search.

    First signal: before Tune runs, abort with KeyboardInterrupt; while Tune runs, trigger its graceful stop (it saves
    the experiment state and returns what it has); while the summary is written, let it finish. Second signal: kill
    this driver's Ray processes and exit with status 130 at once."""

    def __init__(self, on_hard_exit: Callable[[], None] | None = None):
        self.count = 0
        self.signal_name: str | None = None
        self.phase = "start"  # start | tune | finish
        self._prev: dict[int, Any] = {}
        self._on_hard_exit = on_hard_exit

    def install(self) -> "Interrupt":
        """Take SIGINT and SIGTERM. Call again after `ray.init`, whose core worker installs its own SIGTERM handler
        (it prints a stack trace and aborts the driver, leaving everything unsaved)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        # Tune would otherwise take SIGINT for itself (and ignore SIGTERM); this handler drives Tune's stop instead.
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for sig in (signal.SIGINT, signal.SIGTERM):
            prev = signal.signal(sig, self)
            self._prev.setdefault(sig, prev)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._prev.items():
            signal.signal(sig, handler)
        self._prev.clear()

    def enter_tune(self) -> None:
        # tune.run installs its stop handler on SIGUSR1; clear a stale one from an earlier search in this process
        if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.phase = "tune"

    @property
    def requested(self) -> bool:
        return self.count > 0

    def __call__(self, signum, frame):
        self.count += 1
        name = signal.Signals(signum).name
        if self.count > 1:
            print(f"{name} again: exiting now", file=sys.stderr, flush=True)
            try:
                if self._on_hard_exit:
                    self._on_hard_exit()
            finally:
                os._exit(130)
        self.signal_name = name
        print(f"{name}: stopping the search; unfinished trials can continue with --resume. "
              f"Send it again to exit at once.", file=sys.stderr, flush=True)
        if self.phase == "tune":
            tune_stop = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
            if callable(tune_stop):
                tune_stop(signum, frame)
                return
            raise KeyboardInterrupt  # Tune has not started its loop yet
        if self.phase == "start":
            raise KeyboardInterrupt


class RayProcesses:
    """The Ray processes this driver started (its descendants), recorded in `<search dir>/ray-processes.json`."""

    def __init__(self, search_dir: Path):
        self.path = Path(search_dir) / "ray-processes.json"

    def record(self) -> int:
        import psutil

        procs = []
        for p in psutil.Process().children(recursive=True):
            try:
                procs.append({"pid": p.pid, "create_time": p.create_time(), "name": p.name()})
            except psutil.Error:
                continue
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"driver": os.getpid(), "processes": procs}))
        tmp.replace(self.path)
        return len(procs)

    def reap_stale(self) -> list[int]:
        """End the processes recorded by an earlier driver of this search that is gone (e.g. killed with SIGKILL)."""
        import psutil

        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        if data.get("driver") != os.getpid() and psutil.pid_exists(data.get("driver", -1)):
            try:
                if psutil.Process(data["driver"]).status() != psutil.STATUS_ZOMBIE:
                    return []  # that driver still runs; its processes are not orphans
            except psutil.Error:
                pass
        killed = []
        for rec in data.get("processes", []):
            try:
                p = psutil.Process(rec["pid"])
                if abs(p.create_time() - rec["create_time"]) > 0.01 or p.status() == psutil.STATUS_ZOMBIE:
                    continue  # the pid was reused by another process, or it is already dead
                p.kill()
                killed.append(rec["pid"])
            except psutil.Error:
                continue
        self.path.unlink(missing_ok=True)
        return killed

    @staticmethod
    def kill_descendants(timeout: float = 5.0) -> int:
        """SIGKILL every process below this one (what `ray.shutdown` left, or everything on a hard exit)."""
        import psutil

        procs = [p for p in psutil.Process().children(recursive=True) if _is_ray(p)]
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=timeout)
        return len(procs)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _is_ray(p) -> bool:
    import psutil

    try:
        return "ray" in " ".join(p.cmdline()[:3]).lower() or p.name().startswith(("ray::", "raylet", "gcs_server"))
    except psutil.Error:
        return False
