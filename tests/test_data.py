import json

import pytest

from trainables.data import DataError, dedupe, load_splits, oversample, read_examples, split
from trainables.settings import DataSettings


def _tsv(tmp_path, rows, name="d.tsv"):
    p = tmp_path / name
    p.write_text("".join(f"{lbl}\t{txt}\n" for lbl, txt in rows), encoding="utf-8")
    return p


def test_bundled_sms_loads_with_documented_counts():
    s = DataSettings()
    raw = read_examples(s)
    assert len(raw) == 5574 and sum(lbl == "spam" for _, lbl in raw) == 747
    unique = dedupe(raw)
    # 5,171 distinct raw texts (data README); 11 more differ only in leading/trailing whitespace, which is stripped
    assert len(unique) == 5160 and sum(lbl == "spam" for _, lbl in unique) == 642


def test_split_is_deterministic_disjoint_and_stratified():
    s = DataSettings(oversample_minority=None)
    a, b = load_splits(s), load_splits(s)
    assert a.train == b.train and a.test == b.test
    texts = [set(t for t, _ in part) for part in (a.train, a.val, a.test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert sum(len(t) for t in texts) == 5160
    spam_frac = [sum(l == "spam" for _, l in p) / len(p) for p in (a.train, a.val, a.test)]
    assert max(spam_frac) - min(spam_frac) < 0.01
    bal = a.counts["val_balanced"]
    assert bal["spam"] == bal["ham"] == a.counts["val"]["spam"]
    other = load_splits(s.model_copy(update={"split_seed": 1}))
    assert other.test != a.test


def test_oversampling_hits_fraction_exactly_and_leaves_val_test_alone():
    train = [(f"ham {i}", "ham") for i in range(90)] + [(f"spam {i}", "spam") for i in range(10)]
    out, counts = oversample(train, "spam", 0.25, seed=3)
    # 90 ham / (1 - 0.25) * 0.25 = 30 spam: exactly 30 / 120 = 0.25
    assert sum(l == "spam" for _, l in out) == 30 and len(out) == 120
    assert counts["after"]["fraction"] == 0.25 and counts["added"] == 20
    assert {t for t, l in out if l == "spam"} <= {f"spam {i}" for i in range(10)}
    assert oversample(train, "spam", 0.25, seed=3)[0] == out  # seeded

    base = DataSettings(oversample_minority=None)
    natural = load_splits(base)
    over = load_splits(base.model_copy(update={"oversample_minority": 0.3}))
    assert over.val == natural.val and over.test == natural.test and over.val_balanced == natural.val_balanced
    c = over.counts["oversampling"]["after"]
    assert c["minority"] == round(0.3 * c["other"] / 0.7)


def test_oversampling_below_natural_ratio_is_refused():
    train = [("a", "ham")] * 70 + [("b", "spam")] * 30
    with pytest.raises(DataError, match="below the natural minority fraction"):
        oversample(train, "spam", 0.2, seed=0)


def test_jsonl_and_csv_with_field_mapping(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"body": f"msg {i}", "y": "pos" if i % 3 == 0 else "neg"})
                           for i in range(30)))
    s = DataSettings(path=str(p), text_field="body", label_field="y", label_map={"pos": "yes", "neg": "no"},
                     minority_label="pos", columns=None)
    assert read_examples(s)[0] == ("msg 0", "pos")
    c = tmp_path / "d.csv"
    c.write_text('text,label\n"hello, world",pos\nbye,neg\n')
    rows = read_examples(s.model_copy(update={"path": str(c), "text_field": "text", "label_field": "label"}))
    assert rows == [("hello, world", "pos"), ("bye", "neg")]


def test_bad_files_get_one_line_naming_the_place(tmp_path):
    with pytest.raises(DataError, match=r"nope\.tsv: data file not found"):
        read_examples(DataSettings(path=str(tmp_path / "nope.tsv")))
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a", "label": "ham"}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        read_examples(DataSettings(path=str(p), columns=None))
    with pytest.raises(DataError, match=r"d\.tsv:2: label 'eggs' is not in data.label_map"):
        read_examples(DataSettings(path=str(_tsv(tmp_path, [("ham", "x"), ("eggs", "y")]))))
    with pytest.raises(DataError, match=r"no column 'body'"):
        read_examples(DataSettings(path=str(_tsv(tmp_path, [("ham", "x")])), text_field="body"))


def test_missing_minority_or_empty_split_is_refused(tmp_path):
    p = _tsv(tmp_path, [("ham", f"m{i}") for i in range(50)])
    with pytest.raises(DataError, match="minority label 'spam' is absent from the train"):
        load_splits(DataSettings(path=str(p)))
    p2 = _tsv(tmp_path, [("ham", "a"), ("spam", "b")], "two.tsv")
    with pytest.raises(DataError, match="split is empty"):
        split(read_examples(DataSettings(path=str(p2))), DataSettings(path=str(p2)))
