"""The style task through the same search path as classification: search.run, MLflow, summary, export with reload."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _style_search(work: Path, name: str, tiny_model, squad_subset, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "search.run", "--config", str(ROOT / "configs" / "style_squad.yaml"),
            "--name", name,
            "--set", f"output_dir={work / 'runs'}",
            "--set", f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            "--set", f"trial.model.name_or_path={tiny_model}",
            "--set", f"trial.style.path={squad_subset}",
            "--set", "trial.style.max_train_questions=64", "--set", "trial.style.eval_questions=8",
            "--set", "trial.style.test_questions=16", "--set", "trial.style.max_new_tokens=12",
            "--set", "trial.style.max_length=160",
            "--set", "trial.optim.max_steps=4", "--set", "trial.optim.batch_size=8",
            "--set", "trial.eval.every_steps=2", "--set", "trial.eval.batch_size=8",
            "--set", "scheduler.grace_period=2", *extra]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def style_search(tiny_model, squad_subset, tmp_path_factory):
    work = tmp_path_factory.mktemp("style-search")
    proc = _style_search(work, "style-e2e", tiny_model, squad_subset, "--set", "num_trials=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work


def test_style_search_records_separation_and_exports_a_reloadable_adapter(style_search, tmp_path):
    from mlflow.tracking import MlflowClient

    work = style_search
    path = work / "runs" / "style-e2e" / "summary.json"
    summary = json.loads(path.read_text())
    assert summary["objective"] == {"metric": "val_separation", "mode": "max"}
    assert len(summary["trials"]) == 2 and all(t["value"] is not None for t in summary["trials"])
    best = summary["best"]
    assert {"test_separation", "test_terse_f1", "test_terse_em", "test_len_terse", "test_len_verbose"} <= best.keys()

    c = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    children = [r for r in c.search_runs([summary["mlflow"]["experiment_id"]])
                if r.data.tags.get("mlflow.parentRunId") == summary["mlflow"]["parent_run_id"]]
    assert len(children) == 2
    for child in children:
        assert [m.step for m in c.get_metric_history(child.info.run_id, "val_separation")] == [2, 4]
        assert "val_terse_f1" in child.data.metrics and "val_len_verbose" in child.data.metrics
        files = {a.path for a in c.list_artifacts(child.info.run_id, "adapter")}
        assert "adapter/adapter_model.safetensors" in files and "adapter/tokenizer.json" in files

    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "search.export", "--summary", str(path), "--out", str(out),
                           "--merge", "--examples", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TERSE" in proc.stdout and "VERBOSE" in proc.stdout and "test token separation" in proc.stdout

    # the export's tokenizer carries the style tokens, and the reloaded adapter reproduces the separation
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainables.tasks import test_metrics

    tok = AutoTokenizer.from_pretrained(out)
    assert {"<STYLE_TERSE>", "<STYLE_VERBOSE>"} <= set(tok.get_vocab())
    again = test_metrics(out)
    assert again["test_separation"] == pytest.approx(best["test_separation"], rel=0.05)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.get_input_embeddings().weight.shape[0] == len(tok)


def test_trials_below_the_terse_f1_floor_are_marked_and_never_best(tiny_model, squad_subset, tmp_path):
    # a floor no few-step tiny model reaches: every trial fails it, visibly
    proc = _style_search(tmp_path, "floor", tiny_model, squad_subset, "--set", "num_trials=1",
                         "--set", "objective.metric=val_separation_at_floor",
                         "--set", "trial.style.terse_f1_floor=0.99")
    summary = json.loads((tmp_path / "runs" / "floor" / "summary.json").read_text())
    trial = summary["trials"][0]
    assert trial["value"] is not None and -1.0 <= trial["value"] < 0.0  # scored below zero, not a silent 0
    assert "below the TERSE F1 floor" in trial["note"]
    assert summary["best"] is None and proc.returncode == 1
    assert "below the TERSE F1 floor" in proc.stdout
