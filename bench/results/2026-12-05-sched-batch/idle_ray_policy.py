"""An idle local Ray with 10 idle actors, every thread of every Ray process put at one scheduling policy.

python idle_ray_policy.py none|batch|idle &   (then time `python steps.py main` beside it)"""
import os, sys, time
import ray
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from search.driver import start_local_ray

POLICY = {"none": None, "batch": os.SCHED_BATCH, "idle": os.SCHED_IDLE}[sys.argv[1]]
start_local_ray(2)


def set_all_threads(pid):
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setscheduler(int(tid), POLICY, os.sched_param(0)); n += 1
        except OSError:
            pass
    return n


@ray.remote(num_cpus=0)
class Idle:
    def ping(self):
        return os.getpid()


actors = [Idle.remote() for _ in range(10)]
print(ray.get([a.ping.remote() for a in actors]))
if POLICY is not None:
    import psutil
    me = psutil.Process()
    for p in psutil.process_iter(["cmdline"]):
        c = " ".join(p.info["cmdline"] or [])
        if ("ray" in c) and "steps.py" not in c:
            set_all_threads(p.pid)
print("ready", flush=True)
time.sleep(600)
