"""Shared fixtures: a tiny Qwen3 model built from config into a local directory (no hub), and small real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMS = ROOT / "data" / "sms-spam" / "SMSSpamCollection"

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
