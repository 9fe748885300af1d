"""P3 and P2 with ASHA's promotion variant (Li et al. 2020), replayed on the learning curves P2 recorded.

    PYTHONPATH=. python bench/results/2026-12-05-promotion-asha/sim.py RUN_DIR [RUN_DIR ...]   # prints a Markdown table

Ray's ASHA (`search.resilience.ASHA`, what the search runs) is the stopping variant: a trial reaching a rung goes on
if it is in the top 1/reduction_factor of the results that rung has seen so far, else it stops. One trial at a
time, the first trial to reach a rung always goes on, the second whenever it beats the first, and so on: early
trials pass more often than 1 in reduction_factor. The paper's promotion variant instead pauses every trial at a
rung and resumes a paused one only once it is in the top 1/reduction_factor of at least reduction_factor results
there (highest rung first); otherwise it starts a new trial. A resumed trial pays the fixed cost again (a new worker
group, the model loaded, the checkpoint read).

Both are fed the same random orders of the curves that P2's random searches recorded (every trial to the end), as
`bench/replay.py` does for the stopping variant, and compared with random search without early stopping on the same
order: P3 (steps run / steps with every trial to the end), how often every trial with the best peak was cut short,
how often the scheduler never came within 1% of the best, and the P2 ratio (random no-ES / random + scheduler, time
to within 1% of the best). Fixed cost and work per full trial are those the 2026-12-05 12:15 full run measured.
TPE's choice of configurations is not in it.
"""
import random
import statistics
import sys
from pathlib import Path

from bench.replay import recorded_curves, replay, time_to_best
from search.resilience import tie_broken

METRIC, TIE, STEPS, EVERY, RF = "val_f1", "eval_loss", 96, 16, 3
RUNGS = [16, 48, 96]
FIXED, WORK = 6.78, 22.98  # bench/results/2026-12-05-full-stop-with-trial/report.md


def at(curve, step):
    return next(r for r in curve if r["step"] == step)


def promotion(curves, rf=RF):
    """The paper's ASHA, one trial at a time: (steps each trial ran, [(clock, value) at each evaluation])."""
    rungs = {k: [] for k in range(len(RUNGS))}
    promoted, ran, events, clock, started = set(), [0] * len(curves), [], 0.0, 0
    rank = lambda i, k: tie_broken(at(curves[i], RUNGS[k]), METRIC, 1, TIE)[METRIC]
    while True:
        job = None
        for k in range(len(RUNGS) - 2, -1, -1):  # the highest rung with a trial to promote
            top = sorted(rungs[k], key=lambda i: rank(i, k), reverse=True)[: len(rungs[k]) // int(rf)]
            job = next(((i, k) for i in top if (i, k) not in promoted), None)
            if job:
                break
        if job:
            i, k = job
            promoted.add(job)
            start, k = RUNGS[k], k + 1
        elif started < len(curves):
            i, k, start = started, 0, 0
            started += 1
        else:
            return ran, events
        clock += FIXED
        for r in curves[i]:  # the evaluations of this segment (the last one at the rung it ends at)
            if start < r["step"] <= RUNGS[k]:
                events.append((clock + WORK * (r["step"] - start) / STEPS, r[METRIC]))
        clock += WORK * (RUNGS[k] - start) / STEPS
        ran[i] = RUNGS[k]
        rungs[k].append(i)


def main(dirs):
    runs = [d for x in dirs for d in sorted((Path(x) / "runs").glob("p2-random_fifo-*"))]
    pool = recorded_curves(runs, METRIC, TIE, STEPS)
    print(f"{len(pool)} curves from {len(runs)} random searches; fixed {FIXED} s, work {WORK} s per full trial, "
          f"reduction factor {RF}, rungs {RUNGS[:-1]}, 400 random orders per row\n")
    print("| trials | ASHA variant | P3 mean (10-90%) | best trial cut short | best value missed | P2 ratio (median) "
          "| wall time, s (median) |")
    print("|---|---|---|---|---|---|---|")
    rng = random.Random(0)
    for n in (12, 24, 48):
        rows = {"stopping (Ray's, the search's)": [], "promotion (paper)": []}
        for _ in range(400):
            drawn = rng.sample(pool, n) if n <= len(pool) else rng.choices(pool, k=n)
            peaks = [max(r[METRIC] for r in c) for c in drawn]
            best = max(peaks)
            if len(set(peaks)) < 2:
                continue
            full = time_to_best(drawn, [STEPS] * n, best, metric=METRIC, steps=STEPS, fixed=FIXED, work=WORK)[0]
            ran = replay(drawn, metric=METRIC, mode="max", every=EVERY, steps=STEPS, reduction_factor=RF,
                         tie_break=TIE)
            t, reached = time_to_best(drawn, ran, best, metric=METRIC, steps=STEPS, fixed=FIXED, work=WORK)
            wall = sum(FIXED + WORK * s / STEPS for s in ran)
            rows["stopping (Ray's, the search's)"].append((ran, t, reached, wall))
            ran, events = promotion(drawn)
            hit = [c for c, v in events if v >= best - abs(best) * 0.01]
            wall = events[-1][0]
            rows["promotion (paper)"].append((ran, hit[0] if hit else wall, bool(hit), wall))
            for key in rows:
                r = rows[key][-1]
                rows[key][-1] = (sum(r[0]) / (n * STEPS),
                                 all(r[0][i] < STEPS for i, p in enumerate(peaks) if p == best),
                                 not r[2], full / r[1], r[3])
        for key, r in rows.items():
            p3 = [x[0] for x in r]
            q = statistics.quantiles(p3, n=10)
            print(f"| {n} | {key} | {statistics.fmean(p3):.3f} ({q[0]:.3f}-{q[-1]:.3f}) | "
                  f"{statistics.fmean(x[1] for x in r):.0%} | {statistics.fmean(x[2] for x in r):.0%} | "
                  f"{statistics.median(x[3] for x in r):.3f} | {statistics.median(x[4] for x in r):.0f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
