"""The progress table and the end-of-search summary: what a person reads on a 100-column terminal.

The progress table is driven through its Ray Tune callback hooks with stand-in trial objects (only the attributes
Tune's Trial exposes to callbacks: trial_id, status, config, last_result); the real search's output is checked in
tests/test_search_e2e.py and tests/test_report.py on a finished search."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from search.progress import ProgressTable, format_summary, legend, runs_url, short_names

ROOT = Path(__file__).resolve().parent.parent
# the default space's parameters, in its order
KEYS = ["lora.r", "lora.alpha_per_rank", "optim.learning_rate", "lora.dropout", "lora.use_rslora",
        "data.oversample_minority"]


@dataclass
class FakeTrial:
    trial_id: str
    config: dict
    status: str = "PENDING"
    last_result: dict = field(default_factory=dict)


def params(r=16, alpha=2, lr=0.005, dropout=0.05, rs=False, over=0.3):
    return dict(zip(KEYS, [r, alpha, lr, dropout, rs, over]))


def table(mode="max", **kw) -> tuple[ProgressTable, list[str]]:
    printed: list[str] = []
    t = ProgressTable("val_f1", mode, max_steps=300, num_trials=4, param_keys=KEYS, width=100, out=printed.append,
                      **{"interval": 3600.0, "settle": 0.0, **kw})
    t.setup()
    return t, printed


def test_progress_table_shows_status_steps_objective_best_so_far_and_params():
    t, printed = table()
    a, b = FakeTrial("aaaa0001", params()), FakeTrial("bbbb0002", params(8, 1, 0.0112, 0.0964, True, 0.335))
    trials = [a, b, FakeTrial("cccc0003", params(32, 4, 0.002, 0.01, False, 0.45))]
    a.status = "RUNNING"
    t.on_trial_start(0, trials, a)
    t.on_step_end(0, trials)
    assert len(printed) == 1 and "trials 1/4 started: 1 running" in printed[0]
    assert "columns: r=lora.r, alpha/r=lora.alpha_per_rank, lr=optim.learning_rate" in printed[0]

    b.status = "RUNNING"
    t.on_trial_start(1, trials, b)
    for trial, step, f1 in [(a, 100, 0.61), (b, 100, 0.0), (a, 200, 0.74), (b, 200, 0.72)]:
        trial.last_result = {"step": step, "val_f1": f1}
        t.on_trial_result(2, trials, trial, trial.last_result)
    # a's objective fell at its last evaluation: its own best stays 0.74, and so does the search's best so far, which
    # is judged as the search picks its adapter: by each trial's best checkpoint (a's 0.74 beats b's 0.72)
    a.last_result = {"step": 300, "val_f1": 0.70}
    t.on_trial_result(3, trials, a, a.last_result)
    a.status = "TERMINATED"
    t.on_trial_complete(3, trials, a)
    b.status = "TERMINATED"  # ASHA stopped it at step 200 of 300
    t.on_trial_complete(3, trials, b)
    t.on_step_end(3, trials)

    text = printed[-1]
    lines = text.splitlines()
    assert lines[0].startswith("[") and "trials 2/4 started: 0 running, 1 done, 1 stopped early, 0 failed" in lines[0]
    assert lines[1] == "best so far: val_f1=0.7400 (trial aaaa0001, marked *)"
    assert lines[2].split() == ["trial", "status", "steps", "val_f1", "best", "time", "r", "alpha/r", "lr",
                                "dropout", "rslora", "oversample"]
    row_a = next(line for line in lines if line.startswith("aaaa0001"))
    assert row_a.split()[:5] == ["aaaa0001*", "done", "300/300", "0.7000", "0.7400"]
    assert row_a.split()[-6:] == ["16", "2", "0.005", "0.05", "no", "0.3"]
    row_b = next(line for line in lines if line.startswith("bbbb0002"))
    assert row_b.split()[:5] == ["bbbb0002", "stopped", "200/300", "0.7200", "0.7200"]
    row_c = next(line for line in lines if line.startswith("cccc0003"))
    assert row_c.split()[:6] == ["cccc0003", "pending", "0/300", "-", "-", "-"]
    assert "columns:" not in text  # the legend is printed once, with the first table
    assert all(len(line) <= 100 for p in printed for line in p.splitlines())


def test_progress_table_prints_on_events_and_throttles_results():
    t, printed = table(interval=3600.0, settle=0.0)
    a = FakeTrial("aaaa0001", params(), status="RUNNING")
    t.on_trial_start(0, [a], a)
    t.on_step_end(0, [a])
    t.on_step_end(1, [a])  # nothing new: nothing printed
    assert len(printed) == 1
    a.last_result = {"step": 100, "val_f1": 0.5}
    t.on_trial_result(2, [a], a, a.last_result)
    t.on_step_end(2, [a])  # a result alone waits for the interval
    assert len(printed) == 1
    a.status = "TERMINATED"
    t.on_trial_complete(3, [a], a)
    t.on_step_end(3, [a])  # a trial ending prints at once
    assert len(printed) == 2
    t.on_experiment_end([a])  # already on screen: not printed twice
    assert len(printed) == 2

    t2, printed2 = table(interval=0.0)
    b = FakeTrial("bbbb0002", params(), status="RUNNING", last_result={"step": 100, "val_f1": 0.5})
    t2.on_trial_result(0, [b], b, b.last_result)
    t2.on_step_end(0, [b])
    assert len(printed2) == 1 and "best so far: val_f1=0.5000" in printed2[0]


def test_a_long_search_shows_active_trials_and_the_best_finished_ones():
    t, printed = table(max_rows=5)
    trials = []
    for i in range(12):
        tr = FakeTrial(f"t{i:07d}", params(), "TERMINATED", {"step": 300, "val_f1": i / 100})
        trials.append(tr)
        t.on_trial_result(0, trials, tr, tr.last_result)
    trials.append(FakeTrial("running1", params(), "RUNNING", {"step": 100, "val_f1": 0.01}))
    t.on_experiment_end(trials)
    rows = [line.split()[0] for line in printed[-1].splitlines()[3:] if line[:1].isalnum()]
    assert rows[:5] == ["t0000008", "t0000009", "t0000010", "t0000011*", "running1"]
    assert "(8 more finished trials not shown" in printed[-1]


def test_progress_table_follows_the_objective_mode():
    printed: list[str] = []
    trials = [FakeTrial("aaaa0001", params(), "RUNNING"), FakeTrial("bbbb0002", params(), "RUNNING")]
    t2 = ProgressTable("eval_loss", "min", 300, 2, KEYS, settle=0.0, width=100, out=printed.append)
    t2.setup()
    for trial, loss in zip(trials, [2.5, 1.25]):
        trial.last_result = {"step": 100, "eval_loss": loss}
        t2.on_trial_result(0, trials, trial, trial.last_result)
    t2.on_experiment_end(trials)
    assert "best so far: eval_loss=1.2500 (trial bbbb0002, marked *)" in printed[-1]
    assert printed[-1].splitlines()[2].split()[3] == "eval_loss"


def test_short_names_keep_columns_unique():
    assert short_names(["optim.learning_rate", "lora.r"]) == {"optim.learning_rate": "lr", "lora.r": "r"}
    clash = short_names(["lora.dropout", "other.dropout"])
    assert clash == {"lora.dropout": "lora.dropout", "other.dropout": "other.dropout"}
    assert legend(["lora.dropout"]) == "columns: dropout=lora.dropout"
    assert all(len(line) <= 60 for line in legend(KEYS, width=60).splitlines())


def summary_doc(mode="max") -> dict:
    trials = [
        {"trial_id": "aaaa0001", "status": "TERMINATED", "params": params(), "value": 0.74, "steps": 300,
         "stopped_early": False, "error": None},
        {"trial_id": "bbbb0002", "status": "TERMINATED", "params": params(8, 1, 0.0112, 0.0964, True, 0.335),
         "value": 0.12, "steps": 100, "stopped_early": True, "error": None},
        {"trial_id": "cccc0003", "status": "ERROR", "params": params(32, 4, 0.002, 0.01, False, 0.45),
         "value": None, "steps": 0, "stopped_early": False, "error": "RuntimeError: CUDA out of memory"},
        {"trial_id": "dddd0004", "status": "TERMINATED", "params": params(4, 1, 0.009, 0.02, False, 0.2),
         "value": 0.55, "steps": 300, "stopped_early": False, "error": None},
    ]
    best = trials[0] if mode == "max" else trials[1]
    return {"name": "sms-spam", "objective": {"metric": "val_f1", "mode": mode},
            "best": {"trial_id": best["trial_id"], "value": best["value"], "params": best["params"],
                     "adapter_dir": "/data/runs/sms-spam/best_adapter", "steps": best["steps"],
                     "model_version": "3", "test_f1": 0.77, "test_examples": 1032},
            "trials": trials, "wall_seconds": 372.4,
            "mlflow": {"tracking_uri": "sqlite:///mlflow.db", "experiment_id": "7", "parent_run_id": "p"}}


def test_summary_ranks_trials_and_says_what_to_run_next(tmp_path):
    path = tmp_path / "sms-spam" / "summary.json"
    path.parent.mkdir()
    path.write_text(json.dumps(summary_doc()))
    (path.parent / "report").mkdir()
    (path.parent / "report" / "best_so_far.png").write_bytes(b"\x89PNG")
    text = format_summary(summary_doc(), path)
    lines = text.splitlines()
    assert "== search 'sms-spam': 4 trials in 6m12s, 1 stopped early, 1 failed; objective val_f1 (max) ==" in text
    head = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    assert lines[head].split()[:5] == ["rank", "trial", "val_f1", "steps", "early"]
    ranked = [line.split()[:5] for line in lines[head + 1: head + 5]]
    assert ranked == [["1", "aaaa0001*", "0.7400", "300", "no"], ["2", "dddd0004", "0.5500", "300", "no"],
                      ["3", "bbbb0002", "0.1200", "100", "yes"], ["4", "cccc0003", "-", "0", "error"]]
    assert "trial cccc0003 failed: RuntimeError: CUDA out of memory" in text
    assert "best:         trial aaaa0001, val_f1=0.7400 at step 300 (its best checkpoint)" in text
    assert "test_f1=0.7700" in text and "registered: MLflow model version 3 (alias 'champion')" in text
    assert "adapter:    /data/runs/sms-spam/best_adapter" in text
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000" in text
    assert "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning" in text
    assert f"python -m search.export --summary {path} --out exports/sms-spam" in text
    assert f"python -m search.report sms-spam --output-dir {tmp_path}" in text
    assert f"report:       {path.parent / 'report'}/" in text
    # the table and every line but the URL fit a 100-column terminal
    assert all(len(line) <= 100 for line in lines if "http" not in line and str(tmp_path) not in line)


def test_summary_in_min_mode_and_without_a_best(tmp_path):
    path = tmp_path / "summary.json"
    text = format_summary(summary_doc("min"), path)
    ranked = [line.split()[1] for line in text.splitlines() if line[:4].strip().isdigit()]
    assert ranked == ["bbbb0002*", "dddd0004", "aaaa0001", "cccc0003"]

    empty = {**summary_doc(), "best": None}
    empty["trials"] = [t for t in empty["trials"] if t["status"] == "ERROR"]
    text = format_summary(empty, path)
    assert "no trial produced a result" in text and "search.export" not in text


def test_runs_url_opens_the_model_training_view_of_one_search():
    url = runs_url("http://127.0.0.1:5000", "3", "sms-spam")
    assert url == ("http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning&searchFilter="
                   "tags.%60qlora.search%60%20%3D%20%27sms-spam%27")


@pytest.mark.slow
def test_a_real_search_prints_the_table_and_summary_without_library_noise(small_search):
    work, stdout = small_search
    summary = json.loads((work / "runs" / "e2e" / "summary.json").read_text())
    lines = stdout.splitlines()
    headers = [i for i, line in enumerate(lines) if line.split()[:6] == ["trial", "status", "steps", "val_f1",
                                                                        "best", "time"]]
    assert headers, stdout[-3000:]
    last = headers[-1]  # the final progress table: both trials done, 6 of 6 steps
    rows = [lines[last + 1 + i].split() for i in range(2)]
    assert sorted(r[0].rstrip("*") for r in rows) == sorted(t["trial_id"] for t in summary["trials"])
    assert all(r[1] == "done" and r[2] == "6/6" for r in rows)
    assert lines[last - 1].startswith(f"best so far: val_f1={summary['best']['value']:.4f}")
    assert "== search 'e2e': 2 trials in" in stdout and "best:         trial " + summary["best"]["trial_id"] in stdout
    ids = tuple(t["trial_id"] for t in summary["trials"])
    ours = [line for line in lines if line.startswith(("[", "best so far:", "trial ", "columns:", " " * 9) + ids)
            and "http" not in line]
    assert len(ours) >= 3 * len(headers) and all(len(line) <= 100 for line in ours), [
        line for line in ours if len(line) > 100]
    # Ray Tune's own boxes and tables, per-trial result dumps, MLflow's and Optuna's info logs: off by default
    for noise in ("Configuration for experiment", "Trial status:", "Trial run_trial", "result ──",
                  "INFO mlflow", "A new study created", "Failed to load CPU gemm_4bit_forward"):
        assert noise not in stdout, noise


def test_quiet_libraries_drops_rays_token_auth_notice_but_keeps_its_warning_that_auth_is_off(caplog, monkeypatch):
    import warnings

    from ray._private.authentication import authentication_token_setup as auth

    from search.progress import quiet_libraries

    for key in ("MLFLOW_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(key, raising=False)  # restored after the test, as pytest restores the warning filters
    quiet_libraries(verbose=False)
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)  # PEFT asking transformers
        warnings.warn("a warning of the search's own", UserWarning)
    assert [str(w.message) for w in seen] == ["a warning of the search's own"]
    with caplog.at_level("WARNING"):
        auth._warn_token_auth_enabled()  # what ray.init logs for a new local cluster, token auth on by default
        auth._warn_token_auth_disabled()  # RAY_AUTH_MODE=disabled: anyone on the network can run code
    assert "Token authentication is enabled" not in caplog.text
    assert "Token authentication is disabled" in caplog.text
