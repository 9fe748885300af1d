"""The bare SFT loop, the baseline of benchmark P1: one trial's settings trained in a plain Python process.

    python -m bench.bare SETTINGS.json OUT.json

No Ray, no MLflow, no checkpoints: imports, data preparation, model load (4-bit + LoRA), TRL's SFTTrainer for the
same steps with the same evaluations as a trial. The parent times the whole process (Python start included);
OUT.json gets where the time went inside it.
"""

from __future__ import annotations

import time

STARTED = time.time()

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def main(argv: list[str]) -> int:
    settings_path, out_path = argv
    from trainables.settings import TrialSettings

    settings = TrialSettings.model_validate_json(Path(settings_path).read_text())
    t = time.time()
    from trainables.sft import import_stack, train

    import_stack()

    imports = time.time() - t
    reports: list[dict] = []
    result = train(settings, lambda metrics, _ckpt: reports.append(metrics), checkpoints=False)
    out = {k: result.get(k) for k in ("data_seconds", "model_load_seconds", "eval_seconds_total", "elapsed_seconds")}
    out.update(imports_seconds=round(imports, 3), started_at=STARTED, ended_at=time.time(),
               steps=result.get("step"), objective=result, curve=[{k: r.get(k) for k in ("step", "elapsed_seconds")}
                                                                  for r in reports])
    Path(out_path).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
