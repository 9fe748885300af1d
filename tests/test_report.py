"""The search report: plots from a finished search, in its directory and on its parent MLflow run, and
`python -m search.report NAME` regenerating them."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from search.report import PLOTS, build_study, distributions, main, trial_histories, write_report

ROOT = Path(__file__).resolve().parent.parent


def assert_png(path: Path, min_size=(400, 200)) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1], (path, im.size)


def hand_made_search(tmp_path: Path, mode: str = "max", values=(0.74, 0.12, None, 0.55)) -> Path:
    """A search directory as search.run leaves it, minus Ray Tune's trial directories (a moved or pruned search)."""
    from search.config import dump_config, load_config

    out = tmp_path / "runs" / "hand"
    out.mkdir(parents=True)
    cfg = load_config(None, [f"output_dir={tmp_path / 'runs'}", f"objective.mode={mode}"], "hand")
    (out / "config.yaml").write_text(dump_config(cfg))
    pts = [(16, 2, 0.005, 0.05, False, 0.3), (8, 1, 0.0112, 0.0964, True, 0.335), (32, 4, 0.002, 0.01, False, 0.45),
           (4, 1, 0.009, 0.02, False, 0.2)]
    keys = ["lora.r", "lora.alpha_per_rank", "optim.learning_rate", "lora.dropout", "lora.use_rslora",
            "data.oversample_minority"]
    trials = []
    for i, (p, v) in enumerate(zip(pts, values)):
        trials.append({"trial_id": f"t{i}", "status": "ERROR" if v is None else "TERMINATED",
                       "params": dict(zip(keys, p)), "value": v, "steps": 300 if i != 1 else 100,
                       "stopped_early": i == 1, "error": "boom" if v is None else None})
    summary = {"name": "hand", "objective": {"metric": "val_f1", "mode": mode}, "best": None, "trials": trials,
               "mlflow": {}, "wall_seconds": 60.0}
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def test_report_from_summary_and_space_alone(tmp_path):
    out = hand_made_search(tmp_path)
    result = write_report(out, log_to_mlflow=False)
    assert result["dir"] == out / "report" and not result["mlflow"]
    for name in PLOTS:
        assert_png(out / "report" / name)
    # no Tune results: no per-step values, so the learning curves say why instead of failing the report
    assert list(result["notes"]) == ["learning_curves.png"] and "per-step" in result["notes"]["learning_curves.png"]
    rows = list(csv.DictReader((out / "report" / "trials.csv").open()))
    assert [r["trial_id"] for r in rows] == ["t0", "t1", "t2", "t3"] and rows[1]["stopped_early"] == "True"


def test_rebuilt_optuna_study_uses_the_space_distributions(tmp_path):
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    for mode, direction in [("max", StudyDirection.MAXIMIZE), ("min", StudyDirection.MINIMIZE)]:
        out = hand_made_search(tmp_path / mode, mode)
        summary = json.loads((out / "summary.json").read_text())
        dists = distributions(out, summary["trials"])
        assert dists["optim.learning_rate"] == FloatDistribution(1e-3, 1.5e-2, log=True)
        assert dists["lora.r"] == CategoricalDistribution([4, 8, 16, 32])
        study = build_study(summary, dists, {})
        assert study.direction == direction
        assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL,
                                                   TrialState.COMPLETE]
        assert [t.value for t in study.trials] == [0.74, 0.12, None, 0.55]
        assert study.trials[1].user_attrs["stopped_early"] is True
        assert study.best_trial.user_attrs["trial_id"] == ("t0" if mode == "max" else "t1")


def test_distributions_inferred_when_the_space_file_is_gone(tmp_path):
    out = hand_made_search(tmp_path)
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace(
        "spaces/classification.yaml", "spaces/moved-away.yaml"))
    summary = json.loads((out / "summary.json").read_text())
    dists = distributions(out, summary["trials"])
    assert dists["optim.learning_rate"].low == 0.002 and dists["optim.learning_rate"].high == 0.0112
    assert dists["lora.use_rslora"].choices == (False, True)
    write_report(out, log_to_mlflow=False)
    assert_png(out / "report" / "parallel_coordinate.png")


def test_importances_with_too_few_trials_explain_themselves(tmp_path):
    out = hand_made_search(tmp_path, values=(0.7, None, None, None))
    result = write_report(out, log_to_mlflow=False)
    assert "param_importances.png" in result["notes"]
    assert_png(out / "report" / "param_importances.png", min_size=(300, 100))


def test_report_cli_refuses_an_unknown_search_in_one_line(tmp_path, capsys):
    assert main(["nope", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "summary.json: no finished search" in err


# -- on a real finished search (tests/conftest.py: small_search) -------------------------------------------------


@pytest.mark.slow
def test_the_search_writes_its_report_and_logs_it_to_the_parent_run(small_search):
    from mlflow.tracking import MlflowClient

    work, stdout = small_search
    out = work / "runs" / "e2e"
    for name in PLOTS:
        assert_png(out / "report" / name)
    summary = json.loads((out / "summary.json").read_text())
    c = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    logged = {a.path for a in c.list_artifacts(summary["mlflow"]["parent_run_id"], "report")}
    assert {f"report/{name}" for name in PLOTS} <= logged and "report/trials.csv" in logged
    assert f"report:       {out / 'report'}/" in stdout
    assert f"python -m search.report e2e --output-dir {work / 'runs'}" in stdout


@pytest.mark.slow
def test_report_reads_per_step_results_and_wall_times_from_tune(small_search):
    work, _ = small_search
    out = work / "runs" / "e2e"
    summary = json.loads((out / "summary.json").read_text())
    histories = trial_histories(out, "val_f1")
    assert set(histories) == {t["trial_id"] for t in summary["trials"]}
    for rows in histories.values():
        assert [r["step"] for r in rows] == [3, 6]
        assert all(r["value"] is not None and r["timestamp"] > 1.6e9 for r in rows)
    study = build_study(summary, distributions(out, summary["trials"]), histories)
    assert all(sorted(t.intermediate_values) == [3, 6] for t in study.trials)


@pytest.mark.slow
def test_report_command_regenerates_the_plots_of_a_finished_search(small_search):
    work, _ = small_search
    report = work / "runs" / "e2e" / "report"
    for p in report.iterdir():
        p.unlink()
    proc = subprocess.run([sys.executable, "-m", "search.report", "e2e", "--output-dir", "runs"],  # relative
                          cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in PLOTS:
        assert_png(report / name)
    assert "report written to" in proc.stdout and "logged to the parent MLflow run" in proc.stdout
    # with Tune's per-step results the curves are drawn (importances need 2 different objective values, which 6
    # steps of the tiny model need not give)
    assert "learning_curves.png: not available" not in proc.stdout
    assert "parallel_coordinate.png: not available" not in proc.stdout
