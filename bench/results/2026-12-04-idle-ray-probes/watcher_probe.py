"""Per Train run on a local Ray: the PreemptionWatcher actors started and the CPU seconds their processes used."""
import os, sys, time, json, threading
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
mode = sys.argv[1]
if mode == "on":
    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"
from search.driver import start_local_ray
from tests.test_warm import _fit
start_local_ray(2)
import tests.conftest as c  # noqa: F401 (imported for what it sets up)
cpu = {}
stop = False
def watch():
    hz = os.sysconf("SC_CLK_TCK")
    while not stop:
        for pid in os.listdir("/proc"):
            if not pid.isdigit(): continue
            try:
                if b"PreemptionWatcher" in open(f"/proc/{pid}/cmdline", "rb").read():
                    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                    cpu[pid] = (int(f[11]) + int(f[12])) / hz
            except OSError: pass
        time.sleep(0.2)
threading.Thread(target=watch, daemon=True).start()
from bench.run import trial_settings
s = trial_settings(60, 30, 32)
t = time.time()
for i in range(3):
    _fit(s, __import__("tempfile").mkdtemp(prefix="watcher-probe-"), f"{mode}-{i}-{int(t)}")
elapsed = time.time() - t
time.sleep(1)
stop = True
from ray.util.state import list_actors
n = len(list_actors(filters=[("class_name", "=", "PreemptionWatcher")], limit=1000))
print(json.dumps({"mode": mode, "train_runs": 3, "watcher_actors": n, "watcher_processes": len(cpu),
                  "watcher_cpu_seconds": round(sum(cpu.values()), 2), "elapsed_s": round(elapsed, 1)}))
