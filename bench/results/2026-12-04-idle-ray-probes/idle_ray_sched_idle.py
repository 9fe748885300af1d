import os, time, ray, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from search.driver import start_local_ray
MODE = sys.argv[1]
start_local_ray(2)
def idle_all_threads(pid="self"):
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0)); n += 1
        except OSError:
            pass
    return n
@ray.remote(num_cpus=0)
class Idle:
    def ping(self):
        return idle_all_threads() if MODE in ("actors", "all") else 0
actors = [Idle.remote() for _ in range(10)]
print(ray.get([a.ping.remote() for a in actors]))
if MODE == "all":
    import psutil
    me = psutil.Process()
    for p in psutil.process_iter(["cmdline"]):
        c = " ".join(p.info["cmdline"] or [])
        if p.pid != me.pid and ("ray" in c) and "steps.py" not in c:
            idle_all_threads(p.pid)
print("ready", flush=True)
time.sleep(600)
