"""Warm hosts (trainables/warm.py): later trials on a node train in a process that already imported the stack, a
trial trained there reports exactly what it reports in a fresh process, a trial Tune stops leaves its host free and
warm for the next, a failed trial retires its host, a killed host costs one Train retry; trials sharing a GPU train
in hosts of their own, each held to its share, and one that runs out of GPU memory fails at once. Real local Ray,
real Train V2 runs, the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def local_ray():
    import ray

    from search.driver import start_local_ray

    start_local_ray(2)
    yield ray
    ray.shutdown()


def _fit(settings: dict, storage: str, name: str, warm: bool = True):
    from ray.train import RunConfig, ScalingConfig

    from trainables.ray_trainable import TrialResources, train_worker, trainer_class

    result = trainer_class(TrialResources())(
        train_loop_per_worker=train_worker,
        train_loop_config={"settings": settings, "warm": warm, "timing": {}},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=storage),
    ).fit()
    assert result.error is None, result.error
    return result.metrics


CURVE = ("step", "train_loss", "eval_loss", "val_f1")


def test_later_trials_reuse_the_warm_host_and_report_what_a_fresh_process_reports(fast_settings, local_ray,
                                                                                  tmp_path):
    a = fast_settings.model_dump()
    b = fast_settings.with_values({"optim.learning_rate": 3e-3, "lora.r": 4, "seed": 7}).model_dump()
    fresh = _fit(a, str(tmp_path), "fresh", warm=False)
    first = _fit(a, str(tmp_path), "a1")
    other = _fit(b, str(tmp_path), "b")
    again = _fit(a, str(tmp_path), "a2")

    # one host served all three; it imported the stack once, for the first
    assert first["warm_host_pid"] == other["warm_host_pid"] == again["warm_host_pid"]
    assert [m["warm_host_trials_before"] for m in (first, other, again)] == [0, 1, 2]
    assert first["imports_seconds"] > 1.0  # torch & co, in the host
    assert other["imports_seconds"] < 1.0 and again["imports_seconds"] < 1.0
    assert "warm_host_pid" not in fresh
    # the host runs on jemalloc (resources.allocator's default), and the job's environment still reaches it
    host = first["warm_host_pid"]
    assert "libjemalloc.so" in open(f"/proc/{host}/maps").read()
    assert "libjemalloc.so" not in open(f"/proc/{os.getpid()}/maps").read()
    environ = dict(v.split("=", 1) for v in open(f"/proc/{host}/environ").read().split("\0") if "=" in v)
    assert environ["MALLOC_CONF"] == "oversize_threshold:0" and environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    # a local Ray drains no node: Ray Train's preemption watcher, an actor per run, is not started
    from ray.util.state import list_actors

    assert list_actors(filters=[("class_name", "=", "PreemptionWatcher")]) == []
    assert len(list_actors(filters=[("class_name", "=", "TrainController")])) == 4  # the filter finds Train's actors
    # the host lives in a namespace of this job's own (hosts are never shared between searches), a named one: Ray
    # prints a notice for each detached actor created in an anonymous namespace
    import ray

    hosts = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("qlora-warm-")]
    assert [a["namespace"] for a in hosts] == [f"qlora-warm-{ray.get_runtime_context().get_job_id()}"]
    # isolation: the same settings give the same curve in a fresh Train worker, a new host and a host that ran others
    for m in (first, again):
        assert {k: m[k] for k in CURVE} == {k: fresh[k] for k in CURVE}
    assert other["train_loss"] != first["train_loss"]


def test_allocator_env_preloads_rays_jemalloc_before_other_preloads_and_keeps_a_users_malloc_conf(monkeypatch):
    from trainables.warm import JEMALLOC_CONF, allocator_env, jemalloc_path

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    path = jemalloc_path()
    assert path and os.path.isfile(path)  # the Linux Ray wheel ships it
    assert allocator_env("jemalloc") == {"LD_PRELOAD": path, "MALLOC_CONF": JEMALLOC_CONF}
    assert allocator_env("system") == {}
    monkeypatch.setenv("LD_PRELOAD", f"/opt/other.so:{path}")
    monkeypatch.setenv("MALLOC_CONF", "background_thread:true")
    assert allocator_env("jemalloc") == {"LD_PRELOAD": f"{path}:/opt/other.so", "MALLOC_CONF": "background_thread:true"}
    with pytest.raises(ValueError, match="resources.allocator"):
        allocator_env("tcmalloc")


def test_a_stopped_trial_frees_its_warm_host_for_the_next(fast_settings, local_ray, tmp_path):
    """Tune stops each trial at its first report (as ASHA does at a rung): its Train worker dies while the host
    trains; the host ends that run at its next step and the next trial gets it, warm."""
    from ray import tune

    from trainables.ray_trainable import TRIAL_RESOURCES, TrialResources, run_trial

    base = fast_settings.with_values({"optim.max_steps": 60, "eval.every_steps": 3}).model_dump()
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, resources=TrialResources(), storage_path=str(tmp_path / "train")),
        TRIAL_RESOURCES)
    results = tune.Tuner(
        trainable, param_space={"seed": tune.grid_search([1, 2, 3])},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), stop={"step": 3}, verbose=0),
    ).fit()
    frames = [r.metrics_dataframe for r in results]
    assert all(list(f["step"]) == [3] for f in frames)  # each stopped at its first report, 57 steps short
    hosts = {int(f["warm_host_pid"].iloc[0]) for f in frames}
    assert len(hosts) == 1
    assert sorted(int(f["warm_host_trials_before"].iloc[0]) for f in frames) == [0, 1, 2]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_host_protocol_acknowledge_owner_gone_and_retire_on_failure(fast_settings, monkeypatch):
    """The host's methods in this process (no actor): a report is held until the owner asks for the next one, a run
    whose owner died stops and frees the host, and a run that fails retires it."""
    import trainables.sft as sft
    from trainables.warm import WarmHost

    host = WarmHost({}, exit_when_unused=False)
    me = os.getpid()
    held = []

    def two_reports(settings, report, checkpoint_dir=None, callbacks=()):
        report({"step": 1}, "/ckpt/1")
        held.append("after 1")
        report({"step": 2}, None)
        return {"step": 2}

    monkeypatch.setattr(sft, "train", two_reports)
    assert host.acquire(me)["trials_before"] == 0
    assert host.acquire(me + 1, wait_seconds=0) is None  # held by a live owner
    out = {}
    t = threading.Thread(target=lambda: out.update(host.run(me, fast_settings.model_dump(), None, 1)))
    t.start()
    assert host.next(me) == ({"step": 1}, "/ckpt/1")
    t.join(0.5)
    assert held == []  # report 1 (and its checkpoint directory) is held until the owner handled it
    assert host.next(me) == ({"step": 2}, None)
    assert host.next(me) is None
    t.join(5)
    assert held == ["after 1"] and out == {"step": 2}

    # the owner dies while the run waits for it: the run ends, the host is free again
    gone = _dead_pid()
    assert host.acquire(gone)["trials_before"] == 1
    assert host.run(gone, fast_settings.model_dump(), None, 1) == {}
    assert host.acquire(me)["imports_seconds"] == 0.0

    def boom(*a, **k):
        raise ValueError("bad batch")

    monkeypatch.setattr(sft, "train", boom)
    with pytest.raises(ValueError):
        host.run(me, fast_settings.model_dump(), None, 1)
    assert host.acquire(me, wait_seconds=0) is None  # retired: the next trial gets a fresh host


def test_a_host_imports_and_trains_every_trial_on_one_thread_whichever_thread_calls_it(fast_settings, monkeypatch):
    """Ray runs a threaded actor's calls on several threads. Each thread that runs parallel torch ops keeps an OpenMP
    team of its own, and with more OpenMP threads than CPUs every op waits for a wake-up (training 1.3x slower in the
    host, bench/README.md): so the host runs all its torch work, the imports and every trial, on one thread."""
    import trainables.sft as sft
    from trainables.warm import WarmHost

    imported_on, trained_on, called_from = [], [], []
    monkeypatch.setattr(sft, "import_stack", lambda: imported_on.append(threading.get_native_id()))

    def record(settings, report, checkpoint_dir=None, callbacks=()):
        trained_on.append(threading.get_native_id())
        return {"step": 0}

    monkeypatch.setattr(sft, "train", record)
    host = WarmHost({}, exit_when_unused=False)
    me = os.getpid()
    for _ in range(3):  # each trial's run called from a new thread, as Ray's pool may do
        assert host.acquire(me) is not None

        def call():
            called_from.append(threading.get_native_id())
            host.run(me, fast_settings.model_dump(), None, 1)

        t = threading.Thread(target=call)
        t.start()
        t.join(30)
        assert host.next(me) is None  # the run ended; the host is free for the next trial
    assert len(trained_on) == 3 and set(trained_on) == set(imported_on)
    assert not set(called_from) & set(trained_on) and threading.get_native_id() not in trained_on


def test_a_killed_warm_host_fails_the_attempt_and_train_retries_in_a_new_one(fast_settings, local_ray, tmp_path):
    """The host process dies mid-trial (OOM killer, kill -9): the Train worker's attempt fails, Ray Train retries it
    (FailureConfig), and the retry gets a new host."""
    import time

    import psutil
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from trainables.ray_trainable import TrialResources, train_worker, trainer_class

    settings = fast_settings.with_values({"optim.max_steps": 24, "eval.every_steps": 3}).model_dump()
    killed = []

    def kill_host_after_its_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            ckpts = list((tmp_path / "killed").glob("checkpoint_*"))
            hosts = [p for p in psutil.process_iter(["cmdline"])
                     if (p.info["cmdline"] or [""])[0].startswith("ray::WarmHost")]
            if ckpts and hosts:
                hosts[0].kill()
                killed.append(hosts[0].pid)
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_host_after_its_first_checkpoint)
    watcher.start()
    result = trainer_class(TrialResources())(
        train_loop_per_worker=train_worker,
        train_loop_config={"settings": settings, "warm": True, "timing": {}},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="killed", storage_path=str(tmp_path), failure_config=FailureConfig(max_failures=1)),
    ).fit()
    watcher.join()
    assert killed, "no warm host was seen"
    assert result.error is None, result.error
    assert result.metrics["step"] == 24
    assert result.metrics["warm_host_pid"] != killed[0]
    assert result.metrics["warm_host_trials_before"] == 0  # a new host


@pytest.fixture
def local_ray_one_gpu():
    """A local Ray told this machine has one GPU. None exists here: Ray only accounts for it and sets the
    CUDA_VISIBLE_DEVICES of the workers it gives a share to; training itself runs on the CPU."""
    import ray

    from search.driver import start_local_ray

    start_local_ray(2, num_gpus=1)
    yield ray
    ray.shutdown()


def _two_trials_on_halves_of_gpu_0(base: dict, tmp_path, key: str, values: list, warm: bool = True):
    """Two trials at once through `run_trial` (1 CPU and half of GPU 0 each, Train's default 2 retries), one for each
    of the two `values` of setting `key`; Tune's ResultGrid."""
    from ray import tune

    from trainables.ray_trainable import TRIAL_RESOURCES, TrialResources, run_trial

    resources = TrialResources(cpus_per_worker=1, gpus_per_worker=0.5, warm=warm)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, resources=resources, storage_path=str(tmp_path / "train")),
        TRIAL_RESOURCES)
    return tune.Tuner(
        trainable, param_space={key: tune.grid_search(values)},
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0),
    ).fit()


