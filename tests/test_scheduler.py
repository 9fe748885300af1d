"""ASHA's tie-break: trials tied at a rung's cutoff (every F1-0 trial) are ordered by eval loss, so some are stopped."""

from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler

from search.config import load_config
from search.resilience import ASHA


def rung_decisions(tie_break):
    """Six trials reach the first rung (step 10) in turn; what ASHA decides for each, by trial name."""
    asha = ASHA(time_attr="step", metric="val_f1", mode="max", max_t=40, grace_period=10, reduction_factor=3,
                tie_break=tie_break)
    arrivals = [("a", 0.0, 1.0), ("b", 0.0, 2.0), ("c", 0.0, 3.0), ("d", 0.5, 0.5), ("e", 0.0, 0.5), ("f", 0.0, 4.0)]
    out = {}
    for name, f1, loss in arrivals:
        trial = SimpleNamespace(trial_id=name)
        asha.on_trial_add(None, trial)
        out[name] = asha.on_trial_result(None, trial, {"step": 10, "val_f1": f1, "eval_loss": loss})
    return out


def test_ray_asha_alone_never_stops_a_trial_tied_at_zero():
    # by the time e and f arrive, 3 of 4 recorded scores are 0: the 2/3 quantile is 0, and 0 < 0 is false
    assert set(rung_decisions(None).values()) == {TrialScheduler.CONTINUE}


def test_tie_break_stops_the_tied_trial_with_the_higher_eval_loss():
    d = rung_decisions("eval_loss")
    assert d["a"] == d["d"] == TrialScheduler.CONTINUE  # the first to arrive; the one trial above 0
    assert d["b"] == d["c"] == TrialScheduler.STOP  # F1 0 like a, with a higher loss than a's
    # when e and f arrive, a, b, c (F1 0, losses 1, 2, 3) and d (0.5) are recorded: the cutoff is a's nudged value
    assert d["e"] == TrialScheduler.CONTINUE  # F1 0 with loss 0.5: better than a
    assert d["f"] == TrialScheduler.STOP  # F1 0 with loss 4: below the cutoff


def test_tie_break_never_reorders_different_objective_values():
    asha = ASHA(time_attr="step", metric="val_f1", mode="max", max_t=40, grace_period=10, reduction_factor=2,
                tie_break="eval_loss")
    for name, f1, loss in [("a", 0.30, 1e9), ("b", 0.30001, 1e9)]:
        trial = SimpleNamespace(trial_id=name)
        asha.on_trial_add(None, trial)
        asha.on_trial_result(None, trial, {"step": 10, "val_f1": f1, "eval_loss": loss})
    trial = SimpleNamespace(trial_id="c")
    asha.on_trial_add(None, trial)
    # 0.30002 with the lowest loss vs 0.30001 with a huge one: the objective alone decides (the nudge is < 1e-6)
    assert asha.on_trial_result(None, trial, {"step": 10, "val_f1": 0.30002, "eval_loss": 0.0}) == "CONTINUE"
    rec = asha._brackets[0]._rungs[-1][1]
    assert rec["a"] < rec["b"] < rec["c"] and rec["b"] == pytest.approx(0.30001, abs=1e-6)


def test_min_mode_nudges_upward():
    asha = ASHA(time_attr="step", metric="eval_loss", mode="min", tie_break="eval_loss")
    assert asha._ranked({"eval_loss": 2.0}) == {"eval_loss": 2.0}  # the objective itself: nothing to break
    asha2 = ASHA(time_attr="step", metric="val_len_terse", mode="min", tie_break="eval_loss")
    assert asha2._ranked({"val_len_terse": 3.0, "eval_loss": 1.0})["val_len_terse"] > 3.0


def test_config_default_and_off(tmp_path):
    assert load_config("configs/sms_spam.yaml", []).scheduler.tie_break == "eval_loss"
    assert load_config("configs/sms_spam.yaml", ["scheduler.tie_break=null"]).scheduler.tie_break is None


