"""Style control: TERSE/VERBOSE answer pairs, style tokens, and the token-separation evaluation.

The same question is asked twice, once ending in `<STYLE_TERSE>` (target: the short answer span) and once ending in
`<STYLE_VERBOSE>` (target: the context sentence that holds the answer). Pairs come from SQuAD v1.1 (split by article,
so no paragraph is in two splits) or from a JSONL file of pairs.

Token separation is measured with one `Decoding` for both styles: greedy, the same `max_new_tokens`, no
`min_new_tokens`. A separation computed from generations made with different decodings is refused.
"""

from __future__ import annotations

import functools
import gzip
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from trainables import metrics as M
from trainables.cache import digest
from trainables.data import ChatTemplate, DataError, length_stats, resolve_path
from trainables.settings import StyleSettings

TERSE, VERBOSE = "terse", "verbose"
STYLE_TOKENS = {TERSE: "<STYLE_TERSE>", VERBOSE: "<STYLE_VERBOSE>"}
STYLES = (TERSE, VERBOSE)


@dataclass(frozen=True)
class QA:
    """One question with both targets. `golds` are all reference answers (for EM/F1); `group` decides the split."""

    qid: str
    group: str
    question: str
    context: str
    terse: str
    verbose: str
    golds: tuple[str, ...]

    def target(self, style: str) -> str:
        return self.terse if style == TERSE else self.verbose