def test_trials_sharing_one_gpu_train_at_once_in_separate_warm_hosts(fast_settings, local_ray_one_gpu, tmp_path):
    """resources.gpus_per_worker 0.5: two trials hold half of GPU 0 each, at the same time. They get that GPU's
    hosts in two slots, never one host for both."""
    ray = local_ray_one_gpu
    base = fast_settings.with_values({"optim.max_steps": 40, "eval.every_steps": 20}).model_dump()
    results = _two_trials_on_halves_of_gpu_0(base, tmp_path, "seed", [1, 2])
    assert not results.errors
    frames = [r.metrics_dataframe for r in results]
    assert all(list(f["step"]) == [20, 40] for f in frames)
    assert len({int(f["warm_host_pid"].iloc[0]) for f in frames}) == 2
    hosts = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith("qlora-warm-"))
    assert [name.rsplit("-", 2)[1:] for name in hosts] == [["0", "0"], ["0", "1"]]  # GPU "0", slots 0 and 1


def _gpu_out_of_memory_for_rank_8(record_dir: str):
    """A Ray `worker_process_setup_hook` for every process of the test's cluster. It stands in for a GPU, which does
    not exist here: a trial with LoRA rank 8 meets the error torch's CUDA allocator raises when a batch does not fit
    (`torch.OutOfMemoryError`, its message as a 24 GB GPU words it) at step 9, after its step-6 checkpoint; every time
    that happens is appended to `attempts`. It also records the GPU share each process is held to (`share-<pid>`),
    the limit itself a no-op without CUDA, and the memory allocator of each process that trains (`malloc-<pid>`)."""

    def hook():
        import os

        import trainables.model as model
        import trainables.sft as sft

        limit, train = model.limit_gpu_memory, sft.train

        def limit_gpu_memory(share):
            with open(f"{record_dir}/share-{os.getpid()}", "a") as f:
                f.write(f"{share}\n")
            limit(share)

        def train_on_a_small_gpu(settings, report, **kw):
            with open(f"{record_dir}/malloc-{os.getpid()}", "w") as f:  # the allocator of the process that trains
                f.write("jemalloc" if "libjemalloc.so" in open("/proc/self/maps").read() else "system")
            if settings.lora.r == 8:
                import torch
                from transformers import TrainerCallback

                class OutOfMemory(TrainerCallback):
                    def on_step_end(self, args, state, control, **_):
                        if state.global_step == 9:
                            with open(f"{record_dir}/attempts", "a") as f:
                                f.write(f"{os.getpid()}\n")
                            raise torch.OutOfMemoryError(
                                "CUDA out of memory. Tried to allocate 2.32 GiB. GPU 0 has a total capacity of 22.07 "
                                "GiB of which 1.19 GiB is free. Of the allocated memory 18.01 GiB is allocated by "
                                "PyTorch.")

                kw["callbacks"] = [*(kw.get("callbacks") or []), OutOfMemory()]
            return train(settings, report, **kw)

        model.limit_gpu_memory, sft.train = limit_gpu_memory, train_on_a_small_gpu

    return hook


