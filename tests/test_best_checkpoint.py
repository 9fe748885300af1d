"""A trial is judged by, and exports, its best checkpoint: the style task's separation peaks mid-trial and falls."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd

from search.driver import best_result
from search.tracking import MlflowTrialCallback


def _result(tmp_path, values, deleted=()):
    rows = []
    for step, v in values:
        ckpt = tmp_path / f"checkpoint_{step}"
        if step not in deleted:
            ckpt.mkdir()
        rows.append({"step": step, "val_separation": v, "checkpoint_path": str(ckpt)})
    return SimpleNamespace(metrics_dataframe=pd.DataFrame(rows), metrics=rows[-1])


def test_the_best_evaluation_with_a_checkpoint_is_chosen_not_the_last(tmp_path):
    r = _result(tmp_path, [(50, 1.0), (100, 9.33), (150, 2.4), (200, 1.91)])  # style-s3 trial e55c4f79's curve
    best = best_result(r, "val_separation", "max")
    assert best["step"] == 100 and best["val_separation"] == 9.33
    assert best_result(r, "val_separation", "min")["step"] == 50


def test_a_deleted_best_checkpoint_falls_back_to_the_last_result(tmp_path):
    r = _result(tmp_path, [(50, 1.0), (100, 9.33), (200, 1.91)], deleted=(100,))
    assert best_result(r, "val_separation", "max") is None  # collect_trials then uses r.metrics (the last)
    assert best_result(SimpleNamespace(metrics_dataframe=None), "val_separation", "max") is None


def test_mlflow_logs_the_adapter_of_the_trials_best_checkpoint():
    cb = MlflowTrialCallback("sqlite:///unused.db", "0", "parent", "s", metric="val_f1", mode="max")
    for step, v in [(100, 0.5), (200, 0.8), (300, 0.7)]:
        result = {"step": step, "val_f1": v, "checkpoint_path": f"/ckpt/{step}"}
        if cb._improves("t1", result):
            cb.last_checkpoint["t1"] = result["checkpoint_path"]
    assert cb.last_checkpoint["t1"] == "/ckpt/200"
    plain = MlflowTrialCallback("sqlite:///unused.db", "0", "parent", "s")  # no objective: the last one
    assert all(plain._improves("t1", {"step": s}) for s in (1, 2))
