"""Classification data: load a local file, deduplicate, split, oversample, and format through the chat template.

Every problem with the user's file is raised as DataError with one line naming the file (and line) and what to do.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainables.cache import Memo, digest, memo_for, tokenizer_identity
from trainables.settings import DataSettings, SettingsError, project_root

log = logging.getLogger(__name__)

Example = tuple[str, str]  # (text, raw label)


class DataError(SettingsError):
    """A problem with a data file or the splits made from it."""


def resolve_path(path: str) -> Path:
    """A relative path is taken from the working directory, else from the project root (for bundled data)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    bundled = project_root() / p
    return bundled if bundled.exists() else p


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "tsv"  # .tsv, .txt and the extension-less SMSSpamCollection


def read_examples(s: DataSettings) -> list[Example]:
    """Read (text, label) pairs from `s.path` using the field mapping; labels must be keys of `s.label_map`."""
    path = resolve_path(s.path)
    if not path.is_file():
        raise DataError(f"{s.path}: data file not found; set data.path to a JSONL, CSV or TSV file")
    fmt = _detect_format(path, s.format)
    rows: list[tuple[int, dict[str, Any]]] = []
    with open(path, encoding="utf-8", newline="") as fh:
        if fmt == "jsonl":
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg}); fix or remove that line") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
                rows.append((lineno, obj))
        else:
            delim = "," if fmt == "csv" else "\t"
            # QUOTE_NONE for TSV: SMS texts contain stray quotes that would merge lines.
            reader = csv.reader(fh, delimiter=delim, quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
            header = s.columns
            for lineno, rec in enumerate(reader, 1):
                if not rec:
                    continue
                if header is None:
                    header = rec
                    continue
                if fmt == "tsv" and len(rec) > len(header):  # a tab inside the last field
                    rec = rec[: len(header) - 1] + [delim.join(rec[len(header) - 1 :])]
                if len(rec) != len(header):
                    raise DataError(
                        f"{path}:{lineno}: expected {len(header)} fields ({', '.join(header)}), got {len(rec)}"
                    )
                rows.append((lineno, dict(zip(header, rec))))
    if not rows:
        raise DataError(f"{path}: no examples found")
    out: list[Example] = []
    for lineno, row in rows:
        for key in (s.text_field, s.label_field):
            if key not in row:
                raise DataError(
                    f"{path}:{lineno}: no column {key!r} (columns: {', '.join(map(str, row))}); "
                    f"set data.text_field / data.label_field"
                )
        label = str(row[s.label_field]).strip()
        if label not in s.label_map:
            raise DataError(
                f"{path}:{lineno}: label {label!r} is not in data.label_map ({', '.join(s.label_map)}); "
                f"add it to the label map or fix the line"
            )
        out.append((str(row[s.text_field]).strip(), label))
    return out


def dedupe(examples: list[Example]) -> list[Example]:
    """Keep the first occurrence of each exact text, so no text can land in two splits."""
    seen: set[str] = set()
    out = []
    for text, label in examples:
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    val_balanced: list[Example]
    test: list[Example]
    counts: dict[str, Any] = field(default_factory=dict)


def split(examples: list[Example], s: DataSettings) -> Splits:
    """Seeded stratified split into train/val/test, plus a class-balanced view of val."""
    rng = random.Random(s.split_seed)
    by_label: dict[str, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex[1], []).append(ex)
    train, val, test = [], [], []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_test = round(len(group) * s.test_fraction)
        n_val = round(len(group) * s.val_fraction)
        test += group[:n_test]
        val += group[n_test : n_test + n_val]
        train += group[n_test + n_val :]
    for part in (train, val, test):
        rng.shuffle(part)
    for name, part in (("train", train), ("validation", val), ("test", test)):
        if not part:
            raise DataError(f"{s.path}: the {name} split is empty ({len(examples)} unique examples); add data")
        if not any(lbl == s.minority_label for _, lbl in part):
            raise DataError(
                f"{s.path}: minority label {s.minority_label!r} is absent from the {name} split; "
                f"check data.minority_label or add examples of it"
            )
    return Splits(train, val, balance(val, s.split_seed), test)


def balance(examples: list[Example], seed: int) -> list[Example]:
    """Subsample every class down to the size of the smallest one (seeded)."""
    rng = random.Random(seed + 1)
    by_label: dict[str, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex[1], []).append(ex)
    n = min(len(v) for v in by_label.values())
    out = [ex for label in sorted(by_label) for ex in rng.sample(by_label[label], n)]
    rng.shuffle(out)
    return out


def oversample(train: list[Example], minority: str, fraction: float | None, seed: int) -> tuple[list[Example], dict]:
    """Resample the minority class (seeded, with replacement) until it makes up `fraction` of the training split.

    Returns the new training list and the exact counts before and after.
    """
    n_min = sum(1 for _, lbl in train if lbl == minority)
    n_rest = len(train) - n_min
    before = {"minority": n_min, "other": n_rest, "fraction": n_min / len(train) if train else 0.0}
    if fraction is None:
        return train, {"before": before, "after": before, "added": 0}
    if n_min == 0:
        raise DataError(f"minority label {minority!r} is absent from the training split; cannot oversample it")
    target = round(fraction * n_rest / (1 - fraction))
    if target < n_min:
        raise DataError(
            f"data.oversample_minority={fraction} is below the natural minority fraction "
            f"{before['fraction']:.4f} of the training split; use a value above it or null"
        )
    rng = random.Random(seed)
    minority_examples = [ex for ex in train if ex[1] == minority]
    extra = [rng.choice(minority_examples) for _ in range(target - n_min)]
    out = train + extra
    rng.shuffle(out)
    after = {"minority": target, "other": n_rest, "fraction": target / len(out)}
    return out, {"before": before, "after": after, "added": len(extra)}


def load_splits(s: DataSettings, seed: int = 0) -> Splits:
    """Read, dedupe, split and (if asked) oversample the training split; counts are recorded on the result."""
    raw = read_examples(s)
    unique = dedupe(raw)
    splits = split(unique, s)
    splits.train, over = oversample(splits.train, s.minority_label, s.oversample_minority, seed)
    splits.counts = {
        "rows": len(raw),
        "unique": len(unique),
        "duplicates_removed": len(raw) - len(unique),
        "train": dict(Counter(lbl for _, lbl in splits.train)),
        "val": dict(Counter(lbl for _, lbl in splits.val)),
        "val_balanced": dict(Counter(lbl for _, lbl in splits.val_balanced)),
        "test": dict(Counter(lbl for _, lbl in splits.test)),
        "oversampling": over,
    }
    return splits


def file_fingerprint(path: str) -> str:
    h = hashlib.sha256()
    with open(resolve_path(path), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Formatting through the tokenizer's own chat template, as prompt / completion.


class ChatTemplate:
    """Prompt / completion token ids through the tokenizer's own chat template.

    The prompt and the completion are tokenized separately and concatenated, so the boundary is the same at training
    and at inference, and a completion mask marks exactly the completion's tokens.
    """

    def __init__(self, tokenizer, system_prompt: str, max_length: int):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template; use a chat model or set one on the tokenizer")
        self.tok = tokenizer
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.memo = Memo(None)  # token ids of inputs already encoded; `use_cache` shares them through a directory

    def fingerprint(self) -> dict[str, Any]:
        """Everything besides an input itself that decides its token ids (subclasses add their options)."""
        return {"class": type(self).__name__, "tokenizer": tokenizer_identity(self.tok),
                "system_prompt": self.system_prompt, "max_length": self.max_length}

    def use_cache(self, cache_dir: str | None) -> "ChatTemplate":
        """Read (and later `save_cache`) encoded inputs under `cache_dir` (trainables/cache.py)."""
        self.memo = memo_for(cache_dir, self.fingerprint())
        return self

    def save_cache(self) -> bool:
        return self.memo.save()

    def messages(self, text: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": text}]

    def _render(self, msgs, add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _prompt_ids(self, text: str) -> list[int]:
        return self._ids(self._render(self.messages(text), add_generation_prompt=True))

    def _completion_ids(self, answer: str) -> list[int]:
        """The tokens the template puts after the generation prompt for `answer`, end-of-turn token included."""
        probe = self.messages("x")
        prompt = self._render(probe, add_generation_prompt=True)
        full = self._render(probe + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise DataError("the chat template renders the prompt differently with and without the answer")
        return self._ids(full[len(prompt) :])


class ChatFormatter(ChatTemplate):
    """Turns (text, label) into token ids with the tokenizer's chat template; the completion is the label answer."""

    def __init__(self, tokenizer, s: DataSettings):
        super().__init__(tokenizer, s.system_prompt, s.max_length)
        self.s = s
        self.completion_ids = {label: self._completion_ids(answer) for label, answer in s.label_map.items()}
        self.labels = list(s.label_map)
        self._overhead = len(self._prompt_ids("")) + max(len(v) for v in self.completion_ids.values())
        if self._overhead + 4 > self.max_length:
            raise DataError(
                f"data.max_length={self.max_length} leaves no room for the message: the template and the longest "
                f"answer take {self._overhead} tokens; raise data.max_length"
            )

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "label_map": self.s.label_map}

    def prompt_ids(self, text: str) -> tuple[list[int], bool]:
        """Token ids of the prompt for `text`, the message cut so the longest answer still fits. (ids, truncated)."""
        return self.memo.get(digest("prompt", text), lambda: self._encode_prompt(text))

    def _encode_prompt(self, text: str) -> tuple[list[int], bool]:
        ids = self._prompt_ids(text)
        budget = self.max_length - max(len(v) for v in self.completion_ids.values())
        if len(ids) <= budget:
            return ids, False
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        keep = max(1, len(enc["input_ids"]) - (len(ids) - budget))
        while True:
            cut = text[: enc["offset_mapping"][keep - 1][1]]
            ids = self._prompt_ids(cut)
            if len(ids) <= budget or keep == 1:
                return ids[:budget], True
            keep = max(1, keep - (len(ids) - budget))

    def encode(self, examples: list[Example]) -> tuple[dict[str, list], dict[str, Any]]:
        """Columns `input_ids` and `completion_mask` for SFTTrainer, and sequence-length statistics."""
        input_ids, masks, lengths = [], [], []
        truncated = 0
        for text, label in examples:
            p, cut = self.prompt_ids(text)
            c = self.completion_ids[label]
            input_ids.append(p + c)
            masks.append([0] * len(p) + [1] * len(c))
            lengths.append(len(p) + len(c))
            truncated += cut
        return {"input_ids": input_ids, "completion_mask": masks}, length_stats(lengths, truncated)


def length_stats(lengths: list[int], truncated: int) -> dict[str, Any]:
    if not lengths:
        return {"n": 0, "truncated": truncated}
    srt = sorted(lengths)
    return {
        "n": len(srt),
        "min": srt[0],
        "mean": round(sum(srt) / len(srt), 2),
        "p50": srt[len(srt) // 2],
        "p95": srt[min(len(srt) - 1, int(0.95 * len(srt)))],
        "max": srt[-1],
        "tokens": sum(srt),
        "truncated": truncated,
    }
