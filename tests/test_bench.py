"""The benchmark's arithmetic (bench/run.py) on constructed histories, against hand-computed values."""

from __future__ import annotations

import json

import pytest

from bench.run import best_so_far_curve, ceiling, compare, time_to_reach, trial_breakdown, trial_split, within


def test_best_so_far_judges_each_trial_by_its_best_evaluation():
    hist = {"a": [{"timestamp": 110.0, "value": 0.5}, {"timestamp": 130.0, "value": 0.9}],
            "b": [{"timestamp": 120.0, "value": 0.7}, {"timestamp": 140.0, "value": None}]}
    assert best_so_far_curve(hist, origin=100.0, mode="max") == [(10.0, 0.5), (20.0, 0.7), (30.0, 0.9)]
    # a trial that falls keeps its best checkpoint, which the search would export
    hist = {"a": [{"timestamp": 1.0, "value": 0.9}, {"timestamp": 3.0, "value": 0.2}],
            "b": [{"timestamp": 2.0, "value": 0.5}]}
    assert best_so_far_curve(hist, origin=0.0, mode="max") == [(1.0, 0.9), (2.0, 0.9), (3.0, 0.9)]
    assert best_so_far_curve(hist, origin=0.0, mode="min") == [(1.0, 0.9), (2.0, 0.5), (3.0, 0.2)]


def test_time_to_within_one_percent_and_the_ratio():
    assert within(0.9, "max") == pytest.approx(0.891) and within(2.0, "min") == pytest.approx(2.02)
    curve = [(10.0, 0.5), (40.0, 0.88), (70.0, 0.895)]
    assert time_to_reach(curve, 0.891, "max") == 70.0 and time_to_reach(curve, 0.95, "max") is None
    runs = {"tpe_asha": {"best_value": 0.90, "curve": [(20.0, 0.6), (50.0, 0.90)], "wall_seconds": 200.0},
            "random_fifo": {"best_value": 0.89, "curve": [(30.0, 0.7), (150.0, 0.893)], "wall_seconds": 400.0}}
    c = compare(runs, "max")
    # target 0.891: TPE+ASHA at 50 s, random at 150 s -> 3.0
    assert c["reference_best"] == 0.90 and c["tpe_asha"] == {"seconds": 50.0, "reached": True}
    assert c["random_fifo"] == {"seconds": 150.0, "reached": True} and c["ratio"] == 3.0
    # a strategy that never gets there is charged its whole wall time, and marked
    runs["random_fifo"]["curve"] = [(30.0, 0.7)]
    c = compare(runs, "max")
    assert c["random_fifo"] == {"seconds": 400.0, "reached": False} and c["ratio"] == 8.0
    assert c["bound"] == "lower"  # random took longer than its whole run: the true ratio is above 8
    runs["random_fifo"]["curve"], runs["tpe_asha"]["curve"] = [(150.0, 0.95)], [(20.0, 0.6)]
    runs["random_fifo"]["best_value"] = 0.95  # now TPE+ASHA never gets within 1% of 0.95
    c = compare(runs, "max")
    assert c["tpe_asha"] == {"seconds": 200.0, "reached": False} and c["bound"] == "upper"


def test_median_ratio_orders_bounds_beyond_the_values_on_their_side():
    from bench.run import median_ratio

    def s(ratio, bound=None):
        return {"ratio": ratio, "bound": bound}

    # the 2026-12-03 run: 0.865; < 1.146 (TPE+ASHA never got there); > 0.956 (random never did) -> 0.865, a value
    assert median_ratio([s(0.865), s(1.146, "upper"), s(0.956, "lower")]) == (0.865, None)
    # two lower bounds: the true median exceeds the smaller of them
    assert median_ratio([s(0.865), s(1.146, "lower"), s(0.956, "lower")]) == (0.956, "lower")
    assert median_ratio([s(1.2), s(0.5, "upper"), s(0.9, "upper")]) == (0.9, "upper")
    assert median_ratio([s(0.8), s(1.6)]) == (1.2, None)
    assert median_ratio([s(0.8, "upper"), s(1.6, "lower")]) == (None, "unknown")


def test_trial_breakdown_accounts_for_the_whole_trial():
    timing = {"started_at": 100.0, "trial_entered_at": 100.5, "fit_at": 101.5, "worker_started_at": 106.0,
              "imports_seconds": 3.0, "data_seconds": 0.1, "model_load_seconds": 0.4, "eval_seconds_total": 10.0,
              "checkpoint_seconds_total": 0.5, "elapsed_seconds": 60.0, "ended_at": 171.0, "mlflow_seconds": 0.2}
    parts = trial_breakdown(timing, 71.0)
    assert parts["trial process start"] == 0.5 and parts["trainer setup"] == 1.0
    assert parts["worker group start"] == 4.5 and parts["training"] == pytest.approx(49.0)
    assert parts["shutdown + result"] == pytest.approx(2.0)  # 71 - (0.5 + 1 + 4.5 + 3 + 60)
    assert sum(v for k, v in parts.items() if not k.startswith("mlflow")) == pytest.approx(71.0)


