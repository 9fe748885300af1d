"""Where a trial's worker-group start goes: run one search on a shared local Ray, then read every actor's and
task's state transitions from Ray's state API (GCS task events) and every worker process's launch times."""
import json, os, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, os.getcwd())
from bench.run import SharedRay, CONFIG, ROOT

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
extra = sys.argv[2:]
ray_ = SharedRay(2)
from ray.util.state import list_tasks, list_workers, list_actors
try:
    name = "probe"
    cmd = [sys.executable, "-m", "search.run", "--config", CONFIG, "--name", name,
           "--set", "trial.optim.max_steps=8", "--set", "trial.eval.every_steps=4", "--set", "trial.eval.max_examples=16",
           "--set", f"output_dir={out/'runs'}", "--set", f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db",
           "--set", f"model_cache={ROOT/'.cache'}", "--set", "test_evaluation=false",
           "--set", "num_trials=4", "--set", "max_concurrent_trials=1", "--set", "resources.cpus_per_worker=1",
           "--set", "searcher.algorithm=random", "--set", "scheduler.type=none",
           "--set", f"ray_address={ray_.address}", *extra]
    def busy():
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    t0, b0 = time.time(), busy()
    rc = subprocess.call(cmd, stdout=open(out/"search.log", "w"), stderr=subprocess.STDOUT)
    print("search rc", rc, "wall", round(time.time()-t0, 1), "busy CPU s", round(busy() - b0, 1))
    time.sleep(2)
    tasks = list_tasks(detail=True, limit=10000, raise_on_missing_output=False)
    workers = list_workers(detail=True, limit=10000, raise_on_missing_output=False)
    actors = list_actors(detail=True, limit=10000, raise_on_missing_output=False)
    json.dump({"tasks": [t.__dict__ if hasattr(t,'__dict__') else t for t in tasks],
               "workers": [w.__dict__ if hasattr(w,'__dict__') else w for w in workers],
               "actors": [a.__dict__ if hasattr(a,'__dict__') else a for a in actors]},
              open(out/"state.json", "w"), default=str)
finally:
    ray_.close()
