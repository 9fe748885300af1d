"""Resident memory of a warm-host-shaped Ray actor (see host_probe.py) over RUNS runs of the trial's SFT loop
(STEPS steps each), with the allocator settings of the search's warm hosts (trainables.warm.allocator_env).
Prints one JSON line: each run's seconds and the process's resident MiB after it, and its peak.

python host_rss.py jemalloc|system [RUNS] [STEPS]"""
import concurrent.futures, json, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import ray
from search.driver import start_local_ray
from trainables.warm import allocator_env

ALLOC = sys.argv[1]
RUNS, STEPS = (int(a) for a in (sys.argv[2:] + ["6", "60"])[:2]) if len(sys.argv) > 2 else (6, 60)


def status_mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) // 1024


class Host:
    def __init__(self):
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.pool.submit(lambda: __import__("trainables.sft", fromlist=["import_stack"]).import_stack()).result()

    def run(self, steps):
        def go():
            import torch
            from bench.run import trial_settings
            from trainables.settings import TrialSettings
            from trainables.sft import train
            torch.set_num_threads(2)
            s = TrialSettings.model_validate(trial_settings(steps, steps, 32))
            return train(s, lambda m, c: None, checkpoints=False)["elapsed_seconds"]
        t = self.pool.submit(go).result()
        time.sleep(12)  # past jemalloc's 10 s decay
        return t, status_mib("VmRSS"), status_mib("VmHWM")


start_local_ray(2)
host = ray.remote(Host).options(num_cpus=0, max_concurrency=8,
                                runtime_env={"env_vars": allocator_env(ALLOC)}).remote()
runs = [ray.get(host.run.remote(STEPS)) for _ in range(RUNS)]
print(json.dumps({"allocator": ALLOC, "steps": STEPS, "seconds": [r[0] for r in runs],
                  "rss_mib_after_each": [r[1] for r in runs], "peak_rss_mib": runs[-1][2]}), flush=True)
