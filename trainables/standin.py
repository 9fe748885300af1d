"""A fast stand-in for the QLoRA trial: the same Tune interface and reports as `trainables.ray_trainable`, no model.

    python -m search.run --set trainable=trainables.standin:run_trial --set num_trials=200

runs the real driver, searcher, scheduler, MLflow tracking and summary over a synthetic objective, to measure their
bookkeeping cost or to rehearse faults (kill, resume, Ctrl-C) in seconds. Each trial "trains" for
`SECONDS_PER_STEP` per optimizer step, reports at the steps the real loop evaluates (`eval.every_steps` or
`eval.at_steps`), and writes a checkpoint (a safetensors tensor, trial_settings.json, metrics.json) under
`<storage_path>/standin-<trial id>/`.
A restarted trial continues from its latest checkpoint there, as a Train run does from its own storage.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from trainables import metrics as M
from trainables.settings import TrialSettings

SECONDS_PER_STEP = 0.01


def score(s: TrialSettings, step: int) -> float:
    """A smooth synthetic F1 that peaks near lr=5e-3, r=16 and grows with the steps trained."""
    lr_term = (math.log10(s.optim.learning_rate) - math.log10(5e-3)) ** 2
    r_term = abs(math.log2(s.lora.r / 16)) / 8
    progress = step / s.optim.max_steps
    return max(0.0, min(1.0, (0.92 - 0.5 * lr_term - r_term) * (0.4 + 0.6 * progress)))


def _latest(run_dir: Path) -> Path | None:
    done = sorted(p for p in run_dir.glob("checkpoint_*") if (p / "metrics.json").exists())
    return done[-1] if done else None


def run_trial(config: dict[str, Any], *, base: dict[str, Any], resources=None, storage_path: str,
              max_failures: int = 2, objective=None) -> None:
    """Tune function trainable with `run_trial`'s signature (resources, max_failures and objective are accepted,
    unused: every checkpoint is kept)."""
    import numpy as np
    import ray.tune
    from safetensors.numpy import save_file

    s = TrialSettings.model_validate(base).with_values(config)
    run_dir = Path(storage_path) / f"standin-{ray.tune.get_context().get_trial_id()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = _latest(run_dir)
    step = json.loads((latest / "metrics.json").read_text())[M.STEP] if latest else 0
    for nxt in [x for x in s.eval.steps(s.optim.max_steps) if x > step]:
        time.sleep(SECONDS_PER_STEP * (nxt - step))
        step = nxt
        f1 = score(s, step)
        metrics = {M.STEP: step, M.F1: f1, M.PRECISION: f1, M.RECALL: f1, M.F1_BALANCED: f1,
                   M.EVAL_LOSS: 1.0 - f1, "pid": os.getpid()}
        ckpt = run_dir / f"checkpoint_{step:06d}"
        tmp = run_dir / f".tmp_{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({"lora_A": np.full((2, 2), f1, dtype=np.float32)}, str(tmp / "adapter_model.safetensors"))
        (tmp / "trial_settings.json").write_text(s.model_dump_json(indent=2))
        (tmp / "metrics.json").write_text(json.dumps(metrics))
        tmp.replace(ckpt)
        ray.tune.report({**metrics, "checkpoint_path": str(ckpt)})


def test_metrics(adapter_dir: str) -> dict[str, float]:
    """The stand-in's 'test' score: its last validation F1 (there is no model to evaluate)."""
    f1 = json.loads((Path(adapter_dir) / "metrics.json").read_text())[M.F1]
    return {"test_f1": f1, "test_precision": f1, "test_recall": f1, "test_examples": 0}
