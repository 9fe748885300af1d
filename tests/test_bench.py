"""The benchmark's arithmetic (bench/run.py) on constructed histories, against hand-computed values."""

from __future__ import annotations

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
