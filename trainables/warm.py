"""Warm training processes: each node keeps one process per concurrent trial with the training stack imported, and
a trial's Ray Train worker hands its SFT loop to one of them instead of importing the stack itself.

Why: Ray Train starts a new worker process for every trial, and importing torch, transformers, peft, trl,
bitsandbytes and datasets cost that process 10-11 s of its ~25 s fixed cost on 2 CPUs (bench/README.md, P1;
bitsandbytes alone ~3.8 s: it wraps its kernels in `torch.compile`, which imports dynamo and inductor). A Ray task's
pooled worker process would stay warm too, but Ray kills the workers a task's owner leased when the owner dies, and
the owner (the Train worker) dies whenever Tune stops a trial early. So the warm process is a detached actor of its
own (`WarmHost`), named per node, accelerator set and slot; it runs one trial at a time and exits when no trial has
used it for `IDLE_SECONDS`, or after a trial that failed in it.

Isolation: trials still run one at a time per process, each with its own seed, tokenizer, model, trainer and data,
and the host sets the worker's thread count and visible accelerators before each. All of a host's torch work runs
on one thread of its own (`WarmHost._on_torch_thread`: a second OpenMP team in the process made training 1.3x
slower). tests/test_warm.py checks that a trial run in a host that already ran another one reports exactly the
metrics it reports in a fresh process.

Allocator: a host trains on a thread of its own, and the C library's malloc gives such a thread an arena of its own,
whose heaps it maps and unmaps as the training's large blocks come and go: on 2 CPUs a host's arena did so hundreds
of times a second, faulting the pages back in at every step and interrupting the other CPU to flush its TLB. So a
host preloads jemalloc, the allocator Ray ships and runs its own daemons with, set to keep large blocks for reuse
(`allocator_env`; `resources.allocator: system` keeps the C library's).

Protocol (the Train worker is the owner; same node): `acquire(pid)`, then `run(pid, ...)` in the background while
the owner pulls the reports with `next(pid)`. A report carries the checkpoint directory the host wrote; the host
keeps it until the owner asks for the next report, i.e. until `ray.train.report` has persisted it. If the owner dies
(Tune stopped the trial, or it was killed), the host notices at the next training step or report and ends the run,
staying warm for the next trial.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import queue
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

IDLE_SECONDS = 300.0  # a host no trial has used for this long exits
RETIRE_GRACE_SECONDS = 5.0  # a host whose trial failed exits this long after the failure reached its owner
MAX_SLOTS = 64  # hosts per node and accelerator set: far above any real trial concurrency on one node
ACCELERATOR_ENV = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
# jemalloc serves blocks above `oversize_threshold` (8 MiB by default) from an arena that hands them back to the
# kernel at once; 0 turns that arena off, so activations and logits are reused from step to step like small blocks
# (the default 10 s decay still returns what a finished trial no longer uses).
JEMALLOC_CONF = "oversize_threshold:0"
_END = ("end",)


class OwnerGone(Exception):
    """The Train worker that owns the running trial is gone (Tune stopped the trial, or the process was killed)."""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class WarmHost:
    """One warm process (a Ray actor, see `host_for`). Its methods run in several threads: `run` trains while `next`
    hands the reports out and `acquire` answers other trials."""

    def __init__(self, accelerator_env: dict[str, str], exit_when_unused: bool = True):
        t = time.time()
        # Ray gives a 0-GPU actor no accelerator variables of its own; this host serves the workers that hold
        # exactly these devices (they are part of its name), set before torch first looks at them.
        os.environ.update(accelerator_env)
        from trainables.sft import import_stack

        # All of this process's torch work runs on this one thread (`_on_torch_thread`); see its docstring.
        self._torch_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm-torch")
        self._on_torch_thread(import_stack)
        self.imports_seconds = round(time.time() - t, 3)
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._running = False
        self._retired_at: float | None = None
        self._closing = False
        self._trials = 0
        self._runs: dict[int, queue.Queue] = {}  # owner pid -> its run's reports
        self._acks: dict[int, threading.Event] = {}  # owner pid -> the report it holds, to acknowledge
        self._used_at = time.time()
        if exit_when_unused:
            threading.Thread(target=self._exit_when_unused, daemon=True, name="warm-host-idle").start()

    def _on_torch_thread(self, fn):
        """`fn()` on the host's one torch thread; its result or error, here.

        Ray runs a threaded actor's calls on a pool of threads, and each thread that runs a parallel torch op gets an
        OpenMP thread team of its own, which stays while the thread lives. Once the process has more OpenMP
        threads than CPUs, libgomp stops spin-waiting between parallel regions and puts its threads to sleep
        instead: on 2 CPUs every op then waits for a wake-up, and training ran 1.3-1.5x slower than in a process
        whose one thread did all the work (bench/README.md, "Training in the warm host"). So every trial trains on
        the same thread, the one that imported the stack."""
        return self._torch_thread.submit(fn).result()

    def acquire(self, pid: int, wait_seconds: float = 30.0) -> dict[str, Any] | None:
        """Make the Train worker `pid` this host's owner, if it is free; None if another live worker holds it.

        A host whose owner died is free once the dead owner's run has ended (at its next step): wait that long."""
        deadline = time.time() + wait_seconds
        while True:
            with self._lock:
                if self._retired_at is None and not self._closing:
                    if self._owner is None or (not self._running and not alive(self._owner)):
                        self._owner, self._used_at = pid, time.time()
                        self._runs[pid] = queue.Queue()  # before run starts, so next can already wait on it
                        return {"pid": os.getpid(), "trials_before": self._trials,
                                "imports_seconds": self.imports_seconds if self._trials == 0 else 0.0}
                    waiting_for_dead = not alive(self._owner)
                else:
                    waiting_for_dead = False
            if not waiting_for_dead or time.time() >= deadline:
                return None
            time.sleep(0.2)

    def run(self, pid: int, settings: dict[str, Any], checkpoint_dir: str | None, threads: int,
            gpu_share: float = 0.0) -> dict[str, Any]:
        """Train one trial for its owner `pid`; reports go out through `next`. Returns `sft.train`'s result.
        `gpu_share`: the worker's fraction of its GPU, which this process is held to (`model.limit_gpu_memory`)."""
        import torch
        from transformers import TrainerCallback

        from trainables.model import limit_gpu_memory
        from trainables.settings import TrialSettings
        from trainables.sft import train

        with self._lock:
            if self._owner != pid or self._running:
                raise RuntimeError(f"warm host {os.getpid()}: run by worker {pid}, which does not hold it")
            self._running = True
            reports = self._runs[pid]
        failed = False
        try:
            limit_gpu_memory(gpu_share)

            def report(metrics: dict[str, Any], ckpt_dir: str | None) -> None:
                handled = threading.Event()
                reports.put(("report", metrics, ckpt_dir, handled))
                while not handled.wait(1.0):  # the checkpoint directory must live until the owner persisted it
                    if not alive(pid):
                        raise OwnerGone(pid)

            class OwnerWatch(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    if not alive(pid):
                        raise OwnerGone(pid)

            def train_here() -> dict[str, Any]:
                torch.set_num_threads(threads)
                return train(TrialSettings.model_validate(settings), report, checkpoint_dir=checkpoint_dir,
                             callbacks=[OwnerWatch()])

            return self._on_torch_thread(train_here)
        except OwnerGone:
            log.info("warm host %d: the trial's Train worker %d is gone; run stopped", os.getpid(), pid)
            return {}
        except BaseException:
            failed = True
            raise
        finally:
            reports.put(_END)
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            with self._lock:
                self._trials += 1
                self._running = False
                self._used_at = time.time()
                if failed:  # a failure may leave state behind (CUDA errors, half-built objects): start afresh
                    self._retired_at = time.time()
                if not alive(pid):  # nobody will pull what is left of this run
                    self._runs.pop(pid, None)
                    self._acks.pop(pid, None)
                    if self._owner == pid:
                        self._owner = None

    def next(self, pid: int) -> tuple | None:
        """The owner's next report `(metrics, checkpoint_dir)`, after acknowledging the one it had; None when the
        run ended (its result or error then comes from `run`'s reference)."""
        with self._lock:
            handled = self._acks.pop(pid, None)
            reports = self._runs.get(pid)
        if handled is not None:
            handled.set()
        if reports is None:
            return None
        item = reports.get()
        if item is _END:
            with self._lock:
                self._runs.pop(pid, None)
                if self._owner == pid:
                    self._owner = None
            return None
        _, metrics, ckpt_dir, handled = item
        with self._lock:
            self._acks[pid] = handled
        return metrics, ckpt_dir

    def _exit_when_unused(self) -> None:
        import ray

        while True:
            time.sleep(1.0)
            with self._lock:
                now = time.time()
                free = not self._running and (self._owner is None or not alive(self._owner))
                retired = self._retired_at is not None and now - self._retired_at > RETIRE_GRACE_SECONDS
                idle = now - self._used_at > IDLE_SECONDS
                self._closing = free and (retired or idle)  # no acquire from here on
            if self._closing:
                log.info("warm host %d: exiting (%s)", os.getpid(), "a trial failed in it" if retired else "idle")
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return


def jemalloc_path() -> str | None:
    """The jemalloc library in this Ray installation (Linux wheels ship it for Ray's own daemons), or None."""
    import ray

    path = os.path.join(os.path.dirname(ray.__file__), "core", "libjemalloc.so")
    return path if os.path.exists(path) else None


def allocator_env(allocator: str) -> dict[str, str]:
    """The environment a process that trains (a warm host, or a Train worker that trains itself) starts with for
    `allocator` ("jemalloc" or "system"): jemalloc preloaded ahead of any library already preloaded, with
    `JEMALLOC_CONF` unless MALLOC_CONF is set; nothing for the system's, or where this Ray has no jemalloc."""
    if allocator == "system":
        return {}
    if allocator != "jemalloc":
        raise ValueError(f"resources.allocator: {allocator!r} is not one of jemalloc, system")
    path = jemalloc_path()
    if path is None:
        log.warning("resources.allocator=jemalloc: this Ray has no libjemalloc.so; trials train on the system's malloc")
        return {}
    preload = [path] + [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p and p != path]
    return {"LD_PRELOAD": ":".join(preload), "MALLOC_CONF": os.environ.get("MALLOC_CONF", JEMALLOC_CONF)}


@functools.cache
def _actor_class():
    import ray

    return ray.remote(WarmHost)  # once per process: a trial tries several slots, each through this class


def host_for(slot: int, node_id: str, accelerator_env: dict[str, str], allocator: str, env_vars: dict[str, str]):
    """This node's warm host for these accelerators and this allocator in `slot`, created if it does not exist, with
    `env_vars` (`allocator_env(allocator)`) in its environment."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    devices = ",".join(accelerator_env.get(k, "") for k in ACCELERATOR_ENV if k in accelerator_env) or "cpu"
    name = f"qlora-warm-{node_id[:16]}-{devices}-{slot}" + ("" if allocator == "jemalloc" else f"-{allocator}")
    return _actor_class().options(
        name=name, get_if_exists=True, lifetime="detached", num_cpus=0, max_concurrency=8, max_restarts=0,
        # A namespace of the search's job, as its own anonymous one was: a host runs the code of the search that
        # started it, so two searches on one cluster never share hosts. Named, so that Ray does not print its notice
        # about a detached actor in an anonymous namespace for every host.
        namespace=f"qlora-warm-{ray.get_runtime_context().get_job_id()}",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        # merged into the job's runtime environment: its other variables still reach the host
        runtime_env={"env_vars": env_vars},
    ).remote(accelerator_env)


def run_warm(settings: dict[str, Any], report, checkpoint_dir: str | None, timing: dict[str, Any],
             gpu_share: float = 0.0, allocator: str = "jemalloc") -> None:
    """Run one trial's SFT loop in a warm host on this node; `report(metrics, checkpoint_dir)` is called here, in the
    Train worker, for each of its reports. `timing` gets the host's figures before the first report: its pid, the
    trials it ran before, the seconds this worker waited for it, and its import seconds (0 when it was warm)."""
    import ray

    pid, node_id = os.getpid(), ray.get_runtime_context().get_node_id()
    accelerator_env = {k: os.environ[k] for k in ACCELERATOR_ENV if k in os.environ}
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0)))
    env_vars = allocator_env(allocator)  # once, not per slot tried
    t = time.time()
    for slot in range(MAX_SLOTS):
        host = host_for(slot, node_id, accelerator_env, allocator, env_vars)
        got = ray.get(host.acquire.remote(pid))
        if got is not None:
            break
    else:
        raise RuntimeError(f"no free warm host among {MAX_SLOTS} on node {node_id}")
    timing.update(warm_host_pid=got["pid"], warm_host_trials_before=got["trials_before"],
                  warm_host_seconds=round(time.time() - t, 3), warm_host_imports_seconds=got["imports_seconds"],
                  imports_seconds=round(timing.get("imports_seconds", 0.0) + got["imports_seconds"], 3))
    done = host.run.remote(pid, settings, checkpoint_dir, threads, gpu_share)
    while (item := ray.get(host.next.remote(pid))) is not None:
        report(*item)
    ray.get(done)
