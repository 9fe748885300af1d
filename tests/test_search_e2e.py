"""A real 2-trial search: local Ray, tiny 4-bit model, SMS data, a real sqlite MLflow store; then export."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_search(small_search):
    """The session's finished 2-trial search (tests/conftest.py: small_search), shared with the report and
    MLflow UI tests so that it runs once."""
    return small_search


def test_summary_lists_every_trial_and_the_best(finished_search):
    work, stdout = finished_search
    summary = json.loads((work / "runs" / "e2e" / "summary.json").read_text())
    assert summary["name"] == "e2e" and summary["objective"] == {"metric": "val_f1", "mode": "max"}
    assert len(summary["trials"]) == 2 and all(t["status"] == "TERMINATED" for t in summary["trials"])
    assert all(t["steps"] == 6 and t["value"] is not None for t in summary["trials"])
    best = summary["best"]
    assert best["value"] == max(t["value"] for t in summary["trials"])
    assert (Path(best["adapter_dir"]) / "adapter_model.safetensors").exists()
    # each trial is judged by its best evaluation (val_f1 at step 3 or 6), and the exported adapter is that checkpoint
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    for t in summary["trials"]:
        run = c.search_runs([summary["mlflow"]["experiment_id"]], f"tags.`qlora.trial_id` = '{t['trial_id']}'")[0]
        history = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "val_f1")}
        assert t["value"] == pytest.approx(max(history.values()))
        assert history[t["best_step"]] == pytest.approx(t["value"])
    saved = json.loads((Path(best["adapter_dir"]) / "metrics.json").read_text())
    assert saved["step"] == best["best_step"] and saved["val_f1"] == pytest.approx(best["value"])
    # the space's known-good start point was evaluated
    assert any(t["params"].get("lora.r") == 16 and t["params"].get("optim.learning_rate") == 5e-3
               for t in summary["trials"])
    assert str(work / "runs" / "e2e" / "summary.json") in stdout and "mlflow ui" in stdout


def test_mlflow_holds_one_parent_and_a_child_per_trial(finished_search):
    from mlflow.tracking import MlflowClient

    work, _ = finished_search
    summary = json.loads((work / "runs" / "e2e" / "summary.json").read_text())
    c = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = c.search_runs([summary["mlflow"]["experiment_id"]])
    parents = [r for r in runs if r.data.tags.get("qlora.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["mlflow"]["parent_run_id"]]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3
    assert parents[0].data.tags["git_commit"] and "version.ray" in parents[0].data.tags
    for child in children:
        assert {"lora.r", "optim.learning_rate", "data.oversample_minority"} <= child.data.params.keys()
        history = c.get_metric_history(child.info.run_id, "val_f1")
        assert [m.step for m in history] == [3, 6]
        files = {a.path for a in c.list_artifacts(child.info.run_id, "adapter")}
        # a sqlite store keeps its artifacts beside its file, not in the working directory's ./mlruns
        assert child.info.artifact_uri.startswith((work / "mlruns").as_uri() + "/")
        assert {"adapter/adapter_model.safetensors", "adapter/tokenizer.json", "adapter/dtypes.json"} <= files
        assert child.info.status == "FINISHED"
    champion = c.get_model_version_by_alias("qlora-search-e2e", "champion")
    assert champion.run_id == summary["best"]["mlflow_run_id"]


def test_export_reloads_with_the_reported_test_f1(finished_search, tmp_path):
    work, _ = finished_search
    summary_path = work / "runs" / "e2e" / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "search.export", "--summary", str(summary_path),
                           "--out", str(tmp_path / "export"), "--merge"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "export"
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert (out / "merged" / "model.safetensors").exists()

    from search.driver import test_metrics

    reported = json.loads(summary_path.read_text())["best"]["test_f1"]
    assert abs(test_metrics(str(out))["test_f1"] - reported) <= 0.005
    assert "gold" in proc.stdout and "test F1 of the exported adapter" in proc.stdout
    # what the user sees is the export's own lines: no library deprecation warnings (PEFT asking transformers for
    # is_gradient_checkpointing, the renamed key/value cache), weight-loading bars or bitsandbytes' CPU kernel notice
    for noise in ("FutureWarning", "deprecated", "Loading weights", "kernels-community"):
        assert noise not in proc.stdout + proc.stderr, (noise, proc.stderr[-2000:])
