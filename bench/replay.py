"""P3 and P2 at larger trial budgets, replayed: the search's own ASHA scheduler fed learning curves P2 recorded.

P2's random searches run every trial to the end, so each of their trials leaves its whole learning curve (the
objective and the tie-break metric at every evaluation). Random search draws its configurations without looking at
results, so what random search + ASHA would have done with those trials is exact, given an order: feed each curve,
one trial after another (P2 runs one trial at a time), to `search.resilience.ASHA` with P2's settings, stop
feeding a curve when ASHA says STOP, and count the steps. Replaying many orders, and budgets larger than one search
(drawing curves from all seeds' random searches, with replacement once the budget exceeds them), gives the
distribution of P3 and of "was the best trial stopped" that 6 trials per search cannot, and the P2 ratio of random +
ASHA over random without early stopping from the measured fixed cost and work per trial. What it cannot show is
TPE's part: which configurations TPE would have proposed.

    python -m bench.replay bench/results/<run>       # from a benchmark's report.json and runs/
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

# The objective's value when a trial has learned nothing it measures: F1 0, or a token separation of 1 (both styles
# answer at the same length). A curve "scored" when its peak is above it.
NO_SIGNAL = {"val_f1": 0.0, "val_separation": 1.0}

Curve = list[dict[str, float]]  # one trial's reports in order: {"step", metric, tie-break metric}


def recorded_curves(runs: Sequence[Path], metric: str, tie_break: str | None, steps: int) -> list[Curve]:
    """The evaluation reports of every trial in these searches' Tune directories that trained all `steps`."""
    from search.report import trial_histories, tune_dir

    also = (tie_break,) if tie_break else ()
    out = []
    for run in runs:
        histories = trial_histories(run, metric, also)
        if not histories and tune_dir(run) is not None:  # half-written, or from another Ray version
            print(f"bench.replay: cannot read {tune_dir(run)}; its curves are left out", file=sys.stderr)
        for rows in histories.values():
            curve = [{"step": r["step"], metric: r["value"], **{k: r[k] for k in also if r[k] is not None}}
                     for r in rows if r["value"] is not None]
            if curve and curve[-1]["step"] >= steps:
                out.append(curve)
    return out


def replay(curves: Sequence[Curve], *, metric: str, mode: str, every: int, steps: int, reduction_factor: float,
           grace_period: int = 1, tie_break: str | None = None) -> list[int]:
    """Feed `curves`, in order, one trial at a time, to the search's ASHA with the settings `search.driver` gives it;
    the steps each trial ran before ASHA stopped it (or `steps`)."""
    import numpy as np

    from ray.tune.schedulers import TrialScheduler

    from search.config import asha_max_t
    from search.resilience import ASHA

    np.random.seed(0)  # ASHA draws a bracket per trial; with one bracket (brackets=1) the draw has one outcome
    scheduler = ASHA(time_attr="step", metric=metric, mode=mode, max_t=asha_max_t(steps, every),
                     grace_period=grace_period * every, reduction_factor=reduction_factor, tie_break=tie_break)
    ran = []
    for i, curve in enumerate(curves):
        trial = SimpleNamespace(trial_id=f"replay-{i}")
        scheduler.on_trial_add(None, trial)
        last = curve[-1]
        for result in curve:
            last = result
            if scheduler.on_trial_result(None, trial, result) == TrialScheduler.STOP:
                break
        scheduler.on_trial_complete(None, trial, last)
        ran.append(int(last["step"]))
    return ran


def time_to_best(curves: Sequence[Curve], ran: Sequence[int], best: float, *, metric: str, steps: int,
                 fixed: float, work: float) -> tuple[float, bool]:
    """Seconds until a report within 1% of `best` (higher is better): trial after trial, each paying `fixed`, then
    `work` x steps / `steps` up to each report. (whole time, False) if none came within 1%."""
    clock = 0.0
    for curve, n in zip(curves, ran):
        for r in curve:
            if r["step"] > n:
                break
            if r[metric] >= best - abs(best) * 0.01:
                return clock + fixed + work * r["step"] / steps, True
        clock += fixed + work * n / steps
    return clock, False