def test_fixed_cost_split_and_the_ceiling_it_sets():
    timing = {"started_at": 100.0, "trial_entered_at": 100.5, "fit_at": 101.5, "worker_started_at": 106.0,
              "imports_seconds": 3.0, "data_seconds": 0.1, "model_load_seconds": 0.4, "eval_seconds_total": 10.0,
              "checkpoint_seconds_total": 0.5, "elapsed_seconds": 60.0, "ended_at": 171.0}
    fixed, work = trial_split({"timing": timing})
    # work: data 0.1 + model 0.4 + eval 10 + training 49 (60 - 0.1 - 0.4 - 10 - 0.5); the rest of 71 s is fixed
    assert work == pytest.approx(59.5) and fixed == pytest.approx(11.5)
    assert trial_split({"timing": {}}) == (None, None) and trial_split({}) == (None, None)
    # 10 s fixed + 30 s work; ASHA runs a third of the work: (10 + 30) / (10 + 10) = 2; no fixed cost: 3
    assert ceiling(10.0, 30.0, 1 / 3) == pytest.approx(2.0) and ceiling(0.0, 30.0, 1 / 3) == pytest.approx(3.0)


def test_p1_calibration_takes_the_rate_past_the_warm_up():
    from bench.run import steps_for

    # 16 steps: the first 8 with warm-up, data and model load took 30 s, the next 8 plus one 4 s evaluation 12 s,
    # so a step costs (12 - 4) / 8 = 1 s. A 3-evaluation loop of 120 s: the probe's 50 s, one more evaluation
    # (4 s), and 66 steps more at 1 s -> 82 steps, rounded to a multiple of 3 -> 81.
    probe = {"curve": [{"step": 8, "elapsed_seconds": 30.0}, {"step": 16, "elapsed_seconds": 42.0}],
             "eval_seconds_total": 8.0, "wall_seconds": 50.0}
    assert steps_for(probe, 120.0, 16) == (81, 1.0, 4.0)
    # a whole-run rate (42 s / 16 steps = 2.6 s) would have planned about a third of that; never below 30 steps
    assert steps_for(probe, 60.0, 16)[0] == 30


def test_best_stopped_early_needs_a_best():
    from bench.run import best_stopped_early

    trials = [{"trial_id": "a", "value": 0.8, "stopped_early": False},
              {"trial_id": "b", "value": 0.3, "stopped_early": True}]
    assert best_stopped_early(trials, "a") is False
    trials[1]["value"] = 0.9
    assert best_stopped_early(trials, "b") is True
    # every trial 0.0: Tune's "best" is the first listed, stopped or not; there is no best to judge
    flat = [{"trial_id": "a", "value": 0.0, "stopped_early": True}, {"trial_id": "b", "value": 0.0,
                                                                        "stopped_early": False}]
    assert best_stopped_early(flat, "a") is None


def test_best_config_stopped_finds_a_stopped_configuration_that_random_search_ran_to_the_best():
    """Seen in a P2 run (bench/README.md, "Session of 2026-12-05, 21:41"): TPE + ASHA stopped one of its start-up
    configurations at step 16 with F1 0, and random search, which drew the same one, ran it to 0.9355, within 1%
    of the seed's best 0.9385. TPE + ASHA's own best trial was never stopped, so P3 read "met" until this check."""
    from bench.run import best_config_stopped, compare, p3_verdict, trial_outcomes

    a, b, c = {"lr": 0.0019, "r": 32}, {"lr": 0.0077, "r": 32}, {"lr": 0.0003, "r": 8}
    asha = trial_outcomes([{"params": a, "value": 0.0, "steps": 16, "stopped_early": True},
                           {"params": b, "value": 0.80, "steps": 192, "stopped_early": False},
                           {"params": c, "value": 0.38, "steps": 48, "stopped_early": True}])
    full = trial_outcomes([{"params": a, "value": 0.9355, "steps": 192, "stopped_early": False},
                           {"params": b, "value": 0.80, "steps": 192, "stopped_early": False},
                           {"params": c, "value": 0.66, "steps": 192, "stopped_early": False},
                           {"params": {"lr": 0.0015, "r": 16}, "value": 0.9385, "steps": 192,
                            "stopped_early": False}])
    runs = {"tpe_asha": {"trials": asha}, "random_fifo": {"trials": full}}
    found = best_config_stopped(runs, 0.9385 * 0.99, "max")
    # c was stopped too, but ran to 0.66 only: stopping it cost nothing; b was never stopped
    assert found == [{"params": a, "stopped_at_step": 16, "value_when_stopped": 0.0, "value_run_to_the_end": 0.9355}]
    assert best_config_stopped(runs, 0.94, "max") == []  # 0.9355 is not within 1% of a best of 0.9495
    # a minimised objective: "within" is at or below the target
    low = {"tpe_asha": {"trials": trial_outcomes([{"params": a, "value": 3.0, "steps": 16, "stopped_early": True}])},
           "random_fifo": {"trials": trial_outcomes([{"params": a, "value": 1.0, "steps": 192}])}}
    assert len(best_config_stopped(low, 1.01, "min")) == 1 and best_config_stopped(low, 0.99, "min") == []

    # compare() carries it per seed; P3's verdict is NOT met for it even with the fraction under the target
    pair = {key: {"best_value": v, "curve": [(10.0, v)], "wall_seconds": 20.0, "trials": t}
            for key, v, t in (("tpe_asha", 0.80, asha), ("random_fifo", 0.9385, full))}
    assert compare(pair, "max")["best_config_stopped"] == found
    p3 = {"steps_fraction": 0.347, "best_ever_stopped_early": False, "best_config_stopped_seeds": [0]}
    assert p3_verdict(p3).startswith("NOT met") and "seed 0 (P2 below)" in p3_verdict(p3)
    assert p3_verdict({**p3, "best_config_stopped_seeds": []}).startswith("met")
    assert p3_verdict({**p3, "best_ever_stopped_early": True, "best_config_stopped_seeds": []}).startswith("NOT met")
    # a report from before the check: the fraction and the search's own best decide, and the text does not claim it
    old = {"steps_fraction": 0.347, "best_ever_stopped_early": False}
    assert p3_verdict(old).startswith("met") and "random search ran it" not in p3_verdict(old)


