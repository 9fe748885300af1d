"""The preprocessing cache (trainables/cache.py): trials read token ids the search encoded once, and get exactly the
columns they would have tokenized themselves. Real tokenizer (the tiny model's), real data, real Arrow files."""

from __future__ import annotations

import logging
import shutil

from trainables.model import load_tokenizer
from trainables.tasks import build_task, prepare_data


def _cache_dirs(root):
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


def test_cached_columns_equal_tokenized_ones_and_a_second_trial_encodes_nothing(fast_settings, tmp_path):
    s = fast_settings.with_values({"cache_dir": str(tmp_path), "data.oversample_minority": 0.3})
    fresh = build_task(s, load_tokenizer(s.model), cache=False)
    info = prepare_data(s)  # the driver, once per search
    assert info["encoded"] and info["inputs"] > 0 and len(_cache_dirs(tmp_path)) == 1

    # a trial with another searched value (more oversampling) only repeats inputs the cache already holds
    s2 = s.with_values({"data.oversample_minority": 0.45})
    trial = build_task(s2, load_tokenizer(s.model))
    assert trial.fmt.memo.loaded == info["inputs"] and trial.fmt.memo.added == 0
    again = build_task(s, load_tokenizer(s.model))
    assert again.train_cols == fresh.train_cols and again.val_cols == fresh.val_cols
    assert again.stats["lengths"] == fresh.stats["lengths"] and again.stats["counts"] == fresh.stats["counts"]
    # no tokenizer call in a trial that found the cache: every input came from it
    assert again.stats["encoding"] == {"from_cache": info["inputs"], "tokenized": 0, "tokenize_seconds": 0.0}
    assert fresh.stats["encoding"]["tokenized"] > 0 and fresh.stats["encoding"]["tokenize_seconds"] > 0
    assert len(trial.train_cols["input_ids"]) > len(fresh.train_cols["input_ids"])  # oversampled more


def test_style_cache_round_trips_prompts_and_targets(style_settings, tmp_path):
    s = style_settings.with_values({"cache_dir": str(tmp_path), "style.terse_repeats": 1})
    fresh = build_task(s, load_tokenizer(s.model), cache=False)
    prepare_data(s)
    s4 = s.with_values({"style.terse_repeats": 4})
    cached4 = build_task(s4, load_tokenizer(s.model))
    assert cached4.fmt.memo.added == 0
    fresh4 = build_task(s4, load_tokenizer(s.model), cache=False)
    assert cached4.train_cols == fresh4.train_cols and cached4.val_cols == fresh.val_cols


def test_a_different_tokenizer_or_template_never_reads_another_ones_ids(fast_settings, tmp_path):
    s = fast_settings.with_values({"cache_dir": str(tmp_path)})
    prepare_data(s)
    tok = load_tokenizer(s.model)
    tok.add_special_tokens({"additional_special_tokens": ["<NEW_TOKEN>"]})  # a tokenizer that encodes differently
    other = build_task(s, tok)
    assert other.fmt.memo.loaded == 0 and len(other.fmt.memo.table) > 0  # encoded here, not read
    prompt = build_task(s.with_values({"data.system_prompt": "Label the message."}), load_tokenizer(s.model))
    assert prompt.fmt.memo.loaded == 0
    assert len(_cache_dirs(tmp_path)) == 3  # one per fingerprint


def test_a_damaged_cache_is_rebuilt_not_trusted(fast_settings, tmp_path, caplog):
    s = fast_settings.with_values({"cache_dir": str(tmp_path)})
    fresh = build_task(s, load_tokenizer(s.model), cache=False)
    prepare_data(s)
    (d,) = _cache_dirs(tmp_path)
    for f in d.glob("*.arrow"):
        f.write_bytes(b"not arrow")
    with caplog.at_level(logging.WARNING):
        rebuilt = build_task(s, load_tokenizer(s.model))
    assert "unreadable" in caplog.text
    assert rebuilt.train_cols == fresh.train_cols and rebuilt.fmt.memo.loaded == 0
    assert build_task(s, load_tokenizer(s.model)).fmt.memo.added == 0  # the trial wrote a good one back
    shutil.rmtree(d)
    assert build_task(s, load_tokenizer(s.model)).train_cols == fresh.train_cols  # no cache: tokenized as before