def summary(curves: Sequence[Curve], *, metric: str, every: int, steps: int, reduction_factor: float,
            fixed: float, work: float, tie_break: str | None = None, budgets: Sequence[int] = (6, 12, 24, 48),
            factors: Sequence[float] | None = None, replays: int = 200, seed: int = 0,
            floor: float = 0.0) -> dict[str, Any]:
    """Per trial budget and reduction factor: P3 (mean and 10-90% range over `replays` random orders), how often the
    best trial of the replay was stopped (every trial with the best peak value stopped before its end), how often
    ASHA never came within 1% of the best (stopped before it got there), and the median P2 ratio (random no-ES /
    random + ASHA, time to within 1% of the best either reached). Budgets up to the number of curves draw without
    replacement, larger ones with."""
    rng, pool = random.Random(seed), list(curves)
    rows = []
    for rf in factors or (reduction_factor,):
        for n in budgets:
            fractions, stopped, missed, ratios, undecided = [], 0, 0, [], 0
            for _ in range(replays):
                drawn = rng.sample(pool, n) if n <= len(pool) else rng.choices(pool, k=n)
                ran = replay(drawn, metric=metric, mode="max", every=every, steps=steps, reduction_factor=rf,
                             tie_break=tie_break)
                fractions.append(sum(ran) / (n * steps))
                peaks = [max(r[metric] for r in c) for c in drawn]
                best = max(peaks)
                full = time_to_best(drawn, [steps] * n, best, metric=metric, steps=steps, fixed=fixed, work=work)[0]
                asha, reached = time_to_best(drawn, ran, best, metric=metric, steps=steps, fixed=fixed, work=work)
                ratios.append(full / asha)
                if len(set(peaks)) < 2:
                    undecided += 1  # every trial scored the same: no best trial to stop
                    continue
                stopped += all(ran[i] < steps for i, p in enumerate(peaks) if p == best)
                missed += not reached
            decided = replays - undecided
            q = statistics.quantiles(fractions, n=10)
            rows.append({"trials": n, "reduction_factor": rf, "p3_mean": round(statistics.fmean(fractions), 3),
                         "p3_p10": round(q[0], 3), "p3_p90": round(q[-1], 3),
                         "best_stopped": round(stopped / decided, 3) if decided else None,
                         "best_missed": round(missed / decided, 3) if decided else None,
                         "no_best": round(undecided / replays, 3),
                         "ratio_median": round(statistics.median(ratios), 3)})
    return {"tie_break": tie_break, "curves": len(curves),
            "curves_above_zero": sum(max(r[metric] for r in c) > floor for c in curves), "floor": floor,
            "replays": replays,
            "every": every, "steps": steps, "fixed_seconds": fixed, "work_seconds": work, "rows": rows}


