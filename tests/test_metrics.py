import pytest

from trainables.metrics import binary_prf


def test_f1_equals_hand_computed_value():
    y_true = ["spam", "spam", "spam", "ham", "ham", "ham", "ham", "spam"]
    y_pred = ["spam", "ham", "spam", "spam", "ham", "ham", "ham", "ham"]
    # tp=2 (0,2), fp=1 (3), fn=2 (1,7): precision 2/3, recall 2/4, F1 = 2*(2/3)*(1/2)/((2/3)+(1/2)) = 4/7
    r = binary_prf(y_true, y_pred, "spam")
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 2)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(0.5)
    assert r["f1"] == pytest.approx(4 / 7)


def test_no_positive_predictions_is_zero_not_nan():
    assert binary_prf(["spam", "ham"], ["ham", "ham"], "spam")["f1"] == 0.0


def test_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.metrics")
    y_true = ["a", "b", "b", "a", "b", "a", "a"]
    y_pred = ["a", "a", "b", "b", "b", "a", "b"]
    assert binary_prf(y_true, y_pred, "b")["f1"] == pytest.approx(sklearn.f1_score(y_true, y_pred, pos_label="b"))
