"""One P2-sized trial outside Ray on a given tiny base: does a longer-pre-trained base make F1 less seed-dependent?

    PYTHONPATH=. python bench/results/2026-12-06-base-pretraining/probe.py OUT.jsonl model=DIR lr=3e-3 r=16 seed=0

P2's trial settings (bench.run.trial_settings: 192 steps of batch 4, evaluations of all 516 validation messages at
ASHA's rungs 16, 48, 144 and the last step) with the given values, on the base in `model` (a directory
`python -m trainables.tiny --out DIR --pretrain-steps N` wrote), trained by trainables.sft.train on one torch thread
(a P2 search's one CPU). Appends one JSON line: the settings and each evaluation's (step, seconds, val_f1, eval_loss).
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
d = trial_settings(192, 16, 516)
d["model"]["name_or_path"] = kv["model"]
d["eval"]["at_steps"] = [16, 48, 144]
d["optim"]["learning_rate"] = float(kv.get("lr", 3e-3))
d["optim"]["batch_size"] = 4
d["lora"]["r"] = int(kv.get("r", 16))
d["lora"]["alpha_per_rank"] = float(kv.get("alpha", 2))
d["data"]["oversample_minority"] = float(kv.get("os", 0.3))
d["seed"] = int(kv.get("seed", 0))
s = TrialSettings.model_validate(d)
t0 = time.time()
curve = []
train(s, lambda m, _c: curve.append({"step": m.get("step"), "t": round(time.time() - t0, 2),
                                     "f1": m.get("val_f1"), "loss": m.get("eval_loss")}), checkpoints=False)
with open(out, "a") as f:
    f.write(json.dumps({"args": kv, "curve": curve}) + "\n")
print(kv, [(c["step"], c["t"], round(c["f1"] or 0, 3), round(c["loss"] or 0, 2)) for c in curve], flush=True)
