"""The one metrics module: the objective the search optimizes is computed here and nowhere else."""

from __future__ import annotations

# Metric names, imported by the reporter, the scheduler, the searcher and export.
F1 = "val_f1"
F1_BALANCED = "val_bal_f1"
PRECISION = "val_precision"
RECALL = "val_recall"
EVAL_LOSS = "eval_loss"
TEST_F1 = "test_f1"
STEP = "step"


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
