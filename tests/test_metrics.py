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


def test_average_precision_equals_hand_computed_value():
    from trainables.metrics import average_precision

    # ranked: 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg), -0.5 (pos): precision at each positive 1/1, 2/3, 3/5;
    # AP = (1 + 2/3 + 3/5) / 3 = 34/45
    assert average_precision([0.7, 0.1, 0.9, -0.5, 0.8], [True, False, True, True, False]) == pytest.approx(34 / 45)
    # a tie at the top enters together: {0.5: pos, 0.5: neg} then 0.2: pos -> (1/2)(1/2) + (1/2)(2/3) = 7/12
    assert average_precision([0.5, 0.5, 0.2], [True, False, True]) == pytest.approx(7 / 12)
    assert average_precision([0.3, 0.2], [False, False]) == 0.0
    # F1 0 (the model answers the majority label for all) tells nothing of the ranking; AP does
    assert average_precision([-2.0, -5.0, -3.0, -6.0], [True, False, True, False]) == 1.0


def test_average_precision_matches_scikit_learn_with_ties():
    import random

    sklearn = pytest.importorskip("sklearn.metrics")
    from trainables.metrics import average_precision

    rng = random.Random(0)
    for _ in range(100):
        n = rng.randint(2, 30)
        scores, positive = [rng.choice([-1.0, 0.0, 0.5, 2.0, rng.random()]) for _ in range(n)], [False] * n
        for i in rng.sample(range(n), rng.randint(1, n)):
            positive[i] = True
        assert average_precision(scores, positive) == pytest.approx(sklearn.average_precision_score(positive, scores))