@dataclass
class StyleSplits:
    train: list[QA]
    val: list[QA]
    test: list[QA]
    counts: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Reading pairs.

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text` (split after . ! ? followed by space and a capital or digit)."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def answer_sentence(context: str, start: int, end: int, max_words: int) -> str:
    """The sentence(s) of `context` covering [start, end), cut to `max_words` words around the answer."""
    spans = sentence_spans(context)
    first = next((i for i, (a, b) in enumerate(spans) if a <= start < b), 0)
    last = next((i for i, (a, b) in enumerate(spans) if a < end <= b), len(spans) - 1)
    lo, hi = spans[first][0], spans[max(first, last)][1]
    words = [(m.start() + lo, m.end() + lo) for m in re.finditer(r"\S+", context[lo:hi])]
    if len(words) <= max_words:
        return context[lo:hi].strip()
    a_first = next(i for i, (a, b) in enumerate(words) if b > start)
    a_last = max(a_first, max(i for i, (a, b) in enumerate(words) if a < end))
    slack = max(0, max_words - (a_last - a_first + 1))
    left = min(a_first, slack // 2)
    w0 = a_first - left
    w1 = min(len(words) - 1, a_last + (slack - left))
    w0 = max(0, min(w0, w1 - max_words + 1))
    return context[words[w0][0] : words[w1][1]]


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def squad_document(path: Path) -> dict:
    """The parsed SQuAD JSON, read once per file version (pairs, paragraphs and the tiny corpus all come from it).
    Callers must not modify it."""
    stat = path.stat()
    return _parse_squad(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _parse_squad(path: str, mtime_ns: int, size: int) -> dict:
    try:
        with _open_text(Path(path)) as fh:
            doc = json.load(fh)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not readable as SQuAD JSON ({err}); give a SQuAD v1.1 .json/.json.gz file "
                        f"or a JSONL of pairs with style.format=jsonl") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: no top-level 'data' list; this is not SQuAD v1.1 format")
    return doc


def read_squad(path: Path, max_words: int) -> list[QA]:
    """SQuAD v1.1 JSON: TERSE = the first reference answer, VERBOSE = its sentence; group = article title."""
    doc = squad_document(path)
    out = []
    for article in doc["data"]:
        title = str(article.get("title", ""))
        for para in article.get("paragraphs", []):
            ctx = para["context"]
            for qa in para.get("qas", []):
                answers = qa.get("answers") or []
                if not answers:
                    continue
                first = answers[0]
                start, text = int(first["answer_start"]), first["text"]
                if ctx[start : start + len(text)] != text:
                    raise DataError(f"{path}: question {qa.get('id')}: answer_start {start} does not point at "
                                    f"{text!r} in its context")
                sentence = answer_sentence(ctx, start, start + len(text), max_words)
                out.append(QA(qid=str(qa["id"]), group=title, question=qa["question"].strip(),
                              context=sentence, terse=text.strip(), verbose=sentence,
                              golds=tuple(a["text"] for a in answers)))
    return out


def read_squad_paragraphs(path: Path) -> dict[str, str]:
    """Question id -> whole paragraph, for style.context=paragraph."""
    doc = squad_document(path)
    return {qa["id"]: p["context"] for a in doc["data"] for p in a["paragraphs"] for qa in p["qas"]}


def read_pairs(path: Path) -> list[QA]:
    """JSONL pairs: {"question", "terse", "verbose"} and optional "context", "group" (split unit), "answers"."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg}); each line must be one JSON object")
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object with question, terse and verbose")
            missing = [k for k in ("question", "terse", "verbose") if not str(row.get(k, "")).strip()]
            if missing:
                raise DataError(f"{path}:{lineno}: missing or empty field(s) {', '.join(missing)}; every pair needs "
                                f"question, terse and verbose")
            golds = row.get("answers") or [row["terse"]]
            out.append(QA(qid=str(row.get("id", lineno)), group=str(row.get("group", row.get("context", lineno))),
                          question=str(row["question"]).strip(), context=str(row.get("context", "")).strip(),
                          terse=str(row["terse"]).strip(), verbose=str(row["verbose"]).strip(),
                          golds=tuple(str(g) for g in golds)))
    return out


def read_qas(s: StyleSettings) -> list[QA]:
    path = resolve_path(s.path)
    if not path.is_file():
        raise DataError(f"{s.path}: style data file not found; set style.path to a SQuAD v1.1 JSON(.gz) file or a "
                        f"JSONL of pairs")
    fmt = s.format
    if fmt == "auto":
        fmt = "jsonl" if path.name.endswith((".jsonl", ".jsonl.gz", ".ndjson")) else "squad"
    items = read_squad(path, s.max_verbose_words) if fmt == "squad" else read_pairs(path)
    if s.context == "paragraph":
        if fmt != "squad":
            raise DataError(f"{s.path}: style.context=paragraph needs SQuAD JSON; JSONL pairs carry their own "
                            f"context (use style.context=sentence)")
        paras = read_squad_paragraphs(path)
        items = [QA(q.qid, q.group, q.question, paras[q.qid], q.terse, q.verbose, q.golds) for q in items]
    if not items:
        raise DataError(f"{s.path}: no question with an answer found")
    return items


def split_by_group(items: list[QA], s: StyleSettings) -> StyleSplits:
    """Seeded split by group (SQuAD article): shuffled groups fill test, then validation, the rest is training."""
    groups: dict[str, list[QA]] = {}
    for q in items:
        groups.setdefault(q.group, []).append(q)
    names = sorted(groups)
    random.Random(s.split_seed).shuffle(names)
    total = len(items)
    test, val, train = [], [], []
    for name in names:
        if len(test) < s.test_fraction * total:
            test += groups[name]
        elif len(val) < s.val_fraction * total:
            val += groups[name]
        else:
            train += groups[name]
    for part_name, part in (("train", train), ("validation", val), ("test", test)):
        if not part:
            raise DataError(f"{s.path}: the {part_name} split is empty ({len(groups)} groups, {total} questions); "
                            f"add data or lower style.val_fraction / style.test_fraction")
    rng = random.Random(s.split_seed + 1)
    for part in (train, val, test):
        rng.shuffle(part)
    n_train = len(train)
    if s.max_train_questions is not None:
        train = train[: s.max_train_questions]
    counts = {
        "questions": total,
        "groups": {"train": len({q.group for q in train}), "val": len({q.group for q in val}),
                   "test": len({q.group for q in test})},
        "train": len(train), "train_available": n_train, "val": len(val), "test": len(test),
    }
    return StyleSplits(train, val, test, counts)


def load_style_splits(s: StyleSettings) -> StyleSplits:
    return split_by_group(read_qas(s), s)


def style_corpus(s: StyleSettings) -> tuple[list[str], str]:
    """Raw texts (contexts and questions of the training split) to pre-train a tiny base on, and an id for them."""
    from trainables.data import file_fingerprint

    splits = load_style_splits(s)
    if s.format != "jsonl" and not str(s.path).endswith(".jsonl"):
        paras = read_squad_paragraphs(resolve_path(s.path))
        contexts = sorted({paras[q.qid] for q in splits.train})
    else:
        contexts = sorted({q.context for q in splits.train if q.context} | {q.verbose for q in splits.train})
    texts = contexts + [q.question for q in splits.train]
    corpus_id = f"style-{file_fingerprint(s.path)}-{s.split_seed}-{s.val_fraction}-{s.test_fraction}"
    return texts, corpus_id


# ---------------------------------------------------------------------------------------------------------------
# Formatting.


def add_style_tokens(tokenizer) -> list[int]:
    """Add the style tokens as special tokens (never split, never merged); returns their ids."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(STYLE_TOKENS.values())},
                                 replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(list(STYLE_TOKENS.values()))


class StyleFormatter(ChatTemplate):
    """(question, style) -> prompt ids; (question, style, target) -> input_ids + completion_mask."""

    def __init__(self, tokenizer, s: StyleSettings):
        super().__init__(tokenizer, s.system_prompt, s.max_length)
        self.s = s
        missing = [t for t in STYLE_TOKENS.values() if t not in tokenizer.get_vocab()]
        if missing:
            raise DataError(f"the tokenizer lacks the style tokens {missing}; add them with add_style_tokens()")

    def user_text(self, q: QA, style: str, context: str | None = None) -> str:
        ctx = q.context if context is None else context
        # The style token ends the user turn, a few tokens before the answer starts: a small model attends to it
        # there more easily than across a long context that separates it from the answer.
        tail = STYLE_TOKENS[style]
        if self.s.context != "none" and ctx:
            return f"Context: {ctx}\nQuestion: {q.question}\n{tail}"
        return f"Question: {q.question}\n{tail}"

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "context": self.s.context}

    def prompt_ids(self, q: QA, style: str, budget: int | None = None) -> tuple[list[int], bool]:
        """Prompt ids within `budget` tokens (default max_length); the context is cut from its end first."""
        budget = budget or self.max_length
        return self.memo.get(digest("prompt", q.question, q.context, style, budget),
                             lambda: self._encode_prompt(q, style, budget))

    def target_ids(self, target: str) -> list[int]:
        return self.memo.get(digest("completion", target), lambda: (self._completion_ids(target), False))[0]

    def _encode_prompt(self, q: QA, style: str, budget: int) -> tuple[list[int], bool]:
        ids = self._prompt_ids(self.user_text(q, style))
        if len(ids) <= budget:
            return ids, False
        words = q.context.split()
        lo, hi = 0, len(words)
        while lo < hi:  # the longest context prefix (in words) that fits
            mid = (lo + hi + 1) // 2
            if len(self._prompt_ids(self.user_text(q, style, " ".join(words[:mid])))) <= budget:
                lo = mid
            else:
                hi = mid - 1
        ids = self._prompt_ids(self.user_text(q, style, " ".join(words[:lo])))
        return ids[-budget:] if len(ids) > budget else ids, True

    def encode(self, items: Sequence[QA], terse_repeats: int = 1) -> tuple[dict[str, list], dict[str, Any]]:
        """Both styles of every question (TERSE `terse_repeats` times), as SFT columns, with length statistics per
        style. SFTTrainer shuffles the rows."""
        input_ids, masks = [], []
        lengths: dict[str, list[int]] = {TERSE: [], VERBOSE: []}
        targets: dict[str, list[int]] = {TERSE: [], VERBOSE: []}
        cut = {TERSE: 0, VERBOSE: 0}
        for q in items:
            for style in (TERSE,) * terse_repeats + (VERBOSE,):
                c = self.target_ids(q.target(style))
                if len(c) > self.max_length // 2:  # an over-long target keeps its head and the end-of-turn token
                    c = c[: self.max_length // 2 - 1] + c[-1:]
                    cut[style] += 1
                p, was_cut = self.prompt_ids(q, style, self.max_length - len(c))
                cut[style] += was_cut
                input_ids.append(p + c)
                masks.append([0] * len(p) + [1] * len(c))
                lengths[style].append(len(p) + len(c))
                targets[style].append(len(c) - 1)
        stats = {style: {**length_stats(lengths[style], cut[style]),
                         "target_mean": round(sum(targets[style]) / max(1, len(targets[style])), 2)}
                 for style in STYLES}
        return {"input_ids": input_ids, "completion_mask": masks}, stats


# ---------------------------------------------------------------------------------------------------------------
# Generation and the separation metric.


@dataclass(frozen=True)
class Decoding:
    """The one decoding used for both styles. Every length-affecting knob is pinned, so nothing can be filled in
    from a model's own generation_config (Qwen3 ships do_sample=True)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    num_beams: int = 1
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def generation_config(self, eos_ids: list[int], pad_id: int):
        from transformers import GenerationConfig

        return GenerationConfig(**asdict(self), eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True)


@dataclass
class Generations:
    """What one style produced: token lengths (EOS excluded), decoded texts, and the decoding that made them."""

    style: str
    decoding: Decoding
    lengths: list[int]
    texts: list[str]


def separation(terse: Generations, verbose: Generations) -> float:
    """Token separation of two generation runs; refused unless both used the identical decoding."""
    if terse.decoding != verbose.decoding:
        raise ValueError(f"token separation needs identical decoding for both styles, got TERSE {terse.decoding} "
                         f"and VERBOSE {verbose.decoding}")
    if terse.style != TERSE or verbose.style != VERBOSE:
        raise ValueError(f"expected (terse, verbose) generations, got ({terse.style}, {verbose.style})")
    return M.token_separation(verbose.lengths, terse.lengths)


def eos_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
           tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    unk = tokenizer.unk_token_id
    return sorted(i for i in ids if i is not None and i != unk and i >= 0)


def generated_length(ids: Sequence[int], stop: set[int]) -> int:
    """Tokens before the first end token (all of them if the budget ran out first)."""
    for i, t in enumerate(ids):
        if t in stop:
            return i
    return len(ids)


class StyleEvaluator:
    """Greedy generation for both styles with one Decoding; separation, lengths and TERSE EM/F1."""

    def __init__(self, model, fmt: StyleFormatter, decoding: Decoding, batch_size: int = 32,
                 floor: float | None = None):
        self.model = model
        self.fmt = fmt
        self.decoding = decoding
        self.batch_size = batch_size
        self.floor = floor

    def generate(self, items: Sequence[QA], style: str) -> Generations:
        import torch

        tok = self.fmt.tok
        stop = eos_ids(tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
        gen_config = self.decoding.generation_config(stop, pad)
        device = next(self.model.parameters()).device
        prompts = [self.fmt.prompt_ids(q, style, self.fmt.max_length)[0] for q in items]
        order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]))
        lengths, texts = [0] * len(prompts), [""] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(order), self.batch_size):
                    idx = order[start : start + self.batch_size]
                    width = max(len(prompts[k]) for k in idx)
                    ids = torch.full((len(idx), width), pad, dtype=torch.long)
                    mask = torch.zeros((len(idx), width), dtype=torch.long)
                    for r, k in enumerate(idx):  # left padding: every prompt ends where generation starts
                        ids[r, width - len(prompts[k]) :] = torch.tensor(prompts[k])
                        mask[r, width - len(prompts[k]) :] = 1
                    out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                              generation_config=gen_config)
                    for r, k in enumerate(idx):
                        new = out[r, width:].tolist()
                        n = generated_length(new, set(stop))
                        lengths[k] = n
                        texts[k] = tok.decode(new[:n], skip_special_tokens=True).strip()
        finally:
            if was_training:
                self.model.train()
        return Generations(style, self.decoding, lengths, texts)

    def evaluate(self, items: Sequence[QA], prefix: str = "val") -> dict[str, float]:
        """Metrics over `items`. Under torch.distributed each rank generates for a shard and the sums are reduced."""
        import torch
        import torch.distributed as dist

        rank, world = 0, 1
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        shard = list(items)[rank::world]
        terse = self.generate(shard, TERSE)
        verbose = self.generate(shard, VERBOSE)
        if terse.decoding != verbose.decoding:  # cannot happen through generate(); guards later edits
            raise RuntimeError("TERSE and VERBOSE were generated with different decodings")
        ems = [M.answer_exact_match(t, list(q.golds)) for t, q in zip(terse.texts, shard)]
        f1s = [M.answer_f1(t, list(q.golds)) for t, q in zip(terse.texts, shard)]
        sums = [sum(verbose.lengths), sum(terse.lengths), sum(ems), sum(f1s), len(shard)]
        if world > 1:
            t = torch.tensor(sums, dtype=torch.float64)
            dist.all_reduce(t)
            sums = t.tolist()
        sum_v, sum_t, sum_em, sum_f1, n = sums
        mean_v, mean_t = sum_v / n, sum_t / n
        sep = M.separation_of_means(mean_v, mean_t)
        f1 = sum_f1 / n
        objective, ok = M.separation_at_floor(sep, f1, self.floor)
        return {
            f"{prefix}_separation": sep,
            f"{prefix}_separation_at_floor": objective,
            f"{prefix}_meets_floor": float(ok),
            f"{prefix}_terse_f1": f1,
            f"{prefix}_terse_em": sum_em / n,
            f"{prefix}_len_terse": mean_t,
            f"{prefix}_len_verbose": mean_v,
            f"{prefix}_questions": n,
        }