@pytest.mark.parametrize("sets, rungs", [
    (["trial.optim.max_steps=72", "trial.eval.every_steps=4", "scheduler.reduction_factor=3"], [4, 12, 36]),
    (["trial.optim.max_steps=300", "trial.eval.every_steps=25"], [25, 50, 100, 200]),  # reduction factor 2
    (["trial.optim.max_steps=30", "trial.eval.every_steps=10", "scheduler.reduction_factor=2.5"], [10, 25]),
    (["trial.optim.max_steps=24", "trial.eval.every_steps=4", "scheduler.grace_period=2"], [8, 16]),
])
def test_eval_at_rungs_evaluates_where_asha_decides(sets, rungs):
    """scheduler.eval_at_rungs: trials evaluate at ASHA's rungs and at the end. Each rung is a step at which the
    search's own ASHA, fed a trial that trails there, stops it; one step earlier it still lets the trial go on."""
    cfg = load_config("configs/sms_spam.yaml", sets + ["scheduler.eval_at_rungs=true"])
    last = cfg.trial.optim.max_steps
    assert cfg.asha_rungs() == rungs
    assert cfg.trial_for_trials().eval.at_steps == rungs and cfg.trial_for_trials().eval.steps(last) == rungs + [last]
    assert cfg.trial.eval.at_steps is None  # the search's own settings keep every_steps for their meaning of a round
    every, s = cfg.trial.eval.every_steps, cfg.scheduler
    for rung in rungs:
        asha = ASHA(time_attr="step", metric="val_f1", mode="max", max_t=cfg.asha_max_t(),
                    grace_period=s.grace_period * every, reduction_factor=s.reduction_factor, tie_break=None)
        leader, trailer = SimpleNamespace(trial_id="leader"), SimpleNamespace(trial_id="trailer")
        for t in (leader, trailer):
            asha.on_trial_add(None, t)
        for step in [r for r in rungs if r <= rung]:
            asha.on_trial_result(None, leader, {"step": step, "val_f1": 0.9})
        for step in [r for r in rungs if r < rung]:  # the trailer ties the leader until this rung
            assert asha.on_trial_result(None, trailer, {"step": step, "val_f1": 0.9}) == TrialScheduler.CONTINUE
        assert asha.on_trial_result(None, trailer, {"step": rung - 1, "val_f1": 0.1}) == TrialScheduler.CONTINUE
        assert asha.on_trial_result(None, trailer, {"step": rung, "val_f1": 0.1}) == TrialScheduler.STOP
    # off (the default), or without ASHA: every every_steps
    assert load_config("configs/sms_spam.yaml", sets).trial_for_trials().eval.at_steps is None
    off = load_config("configs/sms_spam.yaml", sets + ["scheduler.eval_at_rungs=true", "scheduler.type=none"])
    assert off.trial_for_trials().eval.at_steps is None
    # a grace period past the last step: no rung is ever reached, so trials evaluate as usual
    late = load_config("configs/sms_spam.yaml", sets + ["scheduler.eval_at_rungs=true", "scheduler.grace_period=50"])
    assert late.asha_rungs() == [] and late.trial_for_trials().eval.at_steps is None


def test_at_steps_must_increase():
    from trainables.settings import SettingsError, load_trial_settings

    with pytest.raises(SettingsError, match=r"at_steps must be increasing positive step numbers.*\[12, 4\]"):
        load_trial_settings({"eval.at_steps": [12, 4]})
    with pytest.raises(SettingsError, match="at_steps"):
        load_trial_settings({"eval.at_steps": [0, 4]})


@pytest.mark.parametrize("tie_break", [None, "eval_loss"])
def test_tpe_is_told_ties_ordered_by_eval_loss(tie_break):
    """Three trials all at F1 0: TPE's good group (its best trial) is the one with the lowest eval loss, not the first
    told; the values it is told stay within 1e-6 of the objective. Ray's OptunaSearch with a real Optuna study."""
    from optuna.samplers import TPESampler
    from ray import tune

    from search.resilience import TieBreakingOptunaSearch

    searcher = TieBreakingOptunaSearch(space={"lr": tune.loguniform(1e-5, 5e-2)}, metric="val_f1", mode="max",
                                       sampler=TPESampler(seed=0, n_startup_trials=3), tie_break=tie_break)
    losses = {"t0": 3.0, "t1": 0.7, "t2": 2.0}
    params = {t: searcher.suggest(t) for t in losses}
    for t, loss in losses.items():
        searcher.on_trial_complete(t, {"val_f1": 0.0, "eval_loss": loss, "step": 4})
    study = searcher._ot_study
    assert all(abs(v) < 1e-6 for v in (tr.value for tr in study.trials))
    best = study.best_trial.params["lr"]
    assert best == (params["t1"] if tie_break else params["t0"])["lr"]


def test_searcher_tie_break_default_and_off():
    assert load_config("configs/sms_spam.yaml", []).searcher.tie_break == "eval_loss"
    assert load_config("configs/sms_spam.yaml", ["searcher.tie_break=null"]).searcher.tie_break is None


def test_average_precision_tie_break_keeps_the_tied_trial_that_ranks_the_minority_label_best():
    """val_ap is higher-is-better: among trials at F1 0, the one with the lowest average precision is stopped."""
    asha = ASHA(time_attr="step", metric="val_f1", mode="max", max_t=40, grace_period=10, reduction_factor=3,
                tie_break="val_ap")
    out = {}
    for name, f1, ap in [("a", 0.0, 0.5), ("b", 0.0, 0.3), ("c", 0.0, 0.9), ("d", 0.0, 0.2), ("e", 0.2, 0.1)]:
        trial = SimpleNamespace(trial_id=name)
        asha.on_trial_add(None, trial)
        out[name] = asha.on_trial_result(None, trial, {"step": 10, "val_f1": f1, "val_ap": ap, "eval_loss": 1.0})
    assert out["a"] == out["c"] == out["e"] == TrialScheduler.CONTINUE  # first; best AP; the one F1 above 0
    assert out["b"] == out["d"] == TrialScheduler.STOP  # F1 0 like a, ranking the minority label worse
    assert asha._ranked({"val_f1": 0.0, "val_ap": 1.0})["val_f1"] == 0.0  # a perfect ranking: no nudge down
    assert -1e-6 < asha._ranked({"val_f1": 0.0, "val_ap": 0.0})["val_f1"] < 0.0


def test_a_tie_break_the_task_does_not_report_is_refused_at_load(tmp_path):
    assert load_config("configs/sms_spam.yaml", ["scheduler.tie_break=val_ap"]).scheduler.tie_break == "val_ap"
    with pytest.raises(ValueError, match="searcher.tie_break 'val_ap' is not reported by task 'style'"):
        load_config("configs/style_squad.yaml", ["searcher.tie_break=val_ap"])
