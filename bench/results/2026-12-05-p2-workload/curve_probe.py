"""Learning curves of P2-sized trials outside Ray: when does the objective (val F1) start to say something?

    python bench/results/2026-12-05-p2-workload/curve_probe.py OUT.jsonl lr=5e-3 batch=16 steps=24 every=2 [r=16 ...]

One trial of the benchmark's settings (bench.run.trial_settings: the tiny model, 4-bit + LoRA, 64 validation
messages) with the given values, trained by trainables.sft.train on one torch thread (a P2 search's one CPU). Appends
one JSON line: the settings and each evaluation's (step, seconds since start, val_f1, val_loss, val_ap).
"""
import json
import sys
import time

import torch

torch.set_num_threads(1)
from bench.run import trial_settings  # noqa: E402
from trainables.settings import TrialSettings  # noqa: E402
from trainables.sft import train  # noqa: E402

out, *pairs = sys.argv[1:]
kv = dict(p.split("=", 1) for p in pairs)
steps, every = int(kv.get("steps", 24)), int(kv.get("every", 2))
d = trial_settings(steps, every, int(kv.get("eval_examples", 64)))
d["optim"]["learning_rate"] = float(kv.get("lr", 5e-3))
d["optim"]["batch_size"] = int(kv.get("batch", 16))
d["lora"]["r"] = int(kv.get("r", 16))
d["lora"]["alpha_per_rank"] = float(kv.get("alpha", 2))
d["data"]["oversample_minority"] = float(kv.get("os", 0.3))
if "sched" in kv:
    d["optim"]["lr_scheduler"] = kv["sched"]
if "seed" in kv:
    d["seed"] = int(kv["seed"])
s = TrialSettings.model_validate(d)
t0 = time.time()
curve = []
train(s, lambda m, _c: curve.append({"step": m.get("step"), "t": round(time.time() - t0, 2),
                                     "f1": m.get("val_f1"), "loss": m.get("eval_loss"), "ap": m.get("val_ap"), "bal_f1": m.get("val_bal_f1")}),
      checkpoints=False)
with open(out, "a") as f:
    f.write(json.dumps({"args": kv, "curve": curve}) + "\n")
print(kv, [(c["step"], c["t"], round(c["f1"] or 0, 3), round(c["loss"] or 0, 2), round(c["bal_f1"] or 0, 2)) for c in curve])