def searcher_bound(curves: Sequence[Curve], *, metric: str, every: int, steps: int, reduction_factor: float,
                   fixed: float, work: float, trials: int, startup: int, seeds: int, target: float,
                   tie_break: str | None = None, tops: Sequence[float] = (1.0, 0.5, 0.25, 0.0), replays: int = 1000,
                   seed: int = 0, floor: float = 0.0) -> dict[str, Any]:
    """How far P2 could go with a better searcher than TPE: TPE replaced by an oracle that knows every curve's
    end.

    Per replay: random search draws `trials` curves; the oracle search shares its first `startup` (TPE's start-up
    trials are random search's first draws, as in P2), then proposes only curves from the best `top` share of those
    that ever scored above `floor`, ranked by peak (top 0: the best curve alone, as a searcher that knew the best
    configuration from the start), and runs under the search's ASHA, replayed exactly. Both draw without
    replacement while there are curves enough. P2's ratio is then random no-ES / oracle + ASHA, time to within 1%
    of the best either reached, at the measured `fixed` cost and `work` per full trial and with no fixed cost at
    all. Per `top`: its curves, the oracle's P3, the median ratio, the share of replays at or past `target`, and
    the share of medians over `seeds` replays (P2's figure) at or past it. A real searcher proposing among these
    configurations does worse than the oracle; what it cannot show is a searcher finding a configuration better
    than every recorded one."""
    rng, curves = random.Random(seed), list(curves)
    peak = {id(c): max(r[metric] for r in c) for c in curves}
    scored = sorted((c for c in curves if peak[id(c)] > floor), key=lambda c: peak[id(c)], reverse=True)
    rows = []
    for top in tops if scored else ():  # no curve that ever scored: nothing for the oracle to propose
        pool = scored[:max(1, round(len(scored) * top))]
        fractions, ratios = [], {fixed: [], 0.0: []}
        for _ in range(replays):
            drawn = rng.sample(curves, trials) if trials <= len(curves) else rng.choices(curves, k=trials)
            k = max(0, trials - startup)
            chosen = drawn[:trials - k] + (rng.sample(pool, k) if k <= len(pool) else rng.choices(pool, k=k))
            ran = replay(chosen, metric=metric, mode="max", every=every, steps=steps,
                         reduction_factor=reduction_factor, tie_break=tie_break)
            fractions.append(sum(ran) / (trials * steps))
            reached = max(r[metric] for c, n in zip(chosen, ran) for r in c if r["step"] <= n)
            best = max(reached, *(peak[id(c)] for c in drawn))
            for f, out in ratios.items():
                full = time_to_best(drawn, [steps] * trials, best, metric=metric, steps=steps, fixed=f, work=work)[0]
                out.append(full / time_to_best(chosen, ran, best, metric=metric, steps=steps, fixed=f, work=work)[0])
        row = {"top": top, "curves": len(pool), "p3_mean": round(statistics.fmean(fractions), 3)}
        for f, key in ((fixed, "measured_fixed"), (0.0, "no_fixed")):
            medians = [statistics.median(rng.sample(ratios[f], seeds)) for _ in range(replays)]
            row[key] = {"ratio_median": round(statistics.median(ratios[f]), 3),
                        "replays_at_target": round(sum(x >= target for x in ratios[f]) / replays, 3),
                        "medians_at_target": round(sum(m >= target for m in medians) / replays, 3)}
        rows.append(row)
    return {"trials": trials, "startup": startup, "seeds": seeds, "target": target, "replays": replays,
            "curves_scored": len(scored), "fixed_seconds": fixed, "work_seconds": work, "rows": rows}


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation of two orderings (ties at their mean rank); None where either has one value."""
    from scipy.stats import spearmanr

    if len(set(xs)) < 2 or len(set(ys)) < 2:  # scipy would return nan, with a warning
        return None
    return float(spearmanr(xs, ys).statistic)


def rung_signal(curves: Sequence[Curve], *, metric: str, rungs: Sequence[int],
                tie_break: str | None = None) -> list[dict[str, Any]]:
    """What ASHA has to go on at each rung (higher objective is better), over these curves.

    Per rung: the curves evaluated there; the share whose objective there is the commonest value (1.0: every
    trial ties, and ASHA decides by the tie break alone); and the rank correlation with each curve's peak objective
    (what its trial ends as in the search: its best checkpoint) of the objective at the rung, alone and with ties
    ordered by `tie_break`, as ASHA orders them. A correlation near 0 means ASHA's cut there is a coin toss; None
    means the rung's values were all equal."""
    from search.resilience import tie_broken

    rows = []
    for rung in rungs:
        at = [(c, next((r for r in c if r["step"] == rung), None)) for c in curves]
        at = [(c, r) for c, r in at if r is not None]
        if not at:
            continue
        values = [r[metric] for _, r in at]
        peaks = [max(x[metric] for x in c) for c, _ in at]
        rows.append({"step": rung, "curves": len(at),
                     "tied": round(max(values.count(v) for v in values) / len(values), 3),
                     "corr_objective": _round(spearman(values, peaks)),
                     # the value ASHA ranks: the objective nudged by the tie break (search.resilience.ASHA)
                     "corr_with_tie_break": _round(spearman([tie_broken(r, metric, 1, tie_break)[metric]
                                                             for _, r in at], peaks))})
    return rows


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def from_report(out: Path, replays: int = 200, tie_break: str | None = None) -> dict[str, Any] | None:
    """The replay for a benchmark run directory (its report.json and runs/), or None without recorded curves."""
    report = json.loads((out / "report.json").read_text())
    st, p = report.get("settings") or {}, report.get("p2") or {}
    cost = p.get("trial_cost") or {}
    if not st.get("p2_steps") or not cost.get("fixed_seconds_median") or not cost.get("work_seconds_full_median"):
        return None
    return replay_for(out, st, cost, [r["name"] for r in p.get("runs", []) if "random_fifo" in r["name"]], replays,
                      tie_break)


