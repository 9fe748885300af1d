"""P2's ratio per seed with the band around the best wider than the issue's 1%, from two runs' report.json.

    PYTHONPATH=. python bench/results/2026-12-05-full-searcher-bound/bands.py
"""

import json
from pathlib import Path

from bench.run import time_to_reach

RESULTS = Path(__file__).resolve().parent.parent
print("run, seed: random no-ES / TPE+ASHA, time to within each band of the best either found ('<' or '>': a bound)")
for run in ("2026-12-05-full-searcher-bound", "2026-12-05-p2-192-steps-seeds3-5"):
    report = json.loads((RESULTS / run / "report.json").read_text())
    runs = {r["name"]: r for r in report["p2"]["runs"]}
    for seed in sorted({r["seed"] for r in report["p2"]["runs"]}):
        tpe, rnd = runs[f"p2-tpe_asha-seed{seed}"], runs[f"p2-random_fifo-seed{seed}"]
        best = max(tpe["best_value"], rnd["best_value"])
        cells = []
        for band in (0.01, 0.03, 0.05, 0.10):
            a = time_to_reach(rnd["curve"], best * (1 - band), "max")
            b = time_to_reach(tpe["curve"], best * (1 - band), "max")
            mark = "<" if b is None else (">" if a is None else "")
            ratio = (a if a is not None else rnd["wall_seconds"]) / (b if b is not None else tpe["wall_seconds"])
            cells.append(f"{band:.0%}: {mark}{ratio:.2f}")
        print(f"{run}, seed {seed}: " + ", ".join(cells))
