"""The trial's SFT loop (bench P1's settings, STEPS steps) run twice in a Ray actor shaped like a warm host (a
threaded actor whose one torch thread imported the stack and trains), on a local Ray, with the allocator settings
of a variant given as the actor's environment; perf counts the host's memory-map syscalls and page faults over the
second run. Prints one JSON line.

python host_probe.py VARIANT [STEPS]    VARIANT: default | jemalloc | arena1 | jemalloc_keep"""
import concurrent.futures, json, os, subprocess, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import ray
from search.driver import start_local_ray

VARIANT, STEPS = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 150
JEMALLOC = os.path.join(os.path.dirname(ray.__file__), "core", "libjemalloc.so")
ENV = {"default": {}, "jemalloc": {"LD_PRELOAD": JEMALLOC}, "arena1": {"MALLOC_ARENA_MAX": "1"},
       "jemalloc_keep": {"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": "oversize_threshold:0"}}[VARIANT]


class Host:
    def __init__(self):
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.pool.submit(self._imports).result()

    def _imports(self):
        from trainables.sft import import_stack
        import_stack()

    def pid(self):
        return os.getpid(), os.environ.get("LD_PRELOAD", ""), os.environ.get("MALLOC_ARENA_MAX", "")

    def run(self, steps):
        def go():
            import torch
            from bench.run import trial_settings
            from trainables.settings import TrialSettings
            from trainables.sft import train
            torch.set_num_threads(2)
            s = TrialSettings.model_validate(trial_settings(steps, steps, 32))
            return train(s, lambda m, c: None, checkpoints=False)["elapsed_seconds"]
        return self.pool.submit(go).result()


start_local_ray(2)
host = ray.remote(Host).options(num_cpus=0, max_concurrency=8, runtime_env={"env_vars": ENV}).remote()
pid, preload, arenas = ray.get(host.pid.remote())
first = ray.get(host.run.remote(STEPS))
ref = host.run.remote(STEPS)
time.sleep(8)
perf = subprocess.run(["perf", "stat", "-x,", "-p", str(pid), "-e", "syscalls:sys_enter_munmap,syscalls:sys_enter_mmap,"
                       "syscalls:sys_enter_mprotect,syscalls:sys_enter_madvise,page-faults,context-switches",
                       "--", "sleep", "10"], capture_output=True, text=True).stderr
second = ray.get(ref)
counts = {l.split(",")[2].replace("syscalls:sys_enter_", ""): round(int(l.split(",")[0]) / 10)
          for l in perf.splitlines() if l and l[0].isdigit()}
print(json.dumps({"variant": VARIANT, "preload": bool(preload), "arenas": arenas, "steps": STEPS,
                  "first_run_s": first, "second_run_s": second, "per_s_in_second_run": counts}), flush=True)