def replay_for(out: Path, settings: dict[str, Any], cost: dict[str, Any], names: Sequence[str],
               replays: int = 200, tie_break: str | None = None) -> dict[str, Any] | None:
    """The replay of these random searches' curves, ties at a rung ordered by `tie_break` (default: as the run's
    TPE + ASHA searches ordered them)."""
    from bench.run import TARGETS, p2_objective, p2_rungs
    from bench.run import tie_break as run_tie_break
    from search.config import SearcherSettings

    key = tie_break or run_tie_break(settings)
    steps, every = settings["p2_steps"], settings["p2_steps"] // settings["p2_evals"]
    metric = p2_objective(settings)[0]
    floor = NO_SIGNAL.get(metric, 0.0)
    curves = recorded_curves([out / "runs" / n for n in names], metric, key, steps)
    if not curves:
        return None
    if any(key not in r for c in curves for r in c):
        print(f"bench.replay: {out}'s curves do not all have {key}; ties are left unordered where it is missing",
              file=sys.stderr)
    r = summary(curves, metric=metric, floor=floor, tie_break=key, every=every, steps=steps,
                reduction_factor=settings["reduction_factor"], factors=sorted({2.0, 3.0, 4.0,
                                                                               settings["reduction_factor"]}),
                fixed=cost["fixed_seconds_median"], work=cost["work_seconds_full_median"], replays=replays)
    r["rungs"] = rung_signal(curves, metric=metric, tie_break=key,
                             rungs=sorted(set(p2_rungs(argparse.Namespace(**settings))) | {steps}))
    if not settings.get("p2_trials") or not settings.get("p2_seeds"):  # reports from before these settings
        return r
    r["searcher_bound"] = searcher_bound(
        curves, metric=metric, floor=floor, tie_break=key, every=every, steps=steps,
        reduction_factor=settings["reduction_factor"], fixed=cost["fixed_seconds_median"],
        work=cost["work_seconds_full_median"], trials=settings["p2_trials"],
        startup=settings.get("p2_startup_trials") or SearcherSettings().n_startup_trials,
        seeds=settings["p2_seeds"], target=TARGETS["p2"][1])
    return r