def test_searches_side_by_side_run_at_once_and_each_is_timed(tmp_path):
    """P2's two searches of a seed run at the same time: here each command waits for the other to have started, so
    run one after the other, the first would wait forever (and fail at its deadline)."""
    import sys

    from bench.run import Bench

    def waits_for(other: str, me: str) -> list[str]:
        code = (f"import pathlib, time, sys; d = pathlib.Path({str(tmp_path)!r}); (d / {me!r}).touch(); "
                f"t = time.time() + 60\n"
                f"while not (d / {other!r}).exists():\n"
                f"    time.sleep(0.05)\n"
                f"    if time.time() > t: sys.exit(3)\n")
        return [sys.executable, "-c", code]

    out = Bench.run_together([(waits_for("b", "a"), tmp_path / "a.log", {}),
                              (waits_for("a", "b"), tmp_path / "b.log", {})])
    assert [rc for rc, *_ in out] == [0, 0]
    assert all(wall > 0 for _rc, _t, wall, _steal in out)
    failed = Bench.run_together([([sys.executable, "-c", "import sys; print('x'); sys.exit(5)"], tmp_path / "c.log",
                                  {})])
    assert failed[0][0] == 5 and (tmp_path / "c.log").read_text() == "x\n"


def test_p2_cpus_share_the_machine_between_the_trials_running_at_once():
    from bench.run import p2_cpus

    assert p2_cpus(2, 1, together=True) == 1  # two searches side by side, one trial each
    assert p2_cpus(2, 1, together=False) == 2
    assert p2_cpus(8, 2, together=True) == 2
    assert p2_cpus(2, 2, together=True) == 1  # never below one


