"""The Ray-facing adapters: a Ray Train worker loop around `sft.train`, and the Tune function trainable that runs one
trial as one Train V2 run (`TorchTrainer`, or Train's base `DataParallelTrainer` for a single worker; `trainer_class`),
the supported Tune + Train pattern in Ray >= 2.50.

The Tune config carries only the sampled parameters (dotted setting names such as `lora.r`); the base settings and
run options are bound once with `tune.with_parameters`, never copied into every trial's config.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from typing import Any

from trainables.settings import TrialSettings

# The Tune trial process only waits on its Train run; its Train workers hold the real resources. It asks for no CPU
# (a trial holding a CPU next to its worker's CPU starves a 2-CPU machine) but for a little memory, since Tune refuses
# a request with no resources at all.
TRIAL_RESOURCES = {"CPU": 0, "memory": 64 * 1024**2}


@dataclass(frozen=True)
class TrialResources:
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    custom: tuple[tuple[str, float], ...] = ()  # extra resources per worker, e.g. (("A10G", 1),)
    torch_process_group: str = "auto"  # "always": TorchTrainer for one worker too (see trainer_class)
    warm: bool = True  # one worker: train in a warm host on the worker's node (trainables.warm)
    allocator: str = "jemalloc"  # the training processes' memory allocator (trainables.warm.allocator_env)

    def per_worker(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker, **dict(self.custom)}
        if self.gpus_per_worker:
            res["GPU"] = self.gpus_per_worker
        return res


def train_worker(config: dict[str, Any], on_end=None) -> None:
    """Ray Train worker loop: typed settings in, `ray.train.report` out.

    `config["warm"]`: the SFT loop runs in a warm host on this node (`trainables.warm`), which already imported the
    training stack, rather than in this new process; this process relays its reports. `on_end` (tests) runs here."""
    import time

    entered = time.time()
    import ray.train
    from ray.train import Checkpoint

    warm = bool(config.get("warm")) and on_end is None
    if not warm:
        from trainables.sft import import_stack

        import_stack()
    # where a trial's fixed cost goes (the driver adds when Tune started and ended the trial): see bench/README.md
    timing = {**config.get("timing", {}), "worker_started_at": round(entered, 3),
              "imports_seconds": round(time.time() - entered, 3)}

    settings = TrialSettings.model_validate(config["settings"])
    ctx = ray.train.get_context()
    node = {"node_ip": socket.gethostbyname(socket.gethostname()), "node_id": _node_id(), "pid": os.getpid()}

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        metrics = {**metrics, **timing, "world_size": ctx.get_world_size(), "node_id": node["node_id"]}
        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    gpu_share = float(config.get("gpu_share") or 0.0)

    def train(checkpoint_dir: str | None = None) -> None:
        try:
            if warm:
                from trainables.warm import run_warm

                run_warm(config["settings"], report, checkpoint_dir, timing, gpu_share=gpu_share,
                         allocator=config.get("allocator", "jemalloc"))
            else:
                from trainables.model import limit_gpu_memory
                from trainables.sft import train as sft_train

                limit_gpu_memory(gpu_share)
                sft_train(settings, report, checkpoint_dir=checkpoint_dir, on_end=on_end)
        except Exception as e:
            if out_of_memory(e):  # failed at once by `fail_on_out_of_memory`, not retried
                raise TrialOutOfMemory(out_of_memory_message(settings, gpu_share, e)) from None
            raise

    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            final = _final_metrics(d, settings)
            if final is not None:
                # Trained to the end before the restart (the driver died after the last report): report that result
                # again rather than train on; HF's Trainer resumed at max_steps runs one step past it.
                report(final, d if ctx.get_world_rank() == 0 else None)
                return
            train(checkpoint_dir=d)
    else:
        train()


class TrialOutOfMemory(RuntimeError):
    """A trial ran out of GPU memory. Its settings and its share of the GPU decide how much it needs, so a retry from
    its last checkpoint would run out again at the same batch: `fail_on_out_of_memory` fails it at once instead."""


def _error_chain(error: BaseException):
    """`error` and what it wraps: a Ray task error's `cause` (a warm host's), a Train controller error's
    `controller_failure`, `__cause__`."""
    seen: set[int] = set()
    e: BaseException | None = error
    while isinstance(e, BaseException) and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = getattr(e, "cause", None) or getattr(e, "controller_failure", None) or e.__cause__


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is torch's out-of-memory error, or wraps one."""
    import torch

    return any(isinstance(e, torch.OutOfMemoryError) for e in _error_chain(error))


