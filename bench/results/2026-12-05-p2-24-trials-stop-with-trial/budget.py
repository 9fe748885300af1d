"""P2 at smaller trial budgets, read off a P2 run's recorded searches: each search cut after its first N trials.

A search's first N trials do not depend on its later ones (one trial at a time; TPE draws from earlier results only),
so each cut is what an N-trial search of the same seed would have run. Its wall time is taken as the end of its Nth
trial plus the search's own tail after its last trial; the times of the trials are those of the 24-trial run, where
the other search of the seed ran beside them until it ended, so they are close to, not exactly, an N-trial run's.

    python bench/results/2026-12-05-p2-24-trials-stop-with-trial/budget.py RUN_DIR [RUN_DIR ...]
"""

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench.run import best_so_far_curve, compare  # noqa: E402
from search.report import trial_histories  # noqa: E402


def load(run: Path, name: str, report: dict) -> dict:
    """One search, read once: its trials in start order, their histories, and when its command started and ended."""
    s = json.loads((run / "runs" / name / "summary.json").read_text())
    hist = trial_histories(run / "runs" / name, s["objective"]["metric"])
    # the report's curve is in seconds since the search command started: find that origin from its first point
    first = min(r["timestamp"] for rows in hist.values() for r in rows if r["value"] is not None)
    origin = first - report[name]["curve"][0][0]
    trials = sorted(s["trials"], key=lambda t: t["timing"]["started_at"])
    tail = report[name]["wall_seconds"] - (trials[-1]["timing"]["ended_at"] - origin)
    return {"trials": trials, "hist": hist, "origin": origin, "tail": tail}


def cut(search: dict, n: int) -> dict:
    """The search after its first `n` trials, as `bench.run.compare` reads a search."""
    kept = search["trials"][:n]
    curve = best_so_far_curve({t["trial_id"]: search["hist"].get(t["trial_id"], []) for t in kept},
                              search["origin"], "max")
    wall = max(t["timing"]["ended_at"] for t in kept) - search["origin"] + search["tail"]
    return {"curve": curve, "best_value": curve[-1][1], "wall_seconds": wall}


def main() -> None:
    for run in map(Path, sys.argv[1:]):
        full = json.loads((run / "report.json").read_text())
        report = {x["name"]: x for x in full["p2"]["runs"]}
        seeds = sorted({x["seed"] for x in report.values()})
        searches = {(seed, k): load(run, f"p2-{k}-seed{seed}", report)
                    for seed in seeds for k in ("tpe_asha", "random_fifo")}
        print(f"{run}: seeds {seeds}")
        print("| trials | " + " | ".join(f"seed {s}: ratio (random's wall, s)" for s in seeds) + " | median |")
        print("|---" * (len(seeds) + 2) + "|")
        for n in range(12, full["settings"]["p2_trials"] + 1, 2):
            cells, ratios = [], []
            for seed in seeds:
                got = {k: cut(searches[seed, k], n) for k in ("tpe_asha", "random_fifo")}
                c = compare(got, "max")
                mark = {"lower": ">", "upper": "<"}.get(c["bound"], "")
                ratios.append(c["ratio"])
                cells.append(f"{mark}{c['ratio']:.2f} ({got['random_fifo']['wall_seconds']:.0f})")
            print(f"| {n} | " + " | ".join(cells) + f" | {statistics.median(ratios):.2f} |")


if __name__ == "__main__":
    main()