def test_side_by_side_searches_join_the_benchmarks_shared_ray(tmp_path):
    """P2's searches of a seed share one local Ray started by the benchmark (SharedRay): a real cluster, which
    `search.run` joins through `ray_address` and checks before it would search (--dry-run)."""
    import os
    import subprocess
    import sys

    from bench.run import ROOT, SharedRay

    ray = SharedRay(1)
    try:
        assert os.environ["RAY_API_SERVER_ADDRESS"].startswith("http://127.0.0.1:")
        proc = subprocess.run([sys.executable, "-m", "search.run", "--dry-run", "--set", f"ray_address={ray.address}",
                               "--set", f"output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    finally:
        ray.close()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cluster: 1 node(s) alive with" in proc.stdout and "'CPU': 1.0" in proc.stdout
    assert "RAY_API_SERVER_ADDRESS" not in os.environ


def _curve(points):
    """[(step, f1, eval_loss)] -> the reports a trial makes."""
    return [{"step": s, "val_f1": f, "eval_loss": loss} for s, f, loss in points]


def test_replay_stops_what_the_searchs_asha_stops_and_counts_the_steps():
    from bench.replay import replay

    # every 4 steps, 12 in all, reduction factor 2: rungs at steps 4 and 8 (a quantile of 1 - 1/2: the median)
    a = _curve([(4, 0.5, 3.0), (8, 0.6, 2.5), (12, 0.7, 2.0)])
    b = _curve([(4, 0.2, 3.5), (8, 0.9, 2.0), (12, 0.9, 1.0)])  # below a at step 4: stopped there
    c = _curve([(4, 0.6, 2.8), (8, 0.55, 2.6), (12, 0.8, 2.1)])  # step 4: >= median(0.5, 0.2); step 8: < 0.6
    d = _curve([(4, 0.0, 1.0), (8, 0.0, 1.0), (12, 0.0, 1.0)])
    kw = dict(metric="val_f1", mode="max", every=4, steps=12, reduction_factor=2.0)
    assert replay([a, b, c], **kw) == [12, 4, 8]
    # the first trial always runs to the end; order decides the rest: after b's 0.9 at step 8, a (0.6) and c (0.55)
    # are below the rung's median there (0.9 alone; then median(0.9, 0.6) = 0.75)
    assert replay([b, a, c], **kw) == [12, 8, 8]
    # ties at a rung: the eval loss orders them, as in the search
    e = _curve([(4, 0.0, 2.0), (8, 0.0, 1.5), (12, 0.0, 1.2)])
    assert replay([d, e], **kw, tie_break="eval_loss") == [12, 4]
    assert replay([d, e], **kw) == [12, 12]  # without it, equal is never below the cutoff


def test_replay_time_to_best_charges_each_trial_its_fixed_cost_and_the_steps_it_ran():
    from bench.replay import time_to_best

    a = _curve([(4, 0.5, 3.0), (8, 0.6, 2.5), (12, 0.7, 2.0)])
    b = _curve([(4, 0.2, 3.5), (8, 0.9, 2.0), (12, 0.9, 1.0)])
    kw = dict(metric="val_f1", steps=12, fixed=10.0, work=60.0)
    # every trial to the end: a costs 10 + 60; b reaches 0.9 at step 8: 10 + 40 more
    assert time_to_best([a, b], [12, 12], 0.9, **kw) == (120.0, True)
    # b stopped at step 4 never shows 0.9: charged the whole time, 70 + 10 + 20
    assert time_to_best([a, b], [12, 4], 0.9, **kw) == (100.0, False)
    assert time_to_best([a, b], [12, 12], 0.7, **kw) == (70.0, True)  # within 1% of 0.7 at a's last report


def test_replay_summary_over_orders_and_budgets():
    from bench.replay import summary

    good = _curve([(4, 0.0, 2.0), (8, 0.5, 1.5), (12, 0.8, 1.0)])
    flat = _curve([(4, 0.0, 9.0), (8, 0.0, 8.9), (12, 0.0, 8.8)])
    r = summary([good, flat, flat, flat], metric="val_f1", tie_break="eval_loss", every=4, steps=12,
                reduction_factor=2.0, fixed=10.0, work=60.0, budgets=(2, 8), replays=40)
    two, eight = r["rows"]
    # two trials: good first -> flat stopped at 4 (P3 16/24); flat first -> both run (1.0), best never stopped
    assert two["best_stopped"] == 0.0 and two["best_missed"] == 0.0
    assert 16 / 24 <= two["p3_p10"] <= two["p3_mean"] <= two["p3_p90"] <= 1.0
    assert 0.0 < two["no_best"] < 1.0  # the draws of two flat curves (1 in 2): no best to stop
    assert eight["trials"] == 8 and eight["p3_mean"] < two["p3_mean"]  # more trials: more of them stopped
    assert r["curves"] == 4 and r["curves_above_zero"] == 1


def test_searcher_bound_replays_an_oracle_that_proposes_only_the_best_curves_against_random_search():
    from bench.replay import searcher_bound

    good = _curve([(4, 0.0, 2.0), (8, 0.5, 1.5), (12, 0.9, 1.0)])
    flat = _curve([(4, 0.0, 9.0), (8, 0.0, 8.9), (12, 0.0, 8.8)])
    also_flat = _curve([(4, 0.0, 8.0), (8, 0.0, 7.9), (12, 0.0, 7.8)])
    b = searcher_bound([good, flat, also_flat], metric="val_f1", tie_break="eval_loss", every=4, steps=12,
                       reduction_factor=2.0, fixed=10.0, work=60.0, trials=3, startup=1, seeds=3, target=1.5,
                       tops=(1.0, 0.0), replays=3000)
    assert b["curves_scored"] == 1 and [x["curves"] for x in b["rows"]] == [1, 1]  # only `good` ever scored
    # The oracle shares random search's first draw, then proposes `good` twice, which ASHA never stops (it beats
    # the first trial at every rung): P3 1. Random search finds 0.9 in its first, second or third trial, 70 s each
    # (1/3 each); the oracle by its second at the latest: ratios 1, 1 and 210 / 140 = 1.5, with or without the
    # fixed cost (every trial runs to the end). P2's median of 3 seeds reaches 1.5 when 2 or 3 of them do: 7/27.
    for row in b["rows"]:
        assert row["p3_mean"] == 1.0
        for key in ("measured_fixed", "no_fixed"):
            assert row[key]["ratio_median"] == 1.0
            assert row[key]["replays_at_target"] == pytest.approx(1 / 3, abs=0.04)
            assert row[key]["medians_at_target"] == pytest.approx(7 / 27, abs=0.04)
    # with fewer trials than start-up trials the oracle never proposes: it is random search, ratio 1
    few = searcher_bound([good, flat, also_flat], metric="val_f1", tie_break="eval_loss", every=4, steps=12,
                         reduction_factor=2.0, fixed=10.0, work=60.0, trials=2, startup=3, seeds=3, target=1.5,
                         replays=50)
    assert {row["measured_fixed"]["ratio_median"] for row in few["rows"]} == {1.0}
    # where no curve ever scored there is nothing to propose, and the report leaves the table out
    none = searcher_bound([flat, also_flat], metric="val_f1", every=4, steps=12, reduction_factor=2.0, fixed=10.0,
                          work=60.0, trials=2, startup=1, seeds=3, target=1.5, replays=10)
    assert none["curves_scored"] == 0 and none["rows"] == []
    from bench.replay import markdown

    replayed = {"curves": 2, "curves_above_zero": 0, "every": 4, "replays": 10, "fixed_seconds": 10.0,
                "work_seconds": 60.0, "rows": [], "searcher_bound": none}
    assert not any("searcher_bound" in line for line in markdown(replayed, 2.0))


def test_rank_correlation_ranks_ties_at_their_mean_and_says_nothing_for_a_rung_where_all_tie():
    from bench.replay import spearman

    assert spearman([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ranks [1, 2.5, 2.5, 4] against [1, 2, 3, 4]: covariance 4.5, variances 4.5 and 5
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert spearman([0, 0, 0], [1, 2, 3]) is None  # a rung where every trial ties says nothing on its own


def test_rung_signal_shows_ties_and_how_the_rung_order_predicts_the_peak():
    from bench.replay import rung_signal

    a = _curve([(4, 0.0, 5.0), (8, 0.5, 3.0)])
    b = _curve([(4, 0.0, 7.0), (8, 0.9, 2.0)])
    c = _curve([(4, 0.0, 6.0), (8, 0.0, 6.0)])
    first, last = rung_signal([a, b, c], metric="val_f1", rungs=[4, 8], tie_break="eval_loss")
    # step 4: all F1 0; ordered by eval loss (lower first) a > c > b, while the peaks order b > a > c
    assert first == {"step": 4, "curves": 3, "tied": 1.0, "corr_objective": None, "corr_with_tie_break": -0.5}
    assert last["tied"] == pytest.approx(0.333) and last["corr_objective"] == 1.0
    assert rung_signal([a, b, c], metric="val_f1", rungs=[6]) == []  # no curve evaluated there


def test_replay_reads_the_curves_of_trials_that_trained_to_the_end_from_a_real_tune_run(tmp_path):
    """A real (local, 1-CPU) Ray Tune run writes the experiment directory the benchmark's searches leave in runs/;
    the replay reads back each trial's evaluations, and only from trials that reached the last step."""
    import json

    import ray
    from ray import tune

    from bench.replay import from_report

    def trial(config):
        for step in range(4, config["last"] + 1, 4):
            tune.report({"step": step, "val_f1": config["f1"] * step / 12, "eval_loss": 5.0 - step / 4})

    search = tmp_path / "runs" / "p2-random_fifo-seed0"
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        tune.Tuner(trial, param_space={"last": tune.grid_search([12, 8]), "f1": 0.6},
                   run_config=tune.RunConfig(name="tune", storage_path=str(search), verbose=0)).fit()
    finally:
        ray.shutdown()
    report = {"settings": {"p2_steps": 12, "p2_evals": 3, "reduction_factor": 3.0, "p2_trials": 4, "p2_seeds": 3},
              "p2": {"trial_cost": {"fixed_seconds_median": 10.0, "work_seconds_full_median": 30.0},
                     "runs": [{"name": "p2-random_fifo-seed0"}, {"name": "p2-tpe_asha-seed0"}]}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    r = from_report(tmp_path, replays=5)
    assert r["curves"] == 1 and r["curves_above_zero"] == 1 and r["every"] == 4
    # every budget draws that one curve again and again: equal at every rung, so none is stopped, and no best
    assert [(x["p3_mean"], x["no_best"], x["best_stopped"]) for x in r["rows"]] == [(1.0, 1.0, None)] * 12
    # and the oracle searcher has the same one curve to propose: every trial of both searches is that curve, so
    # both reach its 0.6 in their first trial: ratio 1
    assert [x["measured_fixed"]["ratio_median"] for x in r["searcher_bound"]["rows"]] == [1.0] * 4
    from bench.replay import recorded_curves

    curves = recorded_curves([search], "val_f1", "eval_loss", 12)
    assert curves == [[{"step": 4, "val_f1": pytest.approx(0.2), "eval_loss": 4.0},
                       {"step": 8, "val_f1": pytest.approx(0.4), "eval_loss": 3.0},
                       {"step": 12, "val_f1": pytest.approx(0.6), "eval_loss": 2.0}]]


def test_p2_eval_at_rungs_gives_both_strategies_the_rungs_asha_decides_at():
    import argparse

    from bench.run import strategy_sets

    args = argparse.Namespace(p2_trials=6, p2_concurrency=1, p2_apart=False, p2_space="bench/space-wide.yaml", p2_steps=72,
                              p2_evals=18, reduction_factor=3.0, p2_eval_at_rungs=True, p2_startup_trials=None)
    b = argparse.Namespace(args=args, out=None)
    sets = {flag: strategy_sets(b, 0, flag) for flag in (True, False)}
    for tpe_asha, extra in sets.items():
        assert "trial.eval.at_steps=[4, 12, 36]" in extra, (tpe_asha, extra)
    args.p2_eval_at_rungs = False
    assert not any("at_steps" in x for x in strategy_sets(b, 0, True) + strategy_sets(b, 0, False))
    # --p2-startup-trials changes TPE's start-up trials only; the search's own default otherwise
    assert not any("n_startup_trials" in x for x in sets[True] + sets[False])
    args.p2_startup_trials = 1
    assert "searcher.n_startup_trials=1" in strategy_sets(b, 0, True)
    assert not any("n_startup_trials" in x for x in strategy_sets(b, 0, False))
    # --tie-break orders TPE + ASHA's ties, at a rung and for TPE; random search has neither
    assert not any("tie_break" in x for x in sets[True] + sets[False])  # namespaces without it: the search's own
    args.tie_break = "val_ap"
    assert {"scheduler.tie_break=val_ap", "searcher.tie_break=val_ap"} <= set(strategy_sets(b, 0, True))
    assert not any("tie_break" in x for x in strategy_sets(b, 0, False))
    # --p2-batch-size and --p2-set reach both strategies alike, after the benchmark's own settings (so they win)
    assert not any("batch_size" in x for x in sets[True] + sets[False])
    args.p2_batch_size, args.p2_set = 4, ["trial.optim.lr_scheduler=constant"]
    for tpe_asha in (True, False):
        extra = strategy_sets(b, 0, tpe_asha)
        assert "trial.optim.batch_size=4" in extra
        assert extra[-2:] == ["--set", "trial.optim.lr_scheduler=constant"]


def test_p2_task_style_runs_the_style_search_on_its_wide_space_and_its_objective(tmp_path):
    import argparse

    from bench.run import ROOT, STYLE_SPACE, WIDE_SPACE, p2_config, p2_objective, p2_space, strategy_sets

    args = argparse.Namespace(p2_trials=6, p2_concurrency=1, p2_apart=False, p2_space=None, p2_steps=72,
                              p2_evals=18, reduction_factor=3.0, p2_eval_at_rungs=True, p2_startup_trials=None,
                              p2_task="style", p2_eval_examples=32)
    b = argparse.Namespace(args=args, out=None)
    assert p2_config(vars(args)) == "configs/style_squad.yaml"
    assert p2_objective(vars(args)) == ("val_separation", "max")
    assert p2_space(b) == (ROOT / STYLE_SPACE).resolve()
    for tpe_asha in (True, False):
        extra = strategy_sets(b, 0, tpe_asha)
        assert f"space={(ROOT / STYLE_SPACE).resolve()}" in extra
        assert "trial.style.eval_questions=32" in extra  # the style task's evaluation size, not max_examples
    # the classification task, and reports from before --p2-task, are the SMS spam search on its wide space
    for settings in ({"p2_task": "classification"}, {}):
        assert p2_config(settings) == "configs/sms_spam.yaml" and p2_objective(settings) == ("val_f1", "max")
    args.p2_task = "classification"
    assert p2_space(b) == (ROOT / WIDE_SPACE).resolve()
    assert not any("style" in x for x in strategy_sets(b, 0, True))
    # the style space's keys are the style search's settings (loading it checks every key against TrialSettings)
    from search.space import load_space

    assert "style.terse_repeats" in load_space(ROOT / STYLE_SPACE).params
    # the classification search's own options are refused for the style task before anything runs
    from bench.run import main

    for flags in (["--p2-space", "cold"], ["--tie-break", "val_ap"]):
        with pytest.raises(SystemExit):
            main(["--p2-task", "style", *flags, "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_searcher_bound_counts_a_separation_of_one_as_no_score():
    """Token separation 1 is both styles at one length: a trial that learned nothing, as F1 0 is for classification.
    The bound's oracle proposes only curves that rose above it."""
    from bench.replay import NO_SIGNAL, searcher_bound

    def sep(points):
        return [{"step": s, "val_separation": v, "eval_loss": loss} for s, v, loss in points]

    good = sep([(4, 1.0, 2.0), (8, 3.0, 1.5), (12, 2.0, 1.0)])
    flat = sep([(4, 1.0, 9.0), (8, 1.0, 8.9), (12, 1.0, 8.8)])
    b = searcher_bound([good, flat, flat], metric="val_separation", tie_break="eval_loss", every=4, steps=12,
                       reduction_factor=2.0, fixed=10.0, work=60.0, trials=3, startup=1, seeds=3, target=1.5,
                       tops=(1.0,), replays=200, floor=NO_SIGNAL["val_separation"])
    assert b["curves_scored"] == 1 and b["rows"][0]["curves"] == 1
    above_zero = searcher_bound([good, flat, flat], metric="val_separation", tie_break="eval_loss", every=4, steps=12,
                                reduction_factor=2.0, fixed=10.0, work=60.0, trials=3, startup=1, seeds=3,
                                target=1.5, tops=(1.0,), replays=10)
    assert above_zero["curves_scored"] == 3  # with F1's floor every flat curve would count as scored


def test_the_report_names_p2s_batch_size_from_the_flag_a_p2_set_or_the_searchs_default():
    from bench.run import p2_batch

    assert p2_batch({"p2_batch_size": 4}) == 4
    assert p2_batch({"p2_set": ["searcher.seed=1", "trial.optim.batch_size=8"]}) == 8  # runs before the flag
    assert p2_batch({}) == 16  # reports from before either: TrialSettings' default


def test_model_flops_per_token_by_hand_and_against_the_models_own_linear_layers():
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bench.throughput import SHAPES, frozen_matmul_params, model_flops_per_token

    cfg = SHAPES["tiny"]  # h 192, MLP 512, 4 heads and 2 KV heads of 48, 3 layers, vocab 4096
    per_layer = 192 * 192 + 2 * 192 * 96 + 192 * 192 + 3 * 192 * 512
    assert frozen_matmul_params(cfg) == 3 * per_layer + 4096 * 192 == 2002944
    f = model_flops_per_token(cfg, lora_params=1000, lengths=[2, 4])
    # attention: 6 x layers x (heads x head_dim) x a token's example length, token-weighted: (2*2 + 4*4) / 6
    assert f["attention"] == pytest.approx(6 * 3 * 192 * 20 / 6)
    assert f["total"] == pytest.approx(4 * 2002944 + 6 * 1000 + 11520)
    for shape in SHAPES.values():  # every matmul weight of the real architecture, LM head included, is counted
        with torch.device("meta"):
            model = Qwen3ForCausalLM(Qwen3Config(**shape))
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert frozen_matmul_params(shape) == linear


def test_throughput_run_times_real_tokens_of_both_loops_and_writes_its_report(tmp_path):
    from bench.throughput import example_lengths, main

    out = tmp_path / "out"
    rc = main(["--shape", "tiny", "--only", "search:4bit:free", "bare:4bit:padded", "--steps", "2", "--warmup", "1",
               "--batch", "8", "--peak-tflops", "1", "--out", str(out), "--model-cache", str(tmp_path / "models")])
    assert rc == 0
    report = json.loads((out / "throughput.json").read_text())
    search, bare = report["runs"]
    assert (search["loop"], search["padding"], bare["loop"], bare["padding"]) == ("search", "free", "bare", "padded")
    assert report["model"] == str(tmp_path / "models" / "tiny-3l")
    lengths = example_lengths(report["model"], 256)
    for r in (search, bare):
        assert r["timed_steps"] == 2 and r["tokens_per_s"] > 0
        assert 2 * 8 * min(lengths) <= r["tokens"] <= 2 * 8 * max(lengths)
        assert r["mfu"] == pytest.approx(r["model_tflops_per_s"], rel=0.01, abs=1e-3)  # peak 1 TFLOP/s
        # every timed step's own time, adding up to the timed window
        assert len(r["step_times"]) == 2 and sum(r["step_times"]) == pytest.approx(r["seconds"], abs=2e-3)
        assert r["median_step_seconds"] == pytest.approx(sum(r["step_times"]) / 2, abs=1e-4)
        assert r["max_step_seconds"] == max(r["step_times"]) and r["round"] == 1
        assert r["gradient_checkpointing"] is False
    # same seed, same data order: the same examples, so the same real tokens, padded or not
    assert search["tokens"] == bare["tokens"]
    md = (out / "throughput.md").read_text()
    assert "| search | 4-bit nf4 | free | float32 |" in md and "| bare | 4-bit nf4 | padded |" in md
    # on a CPU the search keeps the unquantized modules in fp32 (model.unquantized_dtype auto)
    assert search["unquantized_dtype"] == "float32"


def test_throughput_gradient_checkpointing_reaches_both_loops(tmp_path):
    from bench.throughput import main

    out = tmp_path / "out"
    rc = main(["--shape", "tiny", "--only", "search:4bit:padded", "bare:4bit:padded", "--gradient-checkpointing",
               "--steps", "1", "--warmup", "1", "--batch", "4", "--out", str(out),
               "--model-cache", str(tmp_path / "models")])
    assert rc == 0
    report = json.loads((out / "throughput.json").read_text())
    assert [r["gradient_checkpointing"] for r in report["runs"]] == [True, True]
    assert report["settings"]["gradient_checkpointing"] is True
    assert "; gradient checkpointing." in (out / "throughput.md").read_text()


def test_throughput_concurrent_copies_start_together_share_the_cpus_and_add_up(tmp_path):
    import os

    from bench.throughput import main

    out = tmp_path / "out"
    rc = main(["--shape", "tiny", "--only", "search:4bit:free", "--concurrent", "2", "--steps", "2", "--warmup", "0",
               "--batch", "4", "--out", str(out), "--model-cache", str(tmp_path / "models")])
    assert rc == 0
    (run,) = json.loads((out / "throughput.json").read_text())["runs"]
    a, b = run["copies"]
    assert run["concurrent"] == 2 and a["timed_steps"] == b["timed_steps"] == 2
    # each copy trains on its share of the CPUs, and both start training together (the barrier)
    assert a["threads"] == b["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    assert abs(a["window"][0] - b["window"][0]) < 1.0
    # all their tokens over the span from the first start to the last end
    span = max(a["window"][1], b["window"][1]) - min(a["window"][0], b["window"][0])
    assert run["tokens"] == a["tokens"] + b["tokens"] and run["seconds"] == pytest.approx(span, abs=2e-3)
    assert run["tokens_per_s"] == pytest.approx(run["tokens"] / span, rel=1e-3)
    assert sorted(a["step_times"] + b["step_times"])[-1] == run["max_step_seconds"]
    assert "2 copies of each configuration at once" in (out / "throughput.md").read_text()


def test_a_copy_waits_at_the_start_until_every_copy_is_ready(tmp_path):
    import threading

    from bench.throughput import wait_for_copies

    done = threading.Event()
    waiter = threading.Thread(target=lambda: (wait_for_copies(tmp_path, 2, 0), done.set()))
    waiter.start()
    assert not done.wait(0.5)  # copy 1 is not ready yet
    wait_for_copies(tmp_path, 2, 1)
    assert done.wait(5)
    waiter.join()
    with pytest.raises(TimeoutError, match="only 2 of 3 copies"):
        wait_for_copies(tmp_path, 3, 0, timeout=0.2)


def test_throughput_rounds_alternate_the_order_and_ratios_compare_medians(tmp_path):
    from bench.throughput import main, ratios

    out = tmp_path / "out"
    # every configuration stopped at once (no training): this checks which ran when
    rc = main(["--shape", "tiny", "--only", "search:4bit:padded", "bare:4bit:padded", "--rounds", "3",
               "--config-timeout", "0.5", "--out", str(out), "--model-cache", str(tmp_path / "models")])
    assert rc == 1
    report = json.loads((out / "throughput.json").read_text())
    assert [(r["round"], r["loop"]) for r in report["runs"]] == [
        (1, "search"), (1, "bare"), (2, "bare"), (2, "search"), (3, "search"), (3, "bare")]
    assert report["finished"] is True and report["settings"]["rounds"] == 3
    assert "medians of real tokens/s over 3 rounds" in (out / "throughput.md").read_text()

    def run(loop, tps):
        return {"loop": loop, "quant": "4bit", "padding": "padded", "tokens_per_s": tps}

    # search medians 100 (90, 100, 400), bare 50 (40, 50, 60): 2.00, where the means would give 2.53
    assert ratios([run("search", 90), run("bare", 40), run("bare", 50), run("search", 400), run("search", 100),
                   run("bare", 60)]) == ["search/bare 4bit padded 2.00"]
    with pytest.raises(SystemExit):
        main(["--shape", "tiny", "--rounds", "0", "--out", str(out), "--model-cache", str(tmp_path / "models")])


def test_throughput_records_a_configuration_past_its_time_limit_as_failed_and_still_writes_the_report(tmp_path):
    from bench.throughput import main

    out = tmp_path / "out"
    rc = main(["--shape", "tiny", "--only", "search:4bit:padded", "--steps", "2", "--config-timeout", "0.5",
               "--out", str(out), "--model-cache", str(tmp_path / "models")])
    assert rc == 1
    report = json.loads((out / "throughput.json").read_text())
    assert report["runs"] == [{"loop": "search", "quant": "4bit", "padding": "padded",
                               "round": 1,
                               "error": "timed out after 0.5 s"}]
    assert report["finished"] is True  # every configuration of the grid was tried
    md = (out / "throughput.md").read_text()
    assert "| search | 4bit | padded | | failed: timed out after 0.5 s | | | | | 1 |" in md


def test_a_search_whose_curve_is_not_its_own_trials_is_left_out_of_the_ratio():
    """The curve comes from Tune's experiment directory, the trials from the search's summary: if they disagree (as
    one seed's random search did on 2026-12-04, when its curve came out as the other search's: a Tune staging
    directory both searches shared, since fixed), that seed has no ratio and the median is taken over the others."""
    from bench.run import median_ratio, mismatched_trials

    trials = [{"trial_id": "a"}, {"trial_id": "b"}]
    assert mismatched_trials({"a": [], "b": []}, trials) is None
    error = mismatched_trials({"c": [], "d": []}, trials)
    assert error == ("Tune's experiment directory gave the curves of trials ['c', 'd'], the search's summary lists "
                     "['a', 'b']")
    runs = {"tpe_asha": {"best_value": 0.75, "curve": [(70.0, 0.75)], "wall_seconds": 140.0, "curve_error": None},
            "random_fifo": {"best_value": 0.5, "curve": [], "wall_seconds": 180.0, "curve_error": error}}
    c = compare(runs, "max")
    assert c["ratio"] is None and c["excluded"] == error and c["tpe_asha"] is None
    seeds = [c, {"ratio": 2.0, "bound": None}, {"ratio": 1.0, "bound": None}]
    assert median_ratio(seeds) == (1.5, None)  # over the two readable seeds


def test_p2_first_seed_runs_the_seeds_from_it_and_hands_each_to_both_searches(monkeypatch):
    """`--p2-first-seed 2 --p2-seeds 2` (one more seed for an earlier run) runs seeds 2 and 3, each search told its
    seed; the searches themselves are replaced by their figures (no Ray here: what is under test is which seeds)."""
    import argparse

    import bench.run as br

    args = argparse.Namespace(p2_trials=6, p2_concurrency=1, p2_apart=False, p2_space="bench/space-wide.yaml",
                              p2_steps=72, p2_evals=18, reduction_factor=3.0, p2_eval_at_rungs=True,
                              p2_startup_trials=None, p2_seeds=2, p2_first_seed=2)
    b = argparse.Namespace(args=args, out=None)
    told = []

    def seed_runs(bench, seed):
        searcher_seeds = set()
        for tpe_asha in (True, False):
            sets = br.strategy_sets(bench, seed, tpe_asha)
            searcher_seeds |= {x.split("=", 1)[1] for x in sets if x.startswith("searcher.seed=")}
        told.append((seed, searcher_seeds))
        run = {"best_value": 0.5, "curve": [(10.0, 0.5)], "wall_seconds": 10.0, "steps_run": 72, "steps_full": 72,
               "fixed_seconds": [], "work_seconds_full": [], "best_stopped_early": False, "seed": seed,
               "mlflow_seconds": 0.0, "search_wall_seconds": 10.0, "data": []}
        return {key: {**run, "name": f"p2-{key}-seed{seed}"} for key in ("tpe_asha", "random_fifo")}

    monkeypatch.setattr(br, "seed_runs", seed_runs)
    monkeypatch.setattr("search.driver.resolve_model", lambda cfg: None)
    report = br.p2(b)
    assert told == [(2, {"2"}), (3, {"3"})]
    assert [s["seed"] for s in report["seeds"]] == [2, 3]
    assert [r["name"] for r in report["runs"]] == ["p2-tpe_asha-seed2", "p2-random_fifo-seed2",
                                                   "p2-tpe_asha-seed3", "p2-random_fifo-seed3"]