def markdown(r: dict[str, Any], p2_factor: float) -> list[str]:
    from bench.run import TIE_BREAK_WORDS, md_table

    lines = [f"{r['curves']} learning curves recorded by P2's random searches (every trial to the end; "
             f"{r['curves_above_zero']} of them ever scored above {r.get('floor', 0.0):g}), replayed through the "
             f"search's own ASHA "
             f"(`search.resilience.ASHA`: grace one evaluation of {r['every']} steps, ties at a rung by "
             f"{TIE_BREAK_WORDS[r.get('tie_break') or 'eval_loss']}) "
             f"one trial at a time, {r['replays']} random orders per row; budgets above {r['curves']} draw curves "
             f"with replacement. P2 ratio: random without early stopping / random + ASHA, time to within 1% of the "
             f"best either reached, at the measured {r['fixed_seconds']} s fixed cost and {r['work_seconds']} s work "
             f"per full trial. Exact for random search + ASHA; TPE's choice of configurations is not in it.", ""]
    lines += md_table(["trials", "reduction factor", "P3 mean (10-90%)", "best trial stopped",
                       "best value missed", "no best (all equal)", "P2 ratio (median)"],
                      [[x["trials"], f"{x['reduction_factor']:g}" + (" (P2's)" if x["reduction_factor"] == p2_factor
                                                                    else ""),
                        f"{x['p3_mean']} ({x['p3_p10']}-{x['p3_p90']})",
                        *("-" if x[k] is None else f"{x[k]:.0%}" for k in ("best_stopped", "best_missed")),
                        f"{x['no_best']:.0%}",
                        x["ratio_median"]] for x in r["rows"]])
    if r.get("rungs"):
        tie = TIE_BREAK_WORDS[r.get("tie_break") or "eval_loss"]
        lines += ["", f"What ASHA has to go on, over the same curves: at each rung (and the last step), the share of "
                      f"trials whose objective there is the commonest value (100%: all tie, and ASHA decides by "
                      f"{tie} alone), and the rank correlation (Spearman) with each trial's peak objective of the "
                      f"objective there, alone and with ties ordered by {tie} as ASHA orders them. Near 0: ASHA's "
                      f"cut there is a coin toss; '-': every value equal.", ""]
        lines += md_table(["step", "trials", "tied on the objective", "rank correlation: objective",
                           "rank correlation: with the tie break"],
                          [[x["step"], x["curves"], f"{x['tied']:.0%}",
                            *("-" if x[k] is None else x[k] for k in ("corr_objective", "corr_with_tie_break"))]
                           for x in r["rungs"]])
    if (r.get("searcher_bound") or {}).get("rows"):  # none where no curve ever scored
        lines += [""] + bound_markdown(r["searcher_bound"])
    return lines


def bound_markdown(b: dict[str, Any]) -> list[str]:
    from bench.run import md_table

    lines = [f"How far a better searcher could take P2 (`searcher_bound`): TPE replaced by an oracle that knows how "
             f"every recorded curve ends. It shares random search's first {b['startup']} trial(s), as TPE's "
             f"start-up trials do, then proposes only configurations from the best share of the "
             f"{b['curves_scored']} curves that ever scored, under the search's ASHA; random search as above. "
             f"{b['trials']} trials a search, {b['replays']} replays; P2's figure is "
             + (f"the median of {b['seeds']} seeds' ratios" if b["seeds"] > 1 else "one seed's ratio")
             + ". A real searcher proposing among these configurations does worse than this oracle.", ""]
    cells = []
    for x in b["rows"]:
        m, z = x["measured_fixed"], x["no_fixed"]
        cells.append([f"best {x['top']:.0%} ({x['curves']})" if x["top"] else "the best curve alone (1)",
                      x["p3_mean"], m["ratio_median"], f"{m['replays_at_target']:.0%}",
                      f"{m['medians_at_target']:.0%}", z["ratio_median"], f"{z['medians_at_target']:.0%}"])
    t = f"{b['target']:g}"
    return lines + md_table(["oracle proposes from (curves)", "P3", f"ratio, median ({b['fixed_seconds']} s fixed)",
                             f"seeds >= {t}", f"median of {b['seeds']} >= {t}", "ratio, median (no fixed cost)",
                             f"median of {b['seeds']} >= {t} (no fixed cost)"], cells)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="A benchmark run's directory (report.json and runs/).")
    ap.add_argument("--replays", type=int, default=200, help="Random orders replayed per budget and reduction "
                    "factor (default 200).")
    ap.add_argument("--tie-break", choices=("eval_loss", "val_ap"), help="Order ties at a rung by this metric "
                    "(default: as the run's TPE + ASHA searches did).")
    args = ap.parse_args(argv)
    if not (args.out / "report.json").is_file():
        print(f"bench.replay: {args.out / 'report.json'} not found; give a directory `python -m bench.run` wrote",
              file=sys.stderr)
        return 2
    r = from_report(args.out, args.replays, args.tie_break)
    if r is None:
        print(f"bench.replay: {args.out} has no P2 random-search curves (runs/ deleted, or P2 not run)",
              file=sys.stderr)
        return 2
    rf = json.loads((args.out / "report.json").read_text())["settings"]["reduction_factor"]
    print("\n".join(markdown(r, rf)))
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
