"""The one metrics module: the objective the search optimizes is computed here and nowhere else."""

from __future__ import annotations

import re
import string
from collections import Counter
from itertools import groupby

# Metric names, imported by the reporter, the scheduler, the searcher and export.
F1 = "val_f1"
F1_BALANCED = "val_bal_f1"
PRECISION = "val_precision"
RECALL = "val_recall"
EVAL_LOSS = "eval_loss"
AVERAGE_PRECISION = "val_ap"  # of the minority label, ranking the messages by its score over the others'
TEST_F1 = "test_f1"
STEP = "step"

# Style control (task: style).
SEPARATION = "val_separation"  # mean VERBOSE length / mean TERSE length, identical greedy decoding
SEPARATION_AT_FLOOR = "val_separation_at_floor"  # SEPARATION if TERSE F1 >= floor, else TERSE_F1 / floor - 1 (< 0)
MEETS_FLOOR = "val_meets_floor"  # 1.0 if TERSE answer F1 >= floor (or no floor), else 0.0
TERSE_F1 = "val_terse_f1"
TERSE_EM = "val_terse_em"
LEN_TERSE = "val_len_terse"
LEN_VERBOSE = "val_len_verbose"
STYLE_METRICS = (SEPARATION, SEPARATION_AT_FLOOR, MEETS_FLOOR, TERSE_F1, TERSE_EM, LEN_TERSE, LEN_VERBOSE)
CLASSIFICATION_METRICS = (F1, F1_BALANCED, PRECISION, RECALL, EVAL_LOSS, AVERAGE_PRECISION)
# Metrics a search may order tied objective values by (search.resilience.tie_broken), and whether lower is better.
TIE_BREAKS = {EVAL_LOSS: True, AVERAGE_PRECISION: False}


def binary_prf(y_true: list[str], y_pred: list[str], positive: str) -> dict[str, float]:
    """Precision, recall and F1 of the `positive` label; 0.0 where a ratio is 0/0, as scikit-learn's zero_division=0."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred differ in length ({len(y_true)} != {len(y_pred)})")
    tp = sum(1 for t, p in zip(y_true, y_pred) if t == positive and p == positive)
    fp = sum(1 for t, p in zip(y_true, y_pred) if t != positive and p == positive)
    fn = sum(1 for t, p in zip(y_true, y_pred) if t == positive and p != positive)
    return prf_from_counts(tp, fp, fn)


def prf_from_counts(tp: float, fp: float, fn: float) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def average_precision(scores: list[float], positive: list[bool]) -> float:
    """Average precision of the positive examples when every example is ranked by `scores` (higher: more likely
    positive): the mean, over the thresholds at which recall rises, of precision times the rise, as scikit-learn's
    `average_precision_score`. Examples with equal scores enter together. 0.0 with no positive example.

    Unlike F1 it needs no decision: a model that still answers the majority label for every message (F1 0) but
    scores the minority label higher on the minority messages than on the others already has a high AP."""
    if len(scores) != len(positive):
        raise ValueError(f"scores and positive differ in length ({len(scores)} != {len(positive)})")
    total = sum(positive)
    if not total:
        return 0.0
    ap, tp, seen = 0.0, 0, 0
    for _, tied in groupby(sorted(zip(scores, positive), key=lambda x: -x[0]), key=lambda x: x[0]):
        flags = [p for _, p in tied]
        tp, seen = tp + sum(flags), seen + len(flags)
        ap += sum(flags) / total * tp / seen
    return ap


# ---------------------------------------------------------------------------------------------------------------
# Style control: token separation and SQuAD-style answer quality.


def token_separation(verbose_lengths: list[int], terse_lengths: list[int]) -> float:
    """Mean generated length of VERBOSE answers over the mean for TERSE answers (tokens, EOS excluded).

    A TERSE mean below one token counts as one, so empty TERSE answers cannot inflate the ratio without bound (the
    TERSE answer F1 reported beside it shows such a model for what it is)."""
    if not verbose_lengths or not terse_lengths:
        raise ValueError("token_separation needs at least one VERBOSE and one TERSE generation")
    return separation_of_means(sum(verbose_lengths) / len(verbose_lengths), sum(terse_lengths) / len(terse_lengths))


def separation_of_means(mean_verbose: float, mean_terse: float) -> float:
    """token_separation from the two mean lengths (e.g. sums reduced across ranks)."""
    return mean_verbose / max(mean_terse, 1.0)


def separation_at_floor(separation: float, terse_f1: float, floor: float | None) -> tuple[float, bool]:
    """The constrained objective and whether the floor is met.

    Below the floor the value is `terse_f1 / floor - 1`, in [-1, 0): visibly failing (every passing trial scores
    >= 0), yet ordered, so the searcher still learns which failing trials came closer."""
    if floor is None or terse_f1 >= floor:
        return separation, True
    return terse_f1 / floor - 1.0, False


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalization: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_exact_match(prediction: str, golds: list[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer (SQuAD v1.1 EM)."""
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def answer_f1(prediction: str, golds: list[str]) -> float:
    """Best token-overlap F1 of the prediction against the gold answers (SQuAD v1.1 F1)."""
    best = 0.0
    pred = normalize_answer(prediction).split()
    for g in golds:
        gold = normalize_answer(g).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if not pred or not gold:
            f1 = float(pred == gold)
        elif common == 0:
            f1 = 0.0
        else:
            p, r = common / len(pred), common / len(gold)
            f1 = 2 * p * r / (p + r)
        best = max(best, f1)
    return best