@pytest.mark.parametrize("warm", [True, False], ids=["warm-host", "train-worker"])
def test_a_trial_out_of_gpu_memory_fails_at_once_saying_what_to_change_and_others_go_on(fast_settings, tmp_path,
                                                                                         warm):
    """Running out of GPU memory is decided by the trial's settings and GPU share: a retry from its checkpoint runs
    out again at the same batch. Train would retry it `max_failures` times; the trial fails at its first out-of-memory
    error instead, with a message naming the settings to change, while the trial beside it trains to the end. The
    process that trains each trial (its warm host, or the Train worker itself) is held to the trial's share of the
    GPU. Real local Ray (one GPU declared, none here), real Train runs with retries allowed, the tiny model; the GPU's
    error is stood in for (`_gpu_out_of_memory_for_rank_8`)."""
    import ray

    from search.driver import start_local_ray
    from trainables.ray_trainable import error_line

    record = tmp_path / "record"
    record.mkdir()
    start_local_ray(2, num_gpus=1, runtime_env={"worker_process_setup_hook": _gpu_out_of_memory_for_rank_8(
        str(record))})
    try:
        base = fast_settings.with_values({"optim.max_steps": 12, "eval.every_steps": 6}).model_dump()
        results = _two_trials_on_halves_of_gpu_0(base, tmp_path, "lora.r", [4, 8], warm=warm)  # max_failures 2
    finally:
        ray.shutdown()

    by_rank = {r.config["lora.r"]: r for r in results}
    assert by_rank[4].error is None and by_rank[4].metrics["step"] == 12
    failed = by_rank[8]
    assert failed.error is not None
    assert list(failed.metrics_dataframe["step"]) == [6]  # its checkpoint before the error, and nothing after
    assert len((record / "attempts").read_text().split()) == 1  # not retried, though max_failures is 2
    assert error_line(failed.error) == (
        "out of GPU memory (CUDA out of memory. Tried to allocate 2.32 GiB) with trial.optim.batch_size=8, "
        "trial.data.max_length=96, lora.r=8, trial.model.gradient_checkpointing=false and "
        "resources.gpus_per_worker=0.5. Not retried: it would run out again at the same batch. Lower "
        "trial.optim.batch_size or trial.data.max_length, set trial.model.gradient_checkpointing=true, or give each "
        "trial more of a GPU (a larger resources.gpus_per_worker).")
    shares = [p.read_text().split() for p in record.glob("share-*")]
    assert sorted(s for per_process in shares for s in per_process) == ["0.5", "0.5"]  # each trial's host, once
    # a warm host and a Train worker that trains itself both run on jemalloc (resources.allocator's default)
    allocators = [p.read_text() for p in record.glob("malloc-*")]
    assert allocators and set(allocators) == {"jemalloc"}


def test_a_gpu_share_holds_the_process_to_that_fraction_of_its_gpu(monkeypatch):
    """`limit_gpu_memory` on a CUDA machine (stood in for: torch.cuda's two calls are replaced, no GPU here)."""
    import torch

    from trainables.model import limit_gpu_memory

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    monkeypatch.setenv("LOCAL_RANK", "1")
    limit_gpu_memory(0.25)
    limit_gpu_memory(2.0)  # a whole GPU or more: no limit (a warm host may have been held to less before)
    limit_gpu_memory(0.0)  # a CPU trial: nothing
    assert calls == [(0.25, 1), (1.0, 1)]
