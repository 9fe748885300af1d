"""The same trial's SFT loop trained twice in one process, no Ray: does the second train slower?"""
import sys, json, gc, ctypes
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from bench.run import trial_settings
from trainables.settings import TrialSettings
from trainables.sft import import_stack, train
import_stack()
import torch
torch.set_num_threads(2)
steps = int(sys.argv[1]); trim = len(sys.argv) > 2
s = TrialSettings.model_validate(trial_settings(steps, steps, 32))
for i in range(3):
    r = train(s, lambda m, c: None, checkpoints=False)
    rss = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    print(json.dumps({"run": i + 1, "elapsed_s": r.get("elapsed_seconds"), "rss_mib": round(rss)}), flush=True)
    if trim:
        gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
