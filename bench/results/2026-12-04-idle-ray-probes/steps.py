"""Steps on the main thread vs on a fresh non-main thread, each in its own fresh process."""
import sys, threading, time, os
way = sys.argv[1]
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from bench.run import trial_settings
from trainables.model import load_peft_model
from trainables.settings import TrialSettings
STEPS = int(os.environ.get("STEPS", 20))
def run():
    torch.set_num_threads(2)
    s = TrialSettings.model_validate(trial_settings(STEPS, STEPS, 8))
    model = load_peft_model(s.model, s.lora); model.train()
    batch = torch.randint(0, model.config.vocab_size, (s.optim.batch_size, 70), generator=torch.Generator().manual_seed(0))
    for _ in range(3): model(input_ids=batch, labels=batch).loss.backward()
    t = time.perf_counter()
    for _ in range(STEPS): model(input_ids=batch, labels=batch).loss.backward()
    return (time.perf_counter() - t) / STEPS
if way == "main":
    r = run()
else:
    out = {}
    th = threading.Thread(target=lambda: out.update(r=run())); th.start(); th.join(); r = out["r"]
print(way, round(r, 4))