def out_of_memory_message(settings: TrialSettings, gpu_share: float, error: BaseException) -> str:
    """One line: what ran out, the settings that decide a trial's memory, and what to change."""
    detail = str(getattr(error, "cause", None) or error).strip().splitlines()
    detail_text = (detail[0] if detail else "").split(". GPU")[0][:200]  # "CUDA out of memory. Tried to allocate X"
    length_key = "style" if settings.task == "style" else "data"
    max_length = getattr(settings, length_key).max_length
    share = f"resources.gpus_per_worker={gpu_share:g}" if gpu_share else "no GPU share"
    return (f"out of GPU memory ({detail_text}) with trial.optim.batch_size={settings.optim.batch_size}, "
            f"trial.{length_key}.max_length={max_length}, lora.r={settings.lora.r}, "
            f"trial.model.gradient_checkpointing={str(settings.model.gradient_checkpointing).lower()} and {share}. "
            "Not retried: it would run out again at the same batch. Lower trial.optim.batch_size or "
            f"trial.{length_key}.max_length, set trial.model.gradient_checkpointing=true, or give each trial more "
            "of a GPU (a larger resources.gpus_per_worker).")


def fail_on_out_of_memory():
    """A Ray Train callback that fails the run when a worker ran out of GPU memory (`TrialOutOfMemory`), where Train
    would otherwise retry it `max_failures` times. An error raised by a callback is a controller error, which Train
    does not retry."""
    from ray.train import UserCallback

    class FailOnOutOfMemory(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            for error in worker_exceptions.values():
                if isinstance(error, TrialOutOfMemory):
                    raise error

    return FailOnOutOfMemory()


class TrialGone(RuntimeError):
    """The Tune trial that started a Train run is gone: its workers are not restarted (`stop_with_trial`)."""


def stop_with_trial(trial_actor_id: str | None, timeout_s: float = 5.0):
    """A Ray Train callback that fails the run, instead of restarting its worker group, when the Tune trial actor
    that started it (`trial_actor_id`) is dead.

    When Tune stops a trial (ASHA, a stop criterion, the end of the search), Ray kills the actors the trial owned:
    the Train controller gets SIGTERM, then SIGKILL 200 ms later. In that window the controller could see its workers
    die, restart the worker group under `FailureConfig(max_failures=...)` and ask for a new placement group, which
    the GCS created after the controller was dead. Train's placement-group cleaner only learns of a group once its
    worker group started, so that group held its CPU (or GPU) until the search's job ended: the next trials waited
    for it (bench/README.md, 2026-12-05, item 4). A worker failure is where this callback runs; it asks Ray's state
    API (served by the dashboard, which Train's cleaner needs too) whether the trial actor is dead. The trial's ID is
    passed, not its handle: a handle held here would keep the trial actor, and so this run, alive. Where the state
    API cannot answer, Ray's behaviour is kept."""
    from ray.train import UserCallback

    class StopWithTrial(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            if trial_actor_id and _actor_dead(trial_actor_id, timeout_s):
                raise TrialGone(f"the Tune trial actor {trial_actor_id} that started this run is dead: "
                                "not restarting its workers")

    return StopWithTrial()


def _actor_dead(actor_id: str, timeout_s: float) -> bool:
    from ray.util.state import get_actor

    try:
        state = get_actor(actor_id, timeout=timeout_s)
    except Exception:  # the state API is down or slow: no answer, so not known dead
        return False
    return state is None or state.state == "DEAD"


def error_line(error: BaseException | str) -> str:
    """The line of a trial's error to show: a `TrialOutOfMemory`'s own message, found through the errors Tune and
    Train wrap it in (Tune's task error, Train's controller error), else the first line."""
    if isinstance(error, BaseException):
        found = next((e for e in _error_chain(error) if isinstance(e, TrialOutOfMemory)), None)
        if found is not None:
            return str(found)
    lines = str(error).strip().splitlines()
    for line in lines:  # an error that came back as text (a restored search's)
        if f"{TrialOutOfMemory.__name__}: " in line:
            return line.split(f"{TrialOutOfMemory.__name__}: ", 1)[1].strip()
    return lines[0] if lines else ""


def _final_metrics(checkpoint_dir: str, settings: TrialSettings) -> dict[str, Any] | None:
    import json
    from pathlib import Path

    from trainables import metrics as M

    try:
        metrics = json.loads((Path(checkpoint_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if int(metrics.get(M.STEP, 0)) >= settings.optim.max_steps else None


def _node_id() -> str:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # not in a Ray worker (e.g. a test calling train_worker directly)
        return ""


def checkpoint_uri(storage_path: str, path: str) -> str:
    """The checkpoint path Train reports, as a URI a reader on any node can open.

    Train reports pyarrow filesystem paths, which drop the scheme: a checkpoint under s3://bucket/runs is reported
    as "bucket/runs/...", and the driver would look for that directory on its own disk."""
    if "://" not in storage_path or storage_path.startswith("file://") or "://" in path:
        return path
    return f"{storage_path.split('://', 1)[0]}://{path}"


def tune_report_callback(storage_path: str):
    """Ray's TuneReportCallback (Train results and checkpoint paths to the Tune trial), with checkpoint URIs."""
    from ray.train import Checkpoint
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                checkpoint = Checkpoint(checkpoint_uri(storage_path, checkpoint.path), checkpoint.filesystem)
            super().after_report(run_context, metrics, checkpoint)

    return ReportToTune()


def trainer_class(resources: TrialResources):
    """Ray Train's trainer for a trial with these resources.

    Several workers train with DDP: `TorchTrainer` sets up their torch process group. A single worker has no process
    group to set up, yet TorchTrainer charges it a fixed price per trial: the Train controller imports torch to
    unpickle the torch backend, and the worker sets up a one-rank process group before training. Ray Train's base
    `DataParallelTrainer` (the same controller, worker group, checkpointing and failure handling, no backend) skips
    both: 5.6 s less fixed cost per trial on 2 CPUs (bench/README.md, P1). `torch_process_group="always"` keeps
    TorchTrainer."""
    if resources.num_workers > 1 or resources.torch_process_group == "always":
        from ray.train.torch import TorchTrainer

        return without_idle_dataset_manager(TorchTrainer)
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    return without_idle_dataset_manager(DataParallelTrainer)


@functools.cache
def without_idle_dataset_manager(trainer: type) -> type:
    """`trainer` less the Ray Data actor it starts for a run without Ray Datasets.

    Ray Train's `DatasetsCallback` starts a `DatasetManager` actor for every run, datasets or none: one more process
    per trial, which imports Ray Data and is shut down unused (1.2 s of CPU per trial; searches sharing 2 CPUs ended
    5-9% sooner without it, bench/README.md). Our trials read the search's preprocessing cache, not Ray Datasets, so
    with no `datasets` the callback is left out and nothing else changes. If Ray's trainer no longer builds its
    callbacks this way, `trainer` is used as is."""
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    except ImportError:
        return trainer  # a Ray that changed this: keep Ray's behaviour
    if not hasattr(trainer, "_create_default_callbacks"):
        return trainer

    class Trainer(trainer):
        __doc__ = trainer.__doc__

        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return callbacks if self.datasets else [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]

    Trainer.__name__ = Trainer.__qualname__ = trainer.__name__
    return Trainer


def run_trial(config: dict[str, Any], *, base: dict[str, Any], resources: TrialResources,
              storage_path: str, max_failures: int = 2, objective: tuple[str, str] | None = None) -> None:
    """Tune function trainable: one trial = one Ray Train fit() (`trainer_class`), the sampled values applied to
    `base`.

    `objective` (metric, mode): Train keeps the trial's 2 best checkpoints by it, besides its latest (to resume
    from), so the search can export the best adapter a trial produced."""
    import time

    entered = time.time()
    import ray
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    settings = TrialSettings.model_validate(base).with_values(config)
    trial_id = ray.tune.get_context().get_trial_id()
    warm = resources.warm and resources.num_workers == 1
    # Where the Train workers train themselves (no warm host), they get the warm hosts' allocator too: Train runs the
    # loop on a thread of the worker's, as a host does (trainables/warm.py, "Allocator").
    from trainables.warm import allocator_env

    worker_env = {} if warm else allocator_env(resources.allocator)
    trainer = trainer_class(resources)(
        train_loop_per_worker=train_worker,
        # when this trial's process started and when it asked Train for workers (see search.driver.WORKER_TIMING)
        train_loop_config={"settings": settings.model_dump(), "warm": warm,
                           "gpu_share": resources.gpus_per_worker, "allocator": resources.allocator,
                           "timing": {"trial_entered_at": round(entered, 3), "fit_at": round(time.time(), 3)}},
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker=resources.per_worker(),
        ),
        run_config=RunConfig(
            # A stable name per trial: a restarted trial finds its Train run and resumes from its last checkpoint.
            name=f"train-{trial_id}",
            storage_path=storage_path,
            worker_runtime_env={"env_vars": worker_env} if worker_env else None,
            callbacks=[tune_report_callback(storage_path), fail_on_out_of_memory(),
                       stop_with_trial(ray.get_runtime_context().get_actor_id())],
            # Bounded retries for workers that die while training and for worker groups that die while starting
            # (Ray retries the latter forever by default): a trial that keeps failing fails, visibly. Running out of
            # GPU memory is not retried (fail_on_out_of_memory), nor are the workers of a trial Tune stopped
            # (stop_with_trial).
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=objective[0] if objective else None,
                checkpoint_score_order=objective[1] if objective else "max"),
        ),
    )
    trainer.fit()
