"""Shared fixtures: a tiny Qwen3 model built from config into a local directory (no hub), and small real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMS = ROOT / "data" / "sms-spam" / "SMSSpamCollection"
SQUAD = ROOT / "data" / "squad-v1.1-dev" / "dev-v1.1.json.gz"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def sms_subset(tmp_path_factory) -> Path:
    """The first 600 lines of the bundled SMS Spam Collection (real data, small enough for fast tests)."""
    path = tmp_path_factory.mktemp("data") / "sms600.tsv"
    lines = SMS.read_text(encoding="utf-8").splitlines()[:600]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, sms_subset) -> Path:
    """A tiny random-init Qwen3 + BPE tokenizer, briefly pre-trained, saved where from_pretrained loads it."""
    from trainables.settings import DataSettings
    from trainables.tiny import TinySpec, build_tiny_model, default_corpus

    texts, _ = default_corpus(DataSettings(path=str(sms_subset)))
    spec = TinySpec(vocab_size=600, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                    num_kv_heads=1, pretrain_steps=30, pretrain_batch=16, pretrain_seq_len=32)
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", texts, spec)


@pytest.fixture
def fast_settings(tiny_model, sms_subset):
    """Trial settings for a few-step run of the real loop on the tiny model and the SMS subset."""
    from trainables.settings import load_trial_settings

    return load_trial_settings({
        "model.name_or_path": str(tiny_model),
        "data.path": str(sms_subset),
        "optim.max_steps": 6,
        "optim.batch_size": 8,
        "optim.learning_rate": 1e-2,
        "eval.every_steps": 3,
        "eval.max_examples": 24,
        "data.max_length": 96,
    })


@pytest.fixture(scope="session")
def squad_subset(tmp_path_factory) -> Path:
    """12 real SQuAD articles, 2 paragraphs each (real data, small enough for fast tests)."""
    import gzip
    import json

    doc = json.load(gzip.open(SQUAD, "rt", encoding="utf-8"))
    small = {"version": doc["version"],
             "data": [{"title": a["title"], "paragraphs": a["paragraphs"][:2]} for a in doc["data"][:12]]}
    path = tmp_path_factory.mktemp("squad") / "squad-small.json"
    path.write_text(json.dumps(small), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small_search(tiny_model, sms_subset, tmp_path_factory):
    """A finished real search, run once per test session: `python -m search.run` in a subprocess, 2 trials of 6 steps
    on the tiny 4-bit model and the SMS subset, local Ray, a sqlite MLflow store. Returns (work dir, stdout): the
    search is named 'e2e' and lives in <work>/runs/e2e; its MLflow store is <work>/mlflow.db."""
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("search")
    argv = [sys.executable, "-m", "search.run", "--name", "e2e",
            "--set", f"output_dir={work / 'runs'}", "--set", f"model_cache={work / '.cache'}",
            "--set", f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            "--set", f"space={ROOT / 'spaces' / 'classification.yaml'}",
            "--set", f"trial.model.name_or_path={tiny_model}",
            "--set", f"trial.data.path={sms_subset}",
            "--set", "num_trials=2", "--set", "max_concurrent_trials=2",
            "--set", "trial.optim.max_steps=6", "--set", "trial.optim.batch_size=8",
            "--set", "trial.eval.every_steps=3", "--set", "trial.eval.max_examples=24",
            "--set", "trial.data.max_length=96", "--set", "scheduler.grace_period=2"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc.stdout


@pytest.fixture
def style_settings(tiny_model, squad_subset):
    """Trial settings for a few-step style run on the tiny model and the SQuAD subset."""
    from trainables.settings import load_trial_settings

    return load_trial_settings({
        "task": "style",
        "model.name_or_path": str(tiny_model),
        "style.path": str(squad_subset),
        "style.max_train_questions": 64,
        "style.eval_questions": 8,
        "style.max_new_tokens": 12,
        "style.max_length": 160,
        "optim.max_steps": 4,
        "optim.batch_size": 8,
        "optim.learning_rate": 2e-2,
        "eval.every_steps": 2,
        "eval.batch_size": 8,
    })
