"""The same trial's SFT loop run three times in one process, no Ray, on one non-main thread that also imported the
stack (as a warm host does), with each run's user and system CPU seconds and page faults.

python twice_thread.py STEPS [main]"""
import concurrent.futures, json, resource, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from bench.run import trial_settings
from trainables.settings import TrialSettings


def runs(steps):
    from trainables.sft import import_stack, train
    import_stack()
    import torch
    torch.set_num_threads(2)
    s = TrialSettings.model_validate(trial_settings(steps, steps, 32))
    for i in range(3):
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.time()
        out = train(s, lambda m, c: None, checkpoints=False)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        rss = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
        print(json.dumps({"run": i + 1, "elapsed_s": out.get("elapsed_seconds"), "wall_s": round(time.time() - t, 2),
                          "user_s": round(r1.ru_utime - r0.ru_utime, 1), "sys_s": round(r1.ru_stime - r0.ru_stime, 1),
                          "minflt": r1.ru_minflt - r0.ru_minflt, "rss_mib": round(rss)}), flush=True)


steps = int(sys.argv[1])
if sys.argv[2:] == ["main"]:
    runs(steps)
else:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(runs, steps).result()
